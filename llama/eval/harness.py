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

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from llama.eval.evaluation import encode_pair, greedy_generate, loglikelihoods, sequence_nlls
from llama.inference import Llama


@register_model("llama")
class LlamaLM(TemplateLM):
    """lm-eval's `LM` interface (loglikelihood, loglikelihood_rolling, generate_until) on a `Transformer`.

    max_length: the context used (default the model's max_seq_len). loglikelihood_rolling scores
    disjoint windows of max_length tokens, as lm-eval's HFLM does. generate_until is greedy, stops at
    an `until` string or eos, and keeps bos plus the last tokens of a context too long for
    max_gen_toks to follow it.
    """

    def __init__(self, model=None, tokenizer=None, *, batch_size: int = 16, max_gen_toks: int = 256,
                 ckpt_dir: str | None = None, tokenizer_path: str | None = None, max_seq_len: int = 2048,
                 dtype: str | None = None, device: str | None = None):
        super().__init__()
        if model is None:
            if ckpt_dir is None:
                raise ValueError("LlamaLM needs a model and tokenizer, or ckpt_dir (and tokenizer_path)")
            llama = Llama.build(ckpt_dir, tokenizer_path or f"{ckpt_dir}/tokenizer.model", max_seq_len=int(max_seq_len),
                                max_batch_size=int(batch_size), dtype=dtype, device=device, decoder="eager")
            model, tokenizer = llama.model, llama.tokenizer
        elif tokenizer is None:
            raise ValueError("LlamaLM(model, tokenizer): the tokenizer is missing")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = int(batch_size)
        self._max_gen_toks = int(max_gen_toks)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str, tokenizer_path: str | None = None, **kwargs) -> "LlamaLM":
        """From a Meta-layout checkpoint directory; tensor-parallel when launched by torchrun."""
        return cls(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, **kwargs)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # lm-eval's default would be eos; LLaMA reads bos first

    @property
    def max_length(self) -> int:
        return self.model.args.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, bos=add_special_tokens is not False, eos=False)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, ctx, cont) for ctx, cont in (r.args for r in requests)]
        return self._loglikelihood_tokens([(r.args, c, x) for r, (c, x) in zip(requests, pairs)], disable_tqdm)

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
            for i, r in zip(idx, loglikelihoods(self.model, [pairs[i] for i in idx], batch_size=self.batch_size)):
                out[i] = r
            pbar.update(len(idx))
        pbar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        seqs = [[self.prefix_token_id] + self.tok_encode(s, add_special_tokens=False) for (s,) in (r.args for r in requests)]
        pbar = tqdm(total=sum(len(s) - 1 for s in seqs), unit="tok", unit_scale=True, desc="loglikelihood_rolling",
                    disable=disable_tqdm or self.rank != 0)
        nlls = sequence_nlls(self.model, seqs, stride=self.max_length, batch_size=self.batch_size, pbar=pbar)
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
            prompts.append(ids if len(ids) <= keep else ids[:1] + ids[len(ids) - keep + 1:])  # bos + the context's tail
            by_setting.setdefault((tuple(until), n), []).append(i)  # generation also ends at the eos token
        out = [""] * len(requests)
        pbar = tqdm(total=len(requests), unit="req", desc="generate_until", disable=disable_tqdm or self.rank != 0)
        for (until, n), idx in by_setting.items():
            texts = greedy_generate(self.model, self.tokenizer, [prompts[i] for i in idx], n, until,
                                    batch_size=self.batch_size, pbar=pbar)
            for i, t in zip(idx, texts):
                out[i] = t
        pbar.close()
        return out

    def get_model_info(self) -> dict:
        a = self.model.args
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "dim": a.dim, "n_layers": a.n_layers}

