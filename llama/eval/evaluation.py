"""Evaluation: perplexity, log-likelihood scoring, and multiple-choice / generation tasks from local files.

Scoring follows lm-evaluation-harness (the protocol the LLaMA paper's numbers are reproduced with):
a context is encoded with bos; a (context, continuation) pair is split at token boundaries by
encoding context + continuation as one string and taking what follows the context's own tokens;
a multiple-choice question is answered by the choice whose continuation has the highest summed
log-likelihood (`acc`), that sum divided by the choice's characters (`acc_norm`), or the paper's
P(choice | context) / P(choice | "Answer:") (`acc_answer`, for OpenBookQA and BoolQ).

Speed: the choices of a question share their context. `loglikelihoods` runs each distinct context
once into a KV cache (contexts of several questions in one batch, longest first), then scores all
continuations of that context in one batch that starts where the context ends.

Tasks are JSONL files plus a small JSON spec; see `TaskSpec` and the README.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from llama.data import iter_documents
from llama.data.prepare import iter_jsonl
from llama.config import read_json_object
from llama.inference import Llama
from llama.model import KVCache


class TaskError(ValueError):
    """A bad task spec or data file; the message names the file (and the line)."""


# ---------------------------------------------------------------------------------------------
# tokens


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (bos + context, continuation), split as lm-eval's HuggingFace model splits them.

    Trailing whitespace of the context moves to the continuation; bos + context + continuation is
    encoded as one string, and the continuation is whatever follows the context's own token count
    (so a piece that merges across the boundary is scored as part of the continuation). An empty
    context leaves bos alone as the context.
    """
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tokenizer.encode(context, bos=True, eos=False)
    whole = tokenizer.encode(context + continuation, bos=True, eos=False)
    return ctx, whole[len(ctx):]


def _context_length(model, context: int | None = None) -> int:
    """The positions a scoring call may use: the model's max_seq_len, or `context` below it."""
    if context is None:
        return model.args.max_seq_len
    if not 2 <= context <= model.args.max_seq_len:
        raise ValueError(f"context {context} must be in [2, {model.args.max_seq_len}] (the model's max_seq_len)")
    return context


def _local_kv_heads(model) -> int:
    """Key/value heads this rank holds: all of them, or a slice under tensor parallelism."""
    w = model.layers[0].attention.wk.weight
    w = w.to_local() if hasattr(w, "to_local") else w  # a DTensor when tensor-parallel
    return w.size(0) // model.args.head_dim


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---------------------------------------------------------------------------------------------
# log-likelihood of continuations


def _logprob(logits: torch.Tensor, target: Sequence[int]) -> tuple[float, bool]:
    """Summed log-probability of `target` under (T, vocab) logits, and whether each is the argmax."""
    lp = logits.float().log_softmax(dim=-1)  # (T, V)
    t = torch.tensor(target, device=lp.device)
    return float(lp.gather(-1, t[:, None]).sum()), bool((lp.argmax(dim=-1) == t).all())


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_batch_size(batch_size) -> int:
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


@torch.inference_mode()
def loglikelihoods(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 16,
                   shared_context: bool = True, context: int | None = None) -> list[tuple[float, bool]]:
    """(log P(continuation | context), greedy) for each (context ids, continuation ids) request.

    The context starts with bos and is not empty; context + continuation is at most the model's
    context + 1 tokens (the last token is only predicted). Identical requests are scored once.
    `shared_context=False` scores every request as one full sequence (lm-eval's way), for checking.
    """
    check_batch_size(batch_size)
    if not requests:
        return []
    max_len = _context_length(model, context)
    keys = []
    for i, (ctx, cont) in enumerate(requests):
        if not len(ctx) or not len(cont):
            raise ValueError(f"request {i}: the context and the continuation need a token each "
                             f"(got {len(ctx)} and {len(cont)})")
        if len(ctx) + len(cont) - 1 > max_len:
            raise ValueError(f"request {i}: {len(ctx)} context + {len(cont)} continuation tokens need "
                             f"{len(ctx) + len(cont) - 1} positions, more than the model's context of {max_len}")
        keys.append((tuple(ctx), tuple(cont)))
    pairs = list(dict.fromkeys(keys))  # distinct requests, first-seen order
    score = _score_shared if shared_context else _score_separate
    found = dict(zip(pairs, score(model, pairs, batch_size)))
    return [found[k] for k in keys]


def _score_separate(model, pairs, batch_size) -> list[tuple[float, bool]]:
    """Each request as one right-padded row of (context + continuation)[:-1], longest first."""
    dev = _device(model)
    out = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda j: -(len(pairs[j][0]) + len(pairs[j][1])))
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        seqs = [pairs[j][0] + pairs[j][1][:-1] for j in rows]
        tokens = torch.zeros(len(rows), len(seqs[0]), dtype=torch.long)  # right padding never reaches earlier positions
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = torch.tensor(s)
        logits = model(tokens.to(dev))  # (B, T, V)
        for i, j in enumerate(rows):
            ctx, cont = pairs[j]
            start = len(ctx) - 1  # the logits at the last context token predict the first continuation token
            out[j] = _logprob(logits[i, start:start + len(cont)], cont)
    return out


def _copy_prefix(src: KVCache, row: int, dst: KVCache, rows: int, length: int) -> None:
    """Replicate row `row` of `src`'s first `length` positions into rows 0..rows-1 of `dst`."""
    dst.k[:, :rows, :length] = src.k[:, row:row + 1, :length]
    dst.v[:, :rows, :length] = src.v[:, row:row + 1, :length]


def _score_shared(model, pairs, batch_size) -> list[tuple[float, bool]]:
    """Each distinct context once, then its continuations together.

    A context c (bos ... last) is split in two: c[:-1] goes through the model into a prefix cache
    (batch_size contexts at a time, right-padded, no logits kept); then every continuation x of c
    is one row [c[-1], x[:-1]] at position len(c) - 1 over a copy of that prefix, whose logits
    predict exactly x. So the context costs one pass instead of one per choice.
    """
    dev = _device(model)
    groups: dict[tuple, list[int]] = {}
    for j, (ctx, _) in enumerate(pairs):
        groups.setdefault(ctx, []).append(j)
    contexts = sorted(groups, key=len, reverse=True)  # longest first: the first batch sizes the caches
    heads = _local_kv_heads(model)
    like = next(model.parameters())
    prefix_cache = model.new_cache(min(batch_size, len(contexts)), max(len(contexts[0]) - 1, 1), n_kv_heads=heads,
                                   device=like.device, dtype=like.dtype)
    span = max(len(ctx) - 1 + len(pairs[j][1]) for ctx in contexts for j in groups[ctx])
    rows_max = min(batch_size, max(len(g) for g in groups.values()))
    cont_cache = model.new_cache(rows_max, span, n_kv_heads=heads, device=like.device, dtype=like.dtype)
    out = [None] * len(pairs)
    for b in range(0, len(contexts), batch_size):
        batch = contexts[b:b + batch_size]
        width = len(batch[0]) - 1
        if width > 0:
            tokens = torch.zeros(len(batch), width, dtype=torch.long)  # (B, longest prefix), right-padded
            for i, ctx in enumerate(batch):
                tokens[i, :len(ctx) - 1] = torch.tensor(ctx[:-1])
            model(tokens.to(dev), 0, prefix_cache, last_only=True)  # fills the cache; the logits are not needed
        for i, ctx in enumerate(batch):
            n = len(ctx) - 1
            members = sorted(groups[ctx], key=lambda j: -len(pairs[j][1]))
            for r in range(0, len(members), batch_size):
                rows = members[r:r + batch_size]
                _copy_prefix(prefix_cache, i, cont_cache, len(rows), n)
                tokens = torch.zeros(len(rows), len(pairs[rows[0]][1]), dtype=torch.long)  # (R, longest continuation)
                for k, j in enumerate(rows):
                    cont = pairs[j][1]
                    tokens[k, :len(cont)] = torch.tensor((ctx[-1],) + cont[:-1])
                logits = model(tokens.to(dev), n, cont_cache)  # (R, T, V)
                for k, j in enumerate(rows):
                    out[j] = _logprob(logits[k, :len(pairs[j][1])], pairs[j][1])
    return out


# ---------------------------------------------------------------------------------------------
# rolling log-likelihood and perplexity


def rolling_windows(n_targets: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows that score every token of x = [bos, t_1 .. t_n] once (n = n_targets).

    Each window is (start, end, new): the model reads x[start:end] (at most max_len ids), whose
    predictions are x[start + 1 .. end], and the last `new` of them are scored. The first window
    starts at 0; each later one scores the next `stride` tokens, so a scored token sees at least
    max_len - stride + 1 tokens of context. stride = max_len is lm-eval's loglikelihood_rolling.
    """
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in [1, {max_len}] (the model's context), got {stride}")
    if n_targets <= 0:
        return []
    end = min(n_targets, max_len)
    windows = [(0, end, end)]
    while end < n_targets:
        nxt = min(n_targets, end + stride)
        windows.append((nxt - max_len, nxt, nxt - end))
        end = nxt
    return windows


@torch.inference_mode()
def sequence_nlls(model, sequences: Sequence[Sequence[int]], *, stride: int | None = None, batch_size: int = 8,
                  pbar: tqdm | None = None, context: int | None = None) -> list[float]:
    """Summed negative log-likelihood of tokens 1.. of each sequence (bos first) by rolling windows
    of the model's context (or `context` positions); the windows of all sequences are batched
    together, longest first."""
    max_len = _context_length(model, context)
    stride = max_len if stride is None else stride
    work = [(s, w) for s, seq in enumerate(sequences) for w in rolling_windows(len(seq) - 1, max_len, stride)]
    work.sort(key=lambda item: -(item[1][1] - item[1][0]))
    dev = _device(model)
    nll = [0.0] * len(sequences)
    for b in range(0, len(work), batch_size):
        chunk = work[b:b + batch_size]
        width = chunk[0][1][1] - chunk[0][1][0]
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, window), right-padded
        for i, (s, (start, end, _)) in enumerate(chunk):
            tokens[i, :end - start] = torch.tensor(sequences[s][start:end])
        logits = model(tokens.to(dev))  # (B, window, V)
        for i, (s, (start, end, new)) in enumerate(chunk):
            lp, _ = _logprob(logits[i, end - start - new:end - start], sequences[s][end - new + 1:end + 1])
            nll[s] -= lp
        if pbar is not None:
            pbar.update(sum(w[2] for _, w in chunk))
    return nll


def read_documents(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Documents of text files: each line's "text" of a .jsonl(.gz) file, else the whole file."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    docs = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"text file {p} does not exist")
        docs.extend(iter_documents(Path(p)))
    return docs


def perplexity(model, tokenizer, texts: Sequence[str], *, stride: int | None = None, batch_size: int = 8,
               progress: bool = True) -> dict:
    """Perplexity of `model` on `texts` (each a document, scored from bos, no eos) with rolling windows
    of the model's context that move `stride` tokens (default: the whole context) at a time.

    Returns the total negative log-likelihood (nats), tokens, bytes (UTF-8), documents,
    perplexity = exp(nll / tokens) and bits_per_byte = nll / (ln 2 * bytes).
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a list of documents, not one string; wrap it: [text] "
                         "(read files with llama.eval.read_documents)")
    texts = list(texts)
    check_batch_size(batch_size)
    max_len = _context_length(model)
    stride = max_len if stride is None else stride  # 0 is refused by rolling_windows, not read as "default"
    seqs = [tokenizer.encode(t, bos=True, eos=False) for t in texts]
    n_tokens = sum(len(s) - 1 for s in seqs)
    if n_tokens == 0:
        raise ValueError(f"no tokens to score in {len(texts)} document(s): they are empty")
    pbar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="perplexity", disable=not progress or _rank() != 0)
    t0 = time.perf_counter()
    nll = math.fsum(sequence_nlls(model, seqs, stride=stride, batch_size=batch_size, pbar=pbar))
    pbar.close()
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"nll": nll, "tokens": n_tokens, "bytes": n_bytes, "documents": len(texts),
            "perplexity": math.exp(nll / n_tokens), "bits_per_byte": nll / (math.log(2) * n_bytes),
            "context": max_len, "stride": stride, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# generation and answer matching


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces: TriviaQA/NQ/SQuAD matching."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_PUNCTUATION = frozenset(string.punctuation)
LAST_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def extract(text: str, pattern: str | re.Pattern) -> str | None:
    """The last match of `pattern` in `text` (its first group if it has groups), stripped; None if none."""
    pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
    last = None
    for last in pattern.finditer(text):
        pass
    if last is None:
        return None
    return (last.group(1) if pattern.groups else last.group(0)).strip()


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
    hits = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return text[:min(hits)] if hits else text


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    until: Sequence[str] = (), *, batch_size: int = 16, pbar: tqdm | None = None,
                    context: int | None = None) -> list[str]:
    """Greedy completion text of each prompt (token ids, bos first), cut before the first `until`
    string; stops at eos, after max_new_tokens or at `context` positions (default the model's).
    Prompts run shortest first, batch_size at a time."""
    heads = _local_kv_heads(model)
    world = model.args.n_kv_heads // heads
    llama = Llama(model, tokenizer, max_seq_len=_context_length(model, context), max_batch_size=batch_size,
                  rank=_rank(), world_size=world)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        toks, _ = llama.generate([list(prompts[i]) for i in rows], max_new_tokens, temperature=0.0, stop=list(until))
        for i, t in zip(rows, toks):
            out[i] = _cut_at_stop(tokenizer.decode(t), until)
        if pbar is not None:
            pbar.update(len(rows))
    return out


# ---------------------------------------------------------------------------------------------
# tasks from local files


TASK_TYPES = ("multiple_choice", "generate")
METRICS = {"multiple_choice": ("acc", "acc_norm", "acc_answer"), "generate": ("exact_match", "regex_match")}


@dataclass
class TaskSpec:
    """A local task: a JSONL file of examples and how to prompt and score them.

    multiple_choice records: the fields the template names, "choices" (a list of strings) and
    "answer" (the index of the right one). Each choice is scored as the continuation
    target_delimiter + choice. generate records: the template's fields and "answers" (a list of
    accepted strings) or "answer" (one string); greedy generation stops at a string of `until`.
    Few-shot examples come from `fewshot_data` (may be the same file; the scored example is never
    its own shot), drawn with `fewshot_seed` and the example's index, rendered with the template
    and followed by target_delimiter + their answer, joined by fewshot_separator.
    """

    name: str
    data: str
    type: str = "multiple_choice"
    template: str = "{question}"
    metrics: list[str] | None = None  # default: all of the type's (METRICS)
    num_fewshot: int = 0
    fewshot_data: str | None = None
    fewshot_seed: int = 1234
    fewshot_separator: str = "\n\n"
    target_delimiter: str = " "
    answer_context: str = "Answer:"  # acc_answer: P(choice | prompt) / P(choice | answer_context)
    until: list[str] = field(default_factory=lambda: ["\n"])
    max_gen_tokens: int = 32
    regex: str = LAST_NUMBER  # regex_match: the last match in the generation against the answers
    limit: int | None = None  # score only the first `limit` examples
    source: str = "<dict>"  # where the spec came from, for messages

    @classmethod
    def load(cls, spec: str | os.PathLike | dict, **overrides) -> "TaskSpec":
        """From a JSON spec file (paths in it are relative to the file), a dict (paths as given) or a
        TaskSpec; `overrides` that are not None replace fields (e.g. num_fewshot=5, limit=100)."""
        if isinstance(spec, TaskSpec):
            d, base, source = {k: v for k, v in dataclasses.asdict(spec).items() if k != "source"}, None, spec.source
        elif isinstance(spec, dict):
            d, base, source = dict(spec), None, "task spec " + repr(spec.get("name", "<unnamed>"))
        else:
            path = Path(spec)
            d = read_json_object(path, f"task spec {path} does not exist")
            base, source = path.parent, str(path)
        d.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TaskError(f"{source}: unknown field(s) {unknown}; a task spec has {sorted(known)}")
        missing = [k for k in ("name", "data") if k not in d]
        if missing:
            raise TaskError(f"{source}: missing field(s) {missing}")
        for key in ("data", "fewshot_data"):
            if d.get(key) is not None and base is not None and not Path(d[key]).is_absolute():
                d[key] = str(base / d[key])
        task = cls(**d, source=source)
        task._check()
        return task

    def _check(self) -> None:
        where = self.source
        if self.type not in TASK_TYPES:
            raise TaskError(f"{where}: unknown type {self.type!r}; choose one of {list(TASK_TYPES)}")
        if isinstance(self.until, str):
            self.until = [self.until]
        if not isinstance(self.until, list) or not all(isinstance(u, str) for u in self.until):
            raise TaskError(f"{where}: until must be a string or a list of strings, got {self.until!r}")
        if isinstance(self.metrics, str):
            self.metrics = [self.metrics]
        if self.metrics is not None and not (isinstance(self.metrics, list) and all(isinstance(m, str) for m in self.metrics)):
            raise TaskError(f"{where}: metrics must be a metric name or a list of them, got {self.metrics!r}")
        bad = sorted(set(self.metrics or ()) - set(METRICS[self.type]))
        if bad:
            raise TaskError(f"{where}: metric(s) {bad} do not apply to a {self.type} task; choose from {list(METRICS[self.type])}")
        if self.limit is not None and (not _is_int(self.limit) or self.limit < 1):
            raise TaskError(f"{where}: limit must be an integer >= 1 (or null for every example), got {self.limit!r}")
        if not _is_int(self.num_fewshot) or self.num_fewshot < 0:
            raise TaskError(f"{where}: num_fewshot must be an integer >= 0, got {self.num_fewshot!r}")
        if self.num_fewshot and not self.fewshot_data:
            raise TaskError(f"{where}: num_fewshot {self.num_fewshot} needs fewshot_data (a JSONL file of examples)")
        if self.type == "generate" and (not _is_int(self.max_gen_tokens) or self.max_gen_tokens < 1):
            raise TaskError(f"{where}: max_gen_tokens must be an integer >= 1, got {self.max_gen_tokens!r}")
        if not isinstance(self.regex, str):
            raise TaskError(f"{where}: regex must be a string (a regular expression), got {self.regex!r}")
        try:
            re.compile(self.regex)
        except re.error as e:
            raise TaskError(f"{where}: regex {self.regex!r} is not a valid regular expression ({e})") from None
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as e:
            raise TaskError(f"{where}: template {self.template!r} is not a valid format string ({e})") from None
        if any(not f.isidentifier() for f in fields):
            raise TaskError(f"{where}: template {self.template!r} may only name record fields, like {{question}}")

    @property
    def metric_names(self) -> list[str]:
        return list(self.metrics or METRICS[self.type])


@dataclass
class Example:
    file: str
    line: int  # 1-based line in `file`
    record: dict

    @property
    def where(self) -> str:
        return f"{self.file} line {self.line}"


def read_examples(path: str | os.PathLike, task: TaskSpec) -> list[Example]:
    """The examples of a JSONL task file, each checked against the task (fields, answer range)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{task.source}: task data {path} does not exist")
    examples = []
    try:
        for lineno, record in iter_jsonl(path, example='{"question": ..., "choices": [...], "answer": 0}'):
            ex = Example(str(path), lineno, record)
            _check_record(ex, task)
            examples.append(ex)
    except TaskError:
        raise
    except ValueError as e:  # a line that is not a JSON object: the same sentence, as a task error
        raise TaskError(str(e)) from None
    if not examples:
        raise TaskError(f"{path} holds no examples (task {task.name!r})")
    return examples


def _check_record(ex: Example, task: TaskSpec) -> None:
    r = ex.record
    _render(task.template, ex)  # the template's fields are present
    if task.type == "multiple_choice":
        for key in ("choices", "answer"):
            if key not in r:
                raise TaskError(f"{ex.where}: missing field {key!r} (a multiple-choice record has the "
                                f"template's fields, \"choices\" and \"answer\")")
        choices, answer = r["choices"], r["answer"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise TaskError(f"{ex.where}: \"choices\" must be a list of at least 2 non-empty strings, got {choices!r}")
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise TaskError(f"{ex.where}: \"answer\" must be the index of the right choice, got {answer!r}")
        if not 0 <= answer < len(choices):
            raise TaskError(f"{ex.where}: answer index {answer} is out of range for {len(choices)} choices")
    else:
        answers = _answers(ex)
        if not answers or not all(isinstance(a, str) for a in answers):
            raise TaskError(f"{ex.where}: \"answers\" must be a non-empty list of strings, got {answers!r}")


def _answers(ex: Example) -> list[str]:
    r = ex.record
    if "answers" in r:
        return r["answers"] if isinstance(r["answers"], list) else [r["answers"]]
    if "answer" in r:
        return [r["answer"]]
    raise TaskError(f"{ex.where}: missing field 'answers' (a generation record has the template's "
                    f"fields and \"answers\", a list of strings, or \"answer\", one string)")


def _render(template: str, ex: Example) -> str:
    try:
        return template.format_map(ex.record)
    except KeyError as e:
        raise TaskError(f"{ex.where}: missing field {e.args[0]!r} that the template {template!r} needs "
                        f"(the record has {sorted(ex.record)})") from None


def _target(ex: Example, task: TaskSpec) -> str:
    if task.type == "multiple_choice":
        return ex.record["choices"][ex.record["answer"]]
    return _answers(ex)[0]


def fewshot_examples(pool: Sequence[Example], k: int, seed: int, index: int, exclude: Example) -> list[Example]:
    """k examples of `pool` for the example at `index`, drawn with Random(f"{seed}:{index}") (the same
    prompt whatever else is evaluated), never one whose record equals the scored example's."""
    if k == 0:
        return []
    rng = random.Random(f"{seed}:{index}")
    drawn = [pool[i] for i in rng.sample(range(len(pool)), min(len(pool), k + 1))]
    shots = [e for e in drawn if e.record != exclude.record][:k]
    if len(shots) < k:  # duplicates of the scored example: draw from the rest
        rest = [e for e in pool if e.record != exclude.record]
        if len(rest) < k:
            raise TaskError(f"{exclude.where}: num_fewshot {k} needs {k} other examples in "
                            f"{pool[0].file if pool else 'the few-shot data'}, which has only {len(rest)}")
        shots = rng.sample(rest, k)
    return shots


def build_prompts(task: TaskSpec, examples: Sequence[Example], fewshot: Sequence[Example] = ()) -> list[str]:
    """The prompt of each example: its few-shot examples with their answers, then the example."""
    prompts = []
    for i, ex in enumerate(examples):
        shots = fewshot_examples(fewshot, task.num_fewshot, task.fewshot_seed, i, ex)
        parts = [_render(task.template, s) + task.target_delimiter + _target(s, task) for s in shots]
        prompts.append(task.fewshot_separator.join(parts + [_render(task.template, ex)]))
    return prompts


def load_task(spec, **overrides) -> tuple[TaskSpec, list[Example], list[str]]:
    """A task spec with its examples (at most `limit`) and their prompts."""
    task = TaskSpec.load(spec, **overrides)
    examples = read_examples(task.data, task)
    if task.limit is not None:
        examples = examples[:task.limit]
    fewshot = read_examples(task.fewshot_data, task) if task.num_fewshot else []
    return task, examples, build_prompts(task, examples, fewshot)


def _mean_stderr(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n)); None for one example."""
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return mean, None
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first of equal maxima, as numpy


def _check_fits(ex: Example, what: str, n_positions: int, max_len: int, task: TaskSpec) -> None:
    if n_positions > max_len:
        shots = f" with {task.num_fewshot} few-shot examples" if task.num_fewshot else ""
        raise TaskError(f"{ex.where}: the prompt{shots} and {what} need {n_positions} positions, more than "
                        f"the model's context of {max_len} tokens; shorten the example or lower num_fewshot")


def _score_multiple_choice(model, tokenizer, task, examples, prompts, batch_size, pbar,
                           shared_context: bool = True) -> list[dict]:
    max_len = _context_length(model)
    want_answer = "acc_answer" in task.metric_names
    per_example = []  # (requests for the prompt, requests for answer_context)
    for ex, prompt in zip(examples, prompts):
        conts = [task.target_delimiter + c for c in ex.record["choices"]]
        reqs = [encode_pair(tokenizer, prompt, c) for c in conts]
        for c, (ctx, cont) in zip(ex.record["choices"], reqs):
            _check_fits(ex, f"choice {c!r}", len(ctx) + len(cont) - 1, max_len, task)
            if not cont:
                raise TaskError(f"{ex.where}: choice {c!r} encodes to no tokens after the prompt")
        uncond = [encode_pair(tokenizer, task.answer_context, c) for c in conts] if want_answer else []
        for c, (ctx, cont) in zip(ex.record["choices"], uncond):
            _check_fits(ex, f"choice {c!r} after answer_context", len(ctx) + len(cont) - 1, max_len, task)
        per_example.append((reqs, uncond))
    records = []
    chunk = max(64, 4 * batch_size)  # examples per scoring call: the progress bar moves by whole examples
    for b in range(0, len(examples), chunk):
        part = per_example[b:b + chunk]
        flat = [r for reqs, uncond in part for r in reqs + uncond]
        scores = iter(loglikelihoods(model, flat, batch_size=batch_size, shared_context=shared_context))
        for ex, prompt, (reqs, uncond) in zip(examples[b:b + chunk], prompts[b:b + chunk], part):
            lls = [next(scores)[0] for _ in reqs]
            lls_u = [next(scores)[0] for _ in uncond]
            choices, gold = ex.record["choices"], ex.record["answer"]
            rec = {"line": ex.line, "prompt": prompt, "choices": choices, "answer": gold, "loglikelihoods": lls,
                   "acc": float(_argmax(lls) == gold),
                   # acc_norm divides by the choice's characters (lm-eval: len(choice), without the delimiter)
                   "acc_norm": float(_argmax([ll / len(c) for ll, c in zip(lls, choices)]) == gold)}
            if want_answer:
                rec["loglikelihoods_answer_context"] = lls_u
                rec["acc_answer"] = float(_argmax([a - u for a, u in zip(lls, lls_u)]) == gold)
            records.append(rec)
        pbar.update(len(part))
    return records


def _score_generate(model, tokenizer, task, examples, prompts, batch_size, pbar, shared_context: bool = True) -> list[dict]:
    max_len = _context_length(model)
    ids = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    for ex, t in zip(examples, ids):
        _check_fits(ex, f"max_gen_tokens {task.max_gen_tokens}", len(t) + task.max_gen_tokens, max_len, task)
    texts = greedy_generate(model, tokenizer, ids, task.max_gen_tokens, task.until, batch_size=batch_size, pbar=pbar)
    pattern = re.compile(task.regex)
    records = []
    for ex, prompt, text in zip(examples, prompts, texts):
        answers = _answers(ex)
        got = extract(text, pattern)
        gold = [extract(a, pattern) or a.strip() for a in answers]  # an answer without a match counts whole
        records.append({"line": ex.line, "prompt": prompt, "generation": text, "answers": answers,
                        "exact_match": float(normalize_answer(text) in {normalize_answer(a) for a in answers}),
                        "extracted": got, "regex_match": float(got is not None and got in gold)})
    return records


def evaluate_task(model, tokenizer, spec, *, batch_size: int = 16, records: bool = False, progress: bool = True,
                  shared_context: bool = True, **overrides) -> dict:
    """Score one task (a spec file, dict or TaskSpec): each metric, its standard error, n, and the
    per-example records when asked. `overrides` replace spec fields (num_fewshot=, limit=, ...).
    `shared_context=False` scores every choice as one full sequence (no KV cache: what a model
    sharded by FSDP can run)."""
    check_batch_size(batch_size)
    task, examples, prompts = load_task(spec, **overrides)
    pbar = tqdm(total=len(examples), unit="ex", desc=task.name, disable=not progress or _rank() != 0)
    t0 = time.perf_counter()
    score = _score_multiple_choice if task.type == "multiple_choice" else _score_generate
    recs = score(model, tokenizer, task, examples, prompts, batch_size, pbar, shared_context)
    pbar.close()
    seconds = time.perf_counter() - t0
    result = {"type": task.type, "data": task.data, "n": len(recs), "num_fewshot": task.num_fewshot}
    for m in task.metric_names:
        result[m], result[f"{m}_stderr"] = _mean_stderr([r[m] for r in recs])
    result.update(seconds=seconds, examples_per_s=len(recs) / seconds if seconds > 0 else None)
    if records:
        result["examples"] = recs
    return result


def evaluate_tasks(model, tokenizer, task_specs: Sequence, *, batch_size: int = 16, records: bool = False,
                   progress: bool = True, shared_context: bool = True, **overrides) -> dict:
    """{task name: results} for each task spec (JSON spec path, dict or TaskSpec); see evaluate_task."""
    if isinstance(task_specs, (str, os.PathLike, dict, TaskSpec)):
        task_specs = [task_specs]
    if not task_specs:
        raise ValueError("no tasks to evaluate: give at least one task spec")
    results = {}
    for spec in task_specs:
        name = TaskSpec.load(spec).name
        if name in results:
            raise TaskError(f"two tasks are named {name!r}; task names must be distinct")
        results[name] = evaluate_task(model, tokenizer, spec, batch_size=batch_size, records=records,
                                      progress=progress, shared_context=shared_context, **overrides)
    return results


def write_results(results: dict, path: str | os.PathLike) -> Path:
    """Write `results` as indented JSON (atomically: a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
