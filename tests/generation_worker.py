"""Helpers for the generation tests, and a worker run under torchrun by test_generation_multirank.py.

As a worker: `torchrun --nproc_per_node Q tests/generation_worker.py --tokenizer T --out O CKPT...`
builds `Llama` on every checkpoint directory given, completes PROMPTS greedily and with seeded
sampling, streams one prompt, checks that all ranks agree and hold only their slice, and rank 0
writes the results as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama.checkpoint import save_meta_checkpoint  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402

# Different lengths on purpose (ragged batches); one repeated to check batch-chunking.
PROMPTS = ["The", "def f(x, y):\n    return", "In 1999 it cost 12.50 dollars and the model",
           "they were her one", "The"]
GEN_LEN = 10
SAMPLING = dict(temperature=0.8, top_p=0.9, top_k=40)


def tiny_args(**overrides) -> ModelArgs:
    return ModelArgs.from_name("tiny", **overrides)


def make_checkpoint(out_dir, tokenizer_path, num_shards: int = 1, seed: int = 0, **overrides) -> Transformer:
    """A random tiny model saved in Meta's layout (fp32, `num_shards` files); returns the model."""
    torch.manual_seed(seed)
    model = Transformer(tiny_args(**overrides))
    model.init_weights(std=0.08)  # larger than the default: peaked next-token distributions
    save_meta_checkpoint(model.state_dict(), model.args, out_dir, num_shards=num_shards, dtype=torch.float32,
                         tokenizer_path=tokenizer_path)
    return model


def run_all(llama, prompts=PROMPTS) -> dict:
    """Greedy and seeded-sampling completions of `prompts` plus a streamed completion."""
    tok = llama.tokenizer
    ids = [tok.encode(p, bos=True, eos=False) for p in prompts]
    greedy, _ = llama.generate(ids, GEN_LEN, temperature=0.0)
    llama.generator.manual_seed(123)
    sampled, _ = llama.generate(ids, GEN_LEN, **SAMPLING)
    llama.generator.manual_seed(7)
    streamed = list(llama.stream(prompts[2], max_gen_len=GEN_LEN, **SAMPLING))
    return {"greedy": greedy, "sampled": sampled, "streamed": streamed}


def main(argv):
    import torch.distributed as dist

    from llama.generation import Llama

    tokenizer = argv[argv.index("--tokenizer") + 1]
    out = argv[argv.index("--out") + 1]
    ckpts = [a for i, a in enumerate(argv) if i and argv[i - 1] not in ("--tokenizer", "--out") and not a.startswith("--")]
    results = {}
    for ckpt in ckpts:
        llama = Llama.build(ckpt, tokenizer, max_seq_len=64, max_batch_size=3, dtype="float32", device="cpu")
        res = run_all(llama)
        # each rank holds only its slice: a quarter (on 4 ranks) of wq's rows and of the vocab rows
        wq = llama.model.layers[0].attention.wq.weight
        emb = llama.model.tok_embeddings.weight
        local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
        res["local_shapes"] = [list(local(wq).shape), list(local(emb).shape)]
        # the KV cache holds this rank's heads only
        res["cache_heads"] = llama.kv_cache().k.size(3)
        everyone = [None] * llama.world_size
        if llama.world_size > 1:
            dist.all_gather_object(everyone, res)
        else:
            everyone = [res]
        res["ranks_agree"] = all(r == everyone[0] for r in everyone)
        results[ckpt] = res
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo threads there rarely abort ("terminate called ...")
