"""Preparing text for training: documents from files, a tokenizer with the paper's recipe, and
tokenized, memory-mapped token shards.

On disk, a prepared dataset is a directory:
    meta.json            written last: tokenizer sha256, dtype, per split n_tokens / n_docs / shards
    train_00000.bin ...  the train token stream, raw uint16 (n_words <= 65536) or uint32
    val_00000.bin ...    the held-out stream (documents picked by a seeded hash of their text)
Each document is stored as [bos] + encode(text) + [eos], documents back to back.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import sys
import zlib
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from llama.env import DirLock, DiskFullError, atomic_write_bytes, free_bytes, is_disk_full
from llama.tokenizer import N_BYTES, N_SPECIAL, Tokenizer

META = "meta.json"
FORMAT = "llama-tokens-v1"
TEXT_SUFFIXES = (".jsonl", ".jsonl.gz")
# a file is taken for binary when the head read here holds a NUL byte, or more than this share of
# its bytes are not UTF-8: text in another encoding stays well below it (accented Latin-1 prose
# ~5-10%), random bytes are ~50%
BINARY_SNIFF_BYTES = 1 << 20
BINARY_BAD_SHARE = 0.25

# --- reading documents -------------------------------------------------------------------------


def list_files(inputs) -> list[Path]:
    """Files named by a path, a directory (every non-hidden file below it) or a glob, or a list of
    those; sorted within each entry, duplicates dropped. Raises FileNotFoundError for an entry that
    names nothing."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file()
                           and not any(part.startswith(".") for part in q.relative_to(p).parts))
        else:
            found = sorted(Path(q) for q in glob.glob(str(item), recursive=True) if Path(q).is_file())
        if not found:
            raise FileNotFoundError(f"data input {item} matches no file")
        files += [f for f in found if f not in files]
    if not files:
        raise FileNotFoundError("no data inputs given: pass files, directories or globs")
    return files


def binary_reason(path: str | os.PathLike) -> str | None:
    """Why `path` (decompressed if .gz) does not look like text, judged on its first
    BINARY_SNIFF_BYTES: a NUL byte, or more than BINARY_BAD_SHARE of the bytes not UTF-8; None if
    it looks like text."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            head = f.read(BINARY_SNIFF_BYTES)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        return f"not a readable gzip file: {e}"
    nul = head.find(b"\0")
    if nul >= 0:
        return f"a NUL byte at offset {nul}"
    # bytes dropped by decoding are the undecodable ones (up to 3 of a character cut by the sample's end)
    bad = len(head) - len(head.decode("utf-8", errors="ignore").encode("utf-8"))
    if head and bad / len(head) > BINARY_BAD_SHARE:
        return f"{bad / len(head):.0%} of its first {len(head):,} bytes are not UTF-8"
    return None


def text_files(files: list[Path], skip_binary: bool = False) -> tuple[list[Path], list[Path]]:
    """(text files, skipped binary files) of `files`. A binary file is an error naming it unless
    `skip_binary`, when it is left out and counted (and the count printed)."""
    kept, skipped = [], []
    for f in files:
        why = binary_reason(f)
        if why is None:
            kept.append(f)
        elif skip_binary:
            skipped.append(f)
        else:
            raise ValueError(f"{f} is not text ({why}): remove it from the inputs, or pass skip_binary=True "
                             f"(--skip_binary) to skip such files")
    if skipped:
        print(f"skipped {len(skipped)} binary file(s), e.g. {skipped[0]}", file=sys.stderr, flush=True)
    return kept, skipped


def _open_text(path: Path):
    # bytes that are not UTF-8 become U+FFFD (as when training the tokenizer) rather than stopping
    # a long preparation on one odd file
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def json_lines(f, path: Path, hint: str = "") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of the open text file `f`; a line that is
    not JSON is a ValueError naming `path` and the line (then `hint`)."""
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg}){hint}") from None


def iter_jsonl(path: Path, example: str = '{"text": "..."}') -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a .jsonl(.gz) file; a line that is not a
    JSON object is a ValueError naming the file and line (`example` shows what a line should be)."""
    with _open_text(Path(path)) as f:
        for lineno, record in json_lines(f, path, f"; each line of a .jsonl file must be an object like {example}"):
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno} holds a JSON {type(record).__name__}; each line of a .jsonl "
                                 f"file must be an object like {example}")
            yield lineno, record


def iter_documents(path: Path) -> Iterator[str]:
    """Documents of one file: each line's "text" field for .jsonl(.gz), the whole file otherwise."""
    path = Path(path)
    try:
        if path.name.endswith(TEXT_SUFFIXES):
            for lineno, record in iter_jsonl(path):
                if not isinstance(record.get("text"), str):
                    raise ValueError(f'{path}:{lineno} has no "text" string field; each line of '
                                     'a .jsonl file must be an object like {"text": "..."}')
                yield record["text"]
        else:
            with _open_text(path) as f:
                yield f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def token_dtype(n_words: int):
    """The smallest unsigned dtype holding ids 0 .. n_words - 1."""
    return np.uint16 if n_words <= 1 << 16 else np.uint32


def is_val(text: str, val_fraction: float, seed: int) -> bool:
    """Whether a document goes to the validation split: a seeded hash of its text, so the choice is
    stable across runs, worker counts and input order."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                        key=seed.to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") < val_fraction * 2.0**64


# --- preparing a dataset ------------------------------------------------------------------------

_worker_tok = None


def _init_worker(tokenizer_path: str):
    global _worker_tok
    _worker_tok = Tokenizer(tokenizer_path)


def _encode_chunk(args) -> tuple[np.ndarray, np.ndarray, int, int]:
    """[docs] -> (train tokens, val tokens, n_train_docs, n_val_docs), in document order."""
    docs, dtype, val_fraction, seed = args
    tok = _worker_tok
    out = {False: [], True: []}
    for text in docs:
        out[is_val(text, val_fraction, seed)].append(tok.encode(text, bos=True, eos=True))
    arrays = [np.array([i for ids in out[v] for i in ids], dtype=dtype) for v in (False, True)]
    return arrays[0], arrays[1], len(out[False]), len(out[True])


class _ShardWriter:
    """Appends tokens to <split>_00000.bin, <split>_00001.bin, ... of at most shard_tokens each."""

    def __init__(self, root: Path, split: str, dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self.f = None
        self.n_docs = 0

    def write(self, tokens: np.ndarray):
        while len(tokens):
            if self.f is None or self.shards[-1]["n_tokens"] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["n_tokens"]
            part, tokens = tokens[:room], tokens[room:]
            self.f.write(part.astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["n_tokens"] += len(part)

    def _next_shard(self):
        self._close_file()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.f = open(self.root / name, "wb")
        self.shards.append({"file": name, "n_tokens": 0})

    def _close_file(self):
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())  # on disk before meta.json says the dataset is complete
            self.f.close()
            self.f = None

    def close(self) -> dict:
        self._close_file()
        return {"n_tokens": sum(s["n_tokens"] for s in self.shards), "n_docs": self.n_docs,
                "shards": self.shards}


def _ordered_map(pool, fn, jobs, max_pending: int) -> Iterator:
    """pool.imap with back-pressure: results in job order (so the output does not depend on the
    worker count), at most max_pending chunks in flight (imap would read the whole corpus ahead)."""
    pending = deque()
    for job in jobs:
        pending.append(pool.apply_async(fn, (job,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _chunks(files: list[Path], docs_per_chunk: int, chars_per_chunk: int) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for f in files:
        for text in iter_documents(f):
            if not text:
                continue
            chunk.append(text)
            chars += len(text)
            if len(chunk) >= docs_per_chunk or chars >= chars_per_chunk:
                yield chunk
                chunk, chars = [], 0
    if chunk:
        yield chunk


def prepare_data(inputs, tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 val_fraction: float = 0.01, seed: int = 0, num_workers: int | None = None,
                 shard_tokens: int = 1 << 30, overwrite: bool = False, progress: bool = True,
                 docs_per_chunk: int = 256, skip_binary: bool = False) -> dict:
    """Tokenize text files / JSONL (a "text" field per line) / directories / globs into `out_dir`.

    Output is identical for any `num_workers` (chunks are encoded in a pool, written in order).
    Everything is written into a temporary directory next to `out_dir`, meta.json last, then
    renamed into place, so an interrupted run never leaves a dataset that looks complete. A lock
    on the destination refuses a second preparation into it while this one runs.

    Every input is checked for binary content first (`binary_reason`): an error naming the file,
    or with `skip_binary` left out and counted (meta["skipped_binary"]). Returns the metadata dict.
    """
    tok = Tokenizer(tokenizer_path)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    files, skipped = text_files(list_files(inputs), skip_binary)
    if not files:
        raise ValueError(f"every input is binary ({len(skipped)} file(s) skipped, e.g. {skipped[0]}): no text to prepare")
    out = Path(out_dir)
    with DirLock(out, "data preparation", lock_file=out.parent / f".{out.name}.lock"):
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists: pass overwrite=True (--overwrite) to replace it, or "
                                  "choose another out_dir")
        return _prepare(files, skipped, tok, out, val_fraction, seed, num_workers, shard_tokens, progress,
                        docs_per_chunk)


def _prepare(files, skipped, tok, out: Path, val_fraction, seed, num_workers, shard_tokens, progress,
             docs_per_chunk) -> dict:
    dtype = token_dtype(tok.n_words)
    num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    pool = None
    try:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        jobs = ((docs, dtype, val_fraction, seed)
                for docs in _chunks(files, docs_per_chunk, chars_per_chunk=4 << 20))
        if num_workers > 1:
            pool = multiprocessing.get_context().Pool(num_workers, _init_worker, (str(tok.model_path),))
            results = _ordered_map(pool, _encode_chunk, jobs, max_pending=4 * num_workers)
        else:
            _init_worker(str(tok.model_path))
            results = map(_encode_chunk, jobs)
        bar = tqdm(desc=f"tokenizing {out.name}", unit=" docs", disable=not progress)
        n_tokens = 0
        for train_ids, val_ids, n_train, n_val in results:
            writers["train"].write(train_ids)
            writers["val"].write(val_ids)
            writers["train"].n_docs += n_train
            writers["val"].n_docs += n_val
            n_tokens += len(train_ids) + len(val_ids)
            bar.update(n_train + n_val)
            bar.set_postfix(tokens=f"{n_tokens:,}", refresh=False)
        bar.close()
        splits = {s: w.close() for s, w in writers.items()}
        if splits["train"]["n_docs"] + splits["val"]["n_docs"] == 0:
            raise ValueError(f"no documents found in {[str(f) for f in files]}: the inputs are empty")
        meta = {
            "format": FORMAT, "tokenizer_sha256": tok.sha256, "tokenizer_path": str(tok.model_path),
            "n_words": tok.n_words, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "dtype": np.dtype(dtype).name, "val_fraction": val_fraction, "seed": seed,
            "sources": [str(f) for f in files], "splits": splits,
            "skipped_binary": [str(f) for f in skipped],
        }
        with open(tmp / META, "w") as f:
            f.write(json.dumps(meta, indent=1))
            f.flush()
            os.fsync(f.fileno())
        if out.exists():  # overwrite: move the old one aside only now that the new one is complete
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
        return meta
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise DiskFullError(out.parent, None, free_bytes(out.parent)) from None
        raise
    finally:
        if pool is not None:
            pool.terminate()



# --- a tokenizer with the paper's recipe ----------------------------------------------------------


def _iter_texts(inputs, skip_binary: bool = False, skipped: list | None = None) -> Iterator[str]:
    """Texts from a path or glob, or an iterable whose items are paths/globs or texts.

    A top-level str is always a path or glob; inside an iterable, a str that names an existing
    file/dir or a glob matching something is read as a path, any other str is a text. A binary
    file is an error naming it, or with `skip_binary` appended to `skipped` and not read.
    """
    if isinstance(inputs, (str, os.PathLike)):
        paths = _expand(inputs)
        if not paths:
            raise FileNotFoundError(f"tokenizer training input {inputs} matches no file")
        inputs = paths
    for item in inputs:
        paths = _expand(item) if isinstance(item, os.PathLike) or (
            isinstance(item, str) and len(item) < 4096 and "\n" not in item) else []
        if isinstance(item, os.PathLike) and not paths:
            raise FileNotFoundError(f"tokenizer training input {item} matches no file")
        if not paths:
            yield item
        paths, passed_over = text_files(paths, skip_binary)
        if skipped is not None:
            skipped += passed_over
        for f in paths:
            if f.name.endswith((".jsonl", ".jsonl.gz")):  # one document per line, its "text"
                yield from iter_documents(f)
            else:  # line by line: a big file need not fit in memory (lines are the unit anyway)
                opener = gzip.open if f.name.endswith(".gz") else open
                with opener(f, "rt", encoding="utf-8", errors="replace") as fh:
                    yield from fh


def _expand(item) -> list[Path]:
    """Files named by a path, a directory (all files below it) or a glob; [] if none."""
    if not str(item):
        return []
    p = Path(item)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file()
                      and not any(part.startswith(".") for part in q.relative_to(p).parts))
    if any(c in str(item) for c in "*?["):
        return sorted(Path(q) for q in glob.glob(str(item), recursive=True) if Path(q).is_file())
    return []


def train_tokenizer(inputs, out_path: str | os.PathLike, vocab_size: int = 32000, *,
                    input_sentence_size: int = 2_000_000, seed: int = 0,
                    character_coverage: float | None = None, num_threads: int | None = None,
                    max_sentence_length: int = 16384, verbose: bool = False, skip_binary: bool = False) -> Path:
    """Train a SentencePiece BPE tokenizer with the LLaMA paper's recipe and Meta's ids.

    inputs: a file, directory or glob, a list of them, or an iterable of strings (documents);
    .jsonl(.gz) files give each line's "text" field, any other file is one document.
    Documents are split into lines (sentencepiece's sentences; newlines themselves become byte
    pieces, as in Meta's model); at most `input_sentence_size` lines, sampled with `seed`, are
    used, so training is deterministic. A binary input file is an error naming it, or with
    `skip_binary` skipped (the count printed). Writes `out_path` atomically and returns it.
    """
    min_vocab = N_SPECIAL + N_BYTES + 1
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-fallback tokenizer needs "
                         f"{N_SPECIAL} special + {N_BYTES} byte pieces + at least one more, i.e. "
                         f">= {min_vocab}")
    # Reservoir-sample the lines ourselves (seeded) so the result does not depend on file order
    # of reading nor on sentencepiece's own sampler; keep the original order of the kept lines.
    rng = random.Random(seed)
    kept: list[tuple[int, str]] = []
    n = 0
    for text in _iter_texts(inputs, skip_binary):
        for line in text.split("\n"):
            if not line:
                continue
            if len(kept) < input_sentence_size:
                kept.append((n, line))
            else:
                j = rng.randrange(n + 1)
                if j < input_sentence_size:
                    kept[j] = (n, line)
            n += 1
    if not kept:
        raise ValueError("no text to train the tokenizer on: the inputs are empty")
    kept.sort()
    lines = [line for _, line in kept]
    if character_coverage is None:
        # Meta's 0.99995 keeps rare characters as pieces; with a small vocabulary rare characters
        # would crowd out merges, so cover less and let the rest fall back to bytes.
        character_coverage = 0.99995 if vocab_size >= 8000 else 0.9995

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", split_digits=True, byte_fallback=True,
            normalization_rule_name="identity", add_dummy_prefix=True,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_by_unicode_script=True, split_by_whitespace=True, max_sentencepiece_length=16,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_surface=" \u2047 ",
            character_coverage=character_coverage, hard_vocab_limit=True,
            input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=0 if verbose else 2)
    except RuntimeError as e:
        if "required_chars" in str(e):
            raise ValueError(
                f"vocab_size {vocab_size} cannot hold the {N_SPECIAL + N_BYTES} special/byte pieces "
                f"plus every character that character_coverage={character_coverage} keeps "
                f"(sentencepiece: {str(e).split('] ')[-1]}); raise vocab_size or lower "
                "character_coverage") from None
        raise ValueError(f"sentencepiece could not train a {vocab_size}-piece tokenizer on "
                         f"{len(lines)} lines: {e}. Use more (varied) text or a different "
                         "vocab_size (it must fit the characters kept by character_coverage "
                         "plus 259 byte/special pieces, and the text must allow that many merges)."
                         ) from None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(model.getvalue(), out)
    return out
