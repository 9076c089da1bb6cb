"""Multiple-choice scoring speed: ours (llama.eval.harness.LlamaLM) vs lm-eval's HFLM on the same weights.

A 4-choice task whose questions have a long context (a passage of `context_tokens` tokens, then a
question): the same lm-eval `loglikelihood` requests go to both models, side by side in one
process, same dtype and batch size. HFLM scores each (context, choice) as its own sequence;
ours runs each context once into a KV cache and scores the four choices from it. Reported:
questions (examples) per second, the best of `repeats` timed runs that alternate between the two,
and the largest difference between the two models' log-likelihoods.

    python benchmarks/eval.py                               # 60M preset, fp32, 16 questions, context ~400
    python benchmarks/eval.py --dtype bf16 --questions 32 --context_tokens 800
"""

from __future__ import annotations

import os
import random
import tempfile
import time
import warnings
from pathlib import Path

import fire
import torch

from llama.data import train_tokenizer
from llama.env import parse_dtype
from llama.eval.harness import LlamaLM
from llama.formats.hf import save_hf
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their can has been if more when will would who so no river "
         "mountain city king queen war peace music science water fire").split()


def make_task(tok: Tokenizer, questions: int, context_tokens: int, seed: int = 0) -> list[tuple[str, str]]:
    """lm-eval loglikelihood requests: for each question, (passage + question, " " + choice) x 4."""
    rng = random.Random(seed)
    requests = []
    for _ in range(questions):
        words = []
        while len(tok.encode(" ".join(words), bos=True, eos=False)) < context_tokens:
            words += [rng.choice(WORDS) for _ in range(20)]
        ctx = " ".join(words).capitalize() + ".\nQuestion: which " + " ".join(rng.sample(WORDS, 4)) + "?\nAnswer:"
        requests += [(ctx, " " + " ".join(rng.sample(WORDS, rng.randint(1, 4)))) for _ in range(4)]
    return requests


def main(preset: str = "60M", dtype: str = "fp32", questions: int = 16, context_tokens: int = 400,
         batch_size: int = 4, repeats: int = 2, threads: int | None = None):
    warnings.filterwarnings("ignore")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    if threads:
        torch.set_num_threads(threads)
    dt = parse_dtype(dtype)
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(2000)]
    tok = Tokenizer(train_tokenizer(docs, work / "tokenizer.model", vocab_size=500))
    torch.manual_seed(0)
    args = ModelArgs.from_name(preset, max_seq_len=max(1024, context_tokens + 64))
    model = Transformer(args).to(dt).eval().requires_grad_(False)  # random weights, vocab args.vocab_size
    save_hf(model.state_dict(), args, work / "hf", dtype=dt, tokenizer_path=tok.model_path)
    hflm = HFLM(pretrained=str(work / "hf"), device="cpu", dtype=dtype_name(dt), batch_size=batch_size,
                max_length=args.max_seq_len)
    ours = LlamaLM(model, tok, batch_size=batch_size)

    requests = make_task(tok, questions, context_tokens)
    inst = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)]
    ctx_len = sum(len(tok.encode(c, bos=True, eos=False)) for c, _ in requests[::4]) / questions
    print(f"model {preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {dtype}, "
          f"{torch.get_num_threads()} threads; {questions} questions x 4 choices, context {ctx_len:.0f} tokens "
          f"on average, batch size {batch_size}")
    for lm in (hflm, ours):  # warm-up: first-call allocations and kernels
        lm.loglikelihood(inst[:4], disable_tqdm=True)
    best = {"HFLM": float("inf"), "ours": float("inf")}
    results = {}
    for _ in range(repeats):
        for name, lm in (("HFLM", hflm), ("ours", ours)):
            t0 = time.perf_counter()
            results[name] = lm.loglikelihood(inst, disable_tqdm=True)
            best[name] = min(best[name], time.perf_counter() - t0)
    diff = max(abs(a[0] - b[0]) for a, b in zip(results["HFLM"], results["ours"]))
    for name in best:
        print(f"{name:5s} {questions / best[name]:8.2f} examples/s  ({best[name]:.2f} s)")
    print(f"ours / HFLM: {best['HFLM'] / best['ours']:.2f}x   largest log-likelihood difference {diff:.2e}")


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fire.Fire(main)
