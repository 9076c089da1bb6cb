"""Fine-tuning data: Alpaca instructions, Llama 2 chats and plain documents, as token ids with a loss
mask, and a loader that batches them by length.

Record formats (files: .jsonl / .jsonl.gz one record a line, .json an array of records or one record,
any other file one plain document):
- Alpaca: {"instruction", "input" (optional, may be ""), "output"}, rendered with Stanford Alpaca's
  two prompt templates; the target is `output` then eos (the text is encoded whole: bos + prompt +
  output, + eos).
- chat: {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}, rendered in Llama 2's
  chat format (llama/chat.py): every (user, assistant) pair is bos ... eos; the targets are the
  assistant answers and their eos. The last message must be the assistant's.
- documents: {"text"} (or a whole non-JSON file) for continued pretraining: bos + text + eos, every
  token a target; a document longer than the context is cut into windows of seq_len + 1 tokens at
  stride seq_len (every token but the first is a target once).
Loss only on the targets unless `train_on_input`. Bad records (invalid JSON, missing or mistyped
fields, wrong role order) are errors naming file and line, or with on_bad="skip" counted skips; an
instruction or chat example longer than seq_len + 1 tokens is a counted skip (on_too_long="error" to
stop instead). Skips are reported with file and line (a warning, and `InstructData.skipped`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from llama.chat import encode_dialog_for_training, encode_with_mask
from llama.data.loader import permute
from llama.data.prepare import is_val, json_lines, list_files

IGNORE = -100  # targets that carry no loss (F.cross_entropy's default ignore_index)
FORMATS = ("auto", "alpaca", "chat", "documents")

# Stanford Alpaca's PROMPT_DICT: the response follows "### Response:" directly.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


class RecordError(ValueError):
    """A record that cannot be turned into an example; the message names no location (added later)."""


@dataclass
class Example:
    ids: np.ndarray  # (n,) int32 token ids, bos first
    mask: np.ndarray  # (n,) bool: token i is a loss target (predicted from ids[:i])
    where: str  # "file:line"


def alpaca_prompt(record: dict) -> str:
    """Stanford Alpaca's prompt for a record (the no-input template when "input" is missing or "")."""
    for k in ("instruction", "output"):
        if not isinstance(record.get(k), str):
            raise RecordError(f'an Alpaca record needs string fields "instruction" and "output" ("input" '
                              f'optional); {k!r} is {"missing" if k not in record else type(record[k]).__name__}')
    inp = record.get("input", "")
    if not isinstance(inp, str):
        raise RecordError(f'"input" must be a string, got {type(inp).__name__}')
    if inp:
        return ALPACA_PROMPT_WITH_INPUT.format_map({"instruction": record["instruction"], "input": inp})
    return ALPACA_PROMPT_NO_INPUT.format_map({"instruction": record["instruction"]})


def record_format(record) -> str:
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "documents"
    raise RecordError(f"cannot tell the record's format from its keys {sorted(record)}: expected "
                      '"instruction"/"output" (Alpaca), "messages" (chat) or "text" (document)')


def encode_record(tokenizer, record, fmt: str = "auto", train_on_input: bool = False) -> tuple[list[int], list[bool]]:
    """(ids, is_target) of one record. Raises RecordError for a bad record."""
    if fmt == "auto":
        fmt = record_format(record)
    elif not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        ids, mask = encode_with_mask(tokenizer, alpaca_prompt(record), record["output"])
    elif fmt == "chat":
        try:
            ids, mask = encode_dialog_for_training(tokenizer, record.get("messages"))
        except ValueError as e:
            raise RecordError(f'"messages": {e}') from None
    elif fmt == "documents":
        if not isinstance(record.get("text"), str):
            raise RecordError('a document record needs a string field "text"')
        if not record["text"]:
            raise RecordError("the document is empty")
        ids = tokenizer.encode(record["text"], bos=True, eos=True)
        mask = [True] * len(ids)
    else:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {FORMATS}")
    if train_on_input:
        mask = [True] * len(ids)
    mask[0] = False  # bos is never predicted
    return ids, mask


def _open(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, record) of a .jsonl(.gz) file (blank lines skipped), a .json file (an array of
    records or one record; each with the line it starts on), or any other file as one {"text"}
    document. Invalid JSON or an empty file is a ValueError naming the file (and line)."""
    path = Path(path)
    n = 0
    try:
        with _open(path) as f:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                for lineno, record in json_lines(f, path):  # any JSON value: non-objects are counted skips later
                    n += 1
                    yield lineno, record
            elif path.name.endswith((".json", ".json.gz")):
                for lineno, record in _json_array_items(f.read(), path):
                    n += 1
                    yield lineno, record
            else:
                text = f.read()
                if text:
                    n += 1
                    yield 1, {"text": text}
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if n == 0:
        raise ValueError(f"{path} holds no records (the file is empty)")


def _json_array_items(text: str, path: Path) -> Iterator[tuple[int, object]]:
    """Items of a JSON array (or a lone object) with the line each starts on."""
    dec = json.JSONDecoder()

    def skip_ws(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i, msg):
        raise ValueError(f"{path}:{text.count(chr(10), 0, i) + 1} is not valid JSON ({msg}); a .json "
                         "data file holds an array of records") from None

    i = skip_ws(0)
    if i == len(text):
        return
    if text[i] != "[":
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            fail(e.pos, e.msg)
        if skip_ws(end) != len(text):
            fail(end, "extra data after the record")
        yield text.count("\n", 0, i) + 1, obj
        return
    i, line, counted = skip_ws(i + 1), 1, 0  # line numbers counted incrementally (large files)
    if i < len(text) and text[i] == "]":
        return
    while True:
        line += text.count("\n", counted, i)
        counted = i
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            fail(e.pos, e.msg)
        yield line, obj
        i = skip_ws(i)
        if i < len(text) and text[i] == ",":
            i = skip_ws(i + 1)
        elif i < len(text) and text[i] == "]":
            if skip_ws(i + 1) != len(text):
                fail(i + 1, "extra data after the array")
            return
        else:
            fail(i, "expected ',' or ']' after an array item")


@dataclass
class InstructData:
    """Examples read from files: `train`, `val` (held out by a seeded hash of each record) and the
    records skipped, as (where, why)."""

    train: list[Example] = field(default_factory=list)
    val: list[Example] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_records: int = 0

    def summary(self, limit: int = 5) -> str:
        n_tok = sum(len(e.ids) for e in self.train)
        n_tgt = sum(int(e.mask.sum()) for e in self.train)
        s = (f"{self.n_records} records -> {len(self.train)} train / {len(self.val)} val examples; "
             f"train: {n_tok} tokens, {n_tgt} targets ({n_tgt / max(n_tok, 1):.0%})")
        if self.skipped:
            s += f"; skipped {len(self.skipped)}: " + "; ".join(f"{w} ({why})" for w, why in self.skipped[:limit])
            if len(self.skipped) > limit:
                s += f"; and {len(self.skipped) - limit} more"
        return s


def load_instruct(inputs, tokenizer, seq_len: int, *, format: str = "auto", train_on_input: bool = False,
                  val_fraction: float = 0.0, seed: int = 0, on_bad: str = "error", on_too_long: str = "skip",
                  progress: bool = True) -> InstructData:
    """Read and tokenize fine-tuning data (files, directories or globs; see the module docstring).

    An example must fit seq_len + 1 tokens (seq_len inputs, seq_len targets); documents are cut into
    such windows instead. on_bad / on_too_long: "error" or "skip" (counted, reported with file and
    line). Raises if nothing usable is left.
    """
    from tqdm import tqdm

    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {FORMATS}")
    for name, v in (("on_bad", on_bad), ("on_too_long", on_too_long)):
        if v not in ("error", "skip"):
            raise ValueError(f"{name} must be 'error' or 'skip', got {v!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    files = list_files(inputs)
    data = InstructData()
    bar = tqdm(desc="tokenizing examples", unit=" records", disable=not progress)
    for path in files:
        for lineno, record in read_records(path):
            where = f"{path}:{lineno}"
            data.n_records += 1
            bar.update()
            try:
                fmt = record_format(record) if format == "auto" else format
                ids, mask = encode_record(tokenizer, record, fmt, train_on_input)
            except RecordError as e:
                if on_bad == "error":
                    raise ValueError(f"{where}: {e}") from None
                data.skipped.append((where, str(e)))
                continue
            held_out = is_val(json.dumps(record, sort_keys=True), val_fraction, seed)
            split = data.val if held_out else data.train
            ids, mask = np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)
            if len(ids) <= seq_len + 1:
                split.append(Example(ids, mask, where))
            elif fmt == "documents":  # windows of seq_len + 1 at stride seq_len
                for lo in range(0, len(ids) - 1, seq_len):
                    w_mask = mask[lo:lo + seq_len + 1].copy()
                    w_mask[0] = False  # the window's first token is input only
                    split.append(Example(ids[lo:lo + seq_len + 1], w_mask, where))
            elif on_too_long == "error":
                raise ValueError(f"{where}: the example has {len(ids)} tokens, more than seq_len + 1 = "
                                 f"{seq_len + 1}; raise seq_len or pass on_too_long='skip'")
            else:
                data.skipped.append((where, f"{len(ids)} tokens > seq_len + 1 = {seq_len + 1}"))
    bar.close()
    if data.skipped:
        warnings.warn(f"fine-tuning data: {data.summary()}", stacklevel=2)
    if not data.train:
        raise ValueError(f"no usable training examples in {[str(f) for f in files]}: {data.summary()}")
    return data


def _epoch_key(seed: int, epoch: int) -> np.uint64:
    h = hashlib.blake2b(f"instruct:{seed}:{epoch}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(h, "little"))


class InstructLoader:
    """Batches of (inputs, targets), int64 (batch_size, T), from examples of different lengths.

    T is the longest example of the batch (minus one) rounded up to `pad_multiple`, at most seq_len;
    rows are right-padded: inputs with `pad_id`, targets with -100 (IGNORE), so with causal
    attention a row's real tokens never see its padding and no attention mask is needed.
    Length grouping keeps padding low: each epoch shuffles the examples (a keyed permutation of
    (seed, epoch)), cuts that order into groups of `group_size` and sorts each group by length,
    longest first; batches take consecutive samples. Sample g of the run is a pure function of
    (seed, g), so as with PackedLoader rank r of dp_size takes rows G + r * batch_size + j of the
    global batch, a 1-rank run with micro-batches sees the same rows, and `state_dict()` resumes
    exactly. `padding_share` reports the share of padded positions in the batches given so far.
    """

    def __init__(self, examples: list[Example], seq_len: int, batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, pad_id: int = 0, pad_multiple: int = 8,
                 group_size: int = 256):
        if not examples:
            raise ValueError("InstructLoader needs at least one example")
        if seq_len < 1 or batch_size < 1 or pad_multiple < 1 or group_size < 1:
            raise ValueError(f"seq_len, batch_size, pad_multiple and group_size must be >= 1, got "
                             f"{seq_len}, {batch_size}, {pad_multiple}, {group_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        too_long = [e.where for e in examples if len(e.ids) > seq_len + 1]
        if too_long:
            raise ValueError(f"{len(too_long)} example(s) exceed seq_len + 1 = {seq_len + 1} tokens, the first "
                             f"from {too_long[0]}; load them with the same seq_len")
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.pad_id, self.pad_multiple, self.group_size = pad_id, pad_multiple, group_size
        self.lengths = np.array([len(e.ids) for e in examples], dtype=np.int64)
        self.samples = 0  # G: samples of the global stream consumed
        self.positions = 0  # input positions this rank's batches held so far, and how many were padding
        self.padding = 0
        self._order_epoch, self._order = -1, None
        self._fingerprint = None

    @property
    def n_examples(self) -> int:
        return len(self.examples)

    @property
    def epoch(self) -> float:
        return self.samples / self.n_examples

    @property
    def padding_share(self) -> float:
        return self.padding / self.positions if self.positions else 0.0

    def fingerprint(self) -> str:
        """A hash of the examples' tokens and masks: a resumed loader must hold the same data."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=8)
            for e in self.examples:
                h.update(e.ids.tobytes())
                h.update(np.packbits(e.mask).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            n = self.n_examples
            order = permute(np.arange(n), n, _epoch_key(self.seed, epoch))
            for lo in range(0, n, self.group_size):  # longest first within each group (stable)
                grp = order[lo:lo + self.group_size]
                order[lo:lo + self.group_size] = grp[np.argsort(-self.lengths[grp], kind="stable")]
            self._order_epoch, self._order = epoch, order
        return self._order

    def example_index(self, g: int) -> int:
        epoch, i = divmod(g, self.n_examples)
        return int(self._epoch_order(epoch)[i])

    def collate(self, rows: list[Example | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad examples (None: an empty row, all targets ignored) into (inputs, targets)."""
        longest = max([len(e.ids) - 1 for e in rows if e is not None] or [1])
        width = min(self.seq_len, -(-longest // self.pad_multiple) * self.pad_multiple)
        inputs = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        targets = np.full((len(rows), width), IGNORE, dtype=np.int64)
        real = 0
        for r, e in enumerate(rows):
            if e is None:
                continue
            n = len(e.ids) - 1
            inputs[r, :n] = e.ids[:-1]
            targets[r, :n] = np.where(e.mask[1:], e.ids[1:], IGNORE)
            real += n
        self.positions += inputs.size
        self.padding += inputs.size - real
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo = self.samples + self.dp_rank * self.batch_size
        rows = [self.examples[self.example_index(g)] for g in range(lo, lo + self.batch_size)]
        self.samples += self.batch_size * self.dp_size
        return self.collate(rows)

    __next__ = next

    def __iter__(self):
        return self

    def iter_eval(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every example once (sorted by length, to pad little), in global batches: rank r takes rows
        r * batch_size ... of each. The last global batch is filled up with empty rows whose targets
        are all ignored, so sum the loss over targets and divide by their count. At most
        `max_batches`. Independent of the loader's state (and leaves padding_share alone)."""
        order = np.argsort(-self.lengths, kind="stable")
        global_batch = self.batch_size * self.dp_size
        n_batches = -(-len(order) // global_batch)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        saved = self.positions, self.padding
        for b in range(n_batches):
            lo = b * global_batch + self.dp_rank * self.batch_size
            idx = order[lo:lo + self.batch_size]
            rows = [self.examples[i] for i in idx] + [None] * (self.batch_size - len(idx))
            batch = self.collate(rows)
            self.positions, self.padding = saved
            yield batch

    def state_dict(self) -> dict:
        return {"samples": self.samples, "seed": self.seed, "n_examples": self.n_examples,
                "fingerprint": self.fingerprint(), "positions": self.positions, "padding": self.padding}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position: the batch size and dp size may differ from the saving run's,
        the data and seed may not."""
        mine = {"seed": self.seed, "n_examples": self.n_examples}
        for k, v in mine.items():
            if state.get(k) != v:
                raise ValueError(f"loader state has {k}={state.get(k)!r} but this loader has {v!r}; "
                                 "resume with the same data and seed")
        if state.get("fingerprint") != self.fingerprint():
            raise ValueError("loader state was saved for different examples (their tokens differ): "
                             "resume with the same data files, tokenizer and seq_len")
        self.samples = int(state["samples"])
        self.positions, self.padding = int(state.get("positions", 0)), int(state.get("padding", 0))
