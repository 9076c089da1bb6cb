"""An lm-evaluation-harness model over this library's Transformer and Tokenizer (`pip install 'llama[eval]'`).

    import lm_eval, llama.eval.harness
    lm = llama.eval.harness.LlamaLM(model, tokenizer)      # or LlamaLM.from_checkpoint(ckpt_dir, tokenizer_path)
    lm_eval.simple_evaluate(model=lm, tasks=["my_task"],
                            task_manager=lm_eval.tasks.TaskManager(include_path="my_tasks/"))

Importing this module registers the class as lm-eval model "llama", so
`simple_evaluate(model="llama", model_args="ckpt_dir=...,tokenizer_path=...")` works too.
Requests are scored by llama.eval: bos (not eos) before every context, context/continuation
split at token boundaries as lm-eval's HFLM splits them, the choices of a question sharing one pass
over their context. Under torchrun with a tensor-parallel model every rank runs every request (the
ranks split the model, not the data), so lm-eval sees one process.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from llama.env import scoring_dtype
from llama.eval.evaluation import check_batch_size, encode_pair, greedy_generate, loglikelihoods, sequence_nlls
from llama.inference import Llama
from llama.formats.locate import checkpoint_args


@register_model("llama")
class LlamaLM(TemplateLM):
    """lm-eval's `LM` interface (loglikelihood, loglikelihood_rolling, generate_until) on a `Transformer`.

    max_length: the context used (default the model's max_seq_len; from a checkpoint, the one it was
    trained for). loglikelihood_rolling scores disjoint windows of max_length tokens, as lm-eval's HFLM
    does. generate_until is greedy, stops at an `until` string or eos, and keeps the last tokens of a
    context too long for max_gen_toks to follow it (as HFLM: the start, bos with it, goes).
    From a checkpoint (`ckpt_dir`: Meta's layout, a transformers folder or a .gguf file) the tokenizer
    is the one beside it unless `tokenizer_path` is given, and on a CPU the model runs in fp32 unless
    `dtype` says otherwise (the same scores on every CPU). batch_size "auto" takes max_batch_size (or 16).
    """

    def __init__(self, model=None, tokenizer=None, *, batch_size: int | str = 16, max_batch_size: int | None = None,
                 max_gen_toks: int = 256, max_length: int | None = None, ckpt_dir: str | None = None,
                 tokenizer_path: str | None = None, max_seq_len: int | None = None, dtype: str | None = None,
                 device: str | None = None):
        super().__init__()
        if isinstance(model, (str, Path)):
            raise ValueError(f"LlamaLM(model, tokenizer) takes a Transformer; for the checkpoint {model} use "
                             f"LlamaLM(ckpt_dir=...) or LlamaLM.from_checkpoint(...)")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = int(max_batch_size or 16)  # no search for the largest batch: the CPU or the GPU's share
            warnings.warn(f"LlamaLM: batch_size auto -> {batch_size} (set max_batch_size or a number)")
        try:
            self.batch_size = check_batch_size(int(batch_size))
        except (TypeError, ValueError):
            raise ValueError(f"batch_size must be an integer >= 1 or 'auto', got {batch_size!r}") from None
        if model is None:
            if ckpt_dir is None:
                raise ValueError("LlamaLM needs a model and tokenizer, or ckpt_dir (and tokenizer_path)")
            context = int(max_length or max_seq_len or checkpoint_args(ckpt_dir).max_seq_len)
            llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=context, max_batch_size=self.batch_size,
                                dtype=scoring_dtype(dtype, device), device=device, decoder="eager")
            model, tokenizer = llama.model, llama.tokenizer
        elif tokenizer is None:
            raise ValueError("LlamaLM(model, tokenizer): the tokenizer is missing")
        self.model, self.tokenizer = model.eval(), tokenizer
        self._max_length = int(max_length or model.args.max_seq_len)
        if not 2 <= self._max_length <= model.args.max_seq_len:
            raise ValueError(f"max_length {self._max_length} must be in [2, {model.args.max_seq_len}] (the model's "
                             f"max_seq_len, the length of its RoPE table)")  # scoring reads `context=max_length`
        self._max_gen_toks = int(max_gen_toks)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str, tokenizer_path: str | None = None, **kwargs) -> "LlamaLM":
        """From a Meta-layout checkpoint directory, a transformers folder or a .gguf file; tensor-parallel
        when launched by torchrun."""
        return cls(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, **kwargs)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # lm-eval's default would be eos; LLaMA reads bos first

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "model_path", "llama"))

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, bos=add_special_tokens is not False, eos=False)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """An empty continuation is (0.0, True): nothing to predict, probability 1 (HFLM asserts on it)."""
        args = [r.args for r in requests]
        todo = [i for i, (_, cont) in enumerate(args) if cont]
        pairs = [encode_pair(self.tokenizer, *args[i]) for i in todo]
        scored = self._loglikelihood_tokens([(args[i], c, x) for i, (c, x) in zip(todo, pairs)], disable_tqdm)
        out = [(0.0, True)] * len(args)
        for i, r in zip(todo, scored):
            out[i] = r
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # requests: ((context, continuation) strings, context ids, continuation ids). Too long for the
        # model: keep the last max_length + 1 tokens, as HFLM does (the start of the context goes).
        limit = self.max_length + 1
        pairs, cut = [], 0
        for i, (_, ctx, cont) in enumerate(requests):
            if len(cont) > self.max_length:
                raise ValueError(f"request {i}: the continuation alone has {len(cont)} tokens, more than "
                                 f"max_length {self.max_length}")
            drop = max(0, len(ctx) + len(cont) - limit)
            cut += drop > 0
            pairs.append((ctx[drop:], cont))
        if cut:
            warnings.warn(f"{cut} of {len(pairs)} requests are longer than max_length {self.max_length} + 1 tokens: "
                          "the start of their context was cut off")
        # longest context first and equal contexts together, then in calls of `chunk` requests so the bar moves
        order = sorted(range(len(pairs)), key=lambda i: (-len(pairs[i][0]), pairs[i][0]))
        out = [None] * len(pairs)
        chunk = max(64, 4 * self.batch_size)
        pbar = tqdm(total=len(pairs), unit="req", desc="loglikelihood", disable=disable_tqdm or self.rank != 0)
        for b in range(0, len(order), chunk):
            idx = order[b:b + chunk]
            for i, r in zip(idx, loglikelihoods(self.model, [pairs[i] for i in idx], batch_size=self.batch_size,
                                                context=self.max_length)):
                out[i] = r
            pbar.update(len(idx))
        pbar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        seqs = [[self.prefix_token_id] + self.tok_encode(s, add_special_tokens=False) for (s,) in (r.args for r in requests)]
        pbar = tqdm(total=sum(len(s) - 1 for s in seqs), unit="tok", unit_scale=True, desc="loglikelihood_rolling",
                    disable=disable_tqdm or self.rank != 0)
        nlls = sequence_nlls(self.model, seqs, stride=self.max_length, batch_size=self.batch_size, pbar=pbar,
                             context=self.max_length)
        pbar.close()
        return [-x for x in nlls]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        by_setting: dict[tuple, list[int]] = {}  # (until, max_gen_toks) -> request indices
        prompts = []
        for i, (context, gen_kwargs) in enumerate(r.args for r in requests):
            kw = dict(gen_kwargs or {})
            if kw.get("do_sample", float(kw.get("temperature") or 0.0) > 0):  # temperature counts only without do_sample
                raise ValueError(f"request {i} asks for sampling ({gen_kwargs}); LlamaLM generates greedily only")
            n = int(kw.get("max_gen_toks", self.max_gen_toks))
            if n >= self.max_length:
                raise ValueError(f"request {i}: max_gen_toks {n} leaves no room for the context in max_length {self.max_length}")
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self.tok_encode(context)
            keep = self.max_length - n
            prompts.append(ids[-keep:])  # a long context loses its start (bos with it), as in HFLM and loglikelihood
            by_setting.setdefault((tuple(until), n), []).append(i)  # generation also ends at the eos token
        out = [""] * len(requests)
        pbar = tqdm(total=len(requests), unit="req", desc="generate_until", disable=disable_tqdm or self.rank != 0)
        for (until, n), idx in by_setting.items():
            texts = greedy_generate(self.model, self.tokenizer, [prompts[i] for i in idx], n, until,
                                    batch_size=self.batch_size, pbar=pbar, context=self.max_length)
            for i, t in zip(idx, texts):
                out[i] = t
        pbar.close()
        return out

    def get_model_info(self) -> dict:
        a = self.model.args
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "dim": a.dim, "n_layers": a.n_layers}

