"""SentencePiece tokenizer with Meta's LLaMA conventions, and the paper's recipe to train one.

Meta's tokenizer.model: BPE, digits split into single pieces, unknown UTF-8 falls back to the
256 byte pieces <0x00>..<0xFF> (ids 3..258), unk 0 `<unk>`, bos 1 `<s>`, eos 2 `</s>`, no pad.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import os
import random
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

SPACE_MARK = "\u2581"  # sentencepiece writes spaces as this character inside pieces
N_SPECIAL = 3  # <unk> <s> </s>
N_BYTES = 256


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer:
    """A SentencePiece model (e.g. Meta's tokenizer.model): `encode(s, bos, eos)`, `decode(ids)`.

    Round-trips any Unicode string exactly: `decode(encode(s, bos, eos)) == s`. The one character
    sentencepiece cannot keep apart from a space, U+2581, is encoded as its three UTF-8 byte
    pieces (Meta's tokenizer turns it into a space); every other string gets Meta's ids.
    """

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} does not exist: pass the path of a "
                                    "sentencepiece tokenizer.model (or train one with "
                                    "scripts/train_tokenizer.py)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with a C++ message
            raise ValueError(f"{path} is not a valid sentencepiece model ({e})") from None
        self.model_path = path
        self.sha256 = _sha256(path)
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        # byte piece ids, when the model has byte fallback (Meta's does): byte b -> id
        self._byte_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in range(N_BYTES)]
        self.byte_fallback = all(self.sp.is_byte(i) for i in self._byte_ids)

    def __repr__(self):
        return f"Tokenizer({str(self.model_path)!r}, n_words={self.n_words})"

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a bad decode upstream
            raise ValueError(f"cannot encode {s[max(0, e.start - 10):e.end + 10]!r}: it is not valid Unicode "
                             f"({e.reason} at index {e.start}); decode the source text with errors='replace'") from None
        ids = self._encode_text(s)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def _encode_text(self, s: str) -> list[int]:
        if SPACE_MARK not in s or not self.byte_fallback:
            return self.sp.encode(s)
        # Swap U+2581 for a placeholder absent from the text and the vocabulary, so it falls back
        # to its own 3 byte pieces, then swap those for the bytes of U+2581. A run of the
        # placeholder's byte ids can only come from the placeholder (UTF-8 self-synchronises);
        # the count check catches a placeholder that some piece contains.
        dst = [self._byte_ids[b] for b in SPACE_MARK.encode("utf-8")]
        for placeholder in map(chr, range(0xFDD0, 0xFDF0)):  # Unicode noncharacters
            if placeholder in s:
                continue
            src = [self._byte_ids[b] for b in placeholder.encode("utf-8")]
            ids = self.sp.encode(s.replace(SPACE_MARK, placeholder))
            out, i, n = [], 0, 0
            while i < len(ids):
                if ids[i:i + 3] == src:
                    out += dst
                    i, n = i + 3, n + 1
                else:
                    out.append(ids[i])
                    i += 1
            if n == s.count(SPACE_MARK):
                return out
        return self.sp.encode(s)  # unreachable in practice: Meta's behaviour, U+2581 -> space

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_words]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for a tokenizer of {self.n_words} "
                             f"pieces ({self.model_path})")
        # byte pieces decode to their bytes, so the byte pieces of U+2581 give back U+2581
        return self.sp.decode(ids)


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces for streaming generation.

    `push(id)` returns the new text that the ids so far determine: nothing while a multi-byte
    character is still split over byte-fallback pieces, and the leading space of a word piece is
    kept (decoding ids one by one would drop it). `flush()` returns what is left at the end.
    Joining everything returned equals `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip: Iterable[int] = ()):
        self.tok = tokenizer
        self.ids: list[int] = [i for i in skip]  # context already shown (e.g. the prompt)
        self.prefix = 0  # ids[prefix:read] decode to text already emitted
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        # Decode from the last emitted id on: the new piece's leading space survives (only the
        # first piece of a decode loses it, and that piece is in both texts).
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(prefix_text):
            return ""  # an incomplete UTF-8 character: wait for its remaining byte pieces
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(prefix_text):]


def _iter_texts(inputs) -> Iterator[str]:
    """Texts from a path or glob, or an iterable whose items are paths/globs or texts.

    A top-level str is always a path or glob; inside an iterable, a str that names an existing
    file/dir or a glob matching something is read as a path, any other str is a text.
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
        for f in paths:
            if f.name.endswith((".jsonl", ".jsonl.gz")):  # one document per line, its "text"
                from llama.data import iter_documents

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
                    max_sentence_length: int = 16384, verbose: bool = False) -> Path:
    """Train a SentencePiece BPE tokenizer with the LLaMA paper's recipe and Meta's ids.

    inputs: a file, directory or glob, a list of them, or an iterable of strings (documents);
    .jsonl(.gz) files give each line's "text" field, any other file is one document.
    Documents are split into lines (sentencepiece's sentences; newlines themselves become byte
    pieces, as in Meta's model); at most `input_sentence_size` lines, sampled with `seed`, are
    used, so training is deterministic. Writes `out_path` atomically and returns it.
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
    for text in _iter_texts(inputs):
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
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
