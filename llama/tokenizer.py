"""SentencePiece tokenizer with Meta's LLaMA conventions, and turning generated ids into text as they come.

Meta's tokenizer.model: BPE, digits split into single pieces, unknown UTF-8 falls back to the
256 byte pieces <0x00>..<0xFF> (ids 3..258), unk 0 `<unk>`, bos 1 `<s>`, eos 2 `</s>`, no pad.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import sentencepiece as spm

from llama.env import sha256_file

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # a model's chat template, beside its tokenizer.model
SPACE_MARK = "\u2581"  # sentencepiece writes spaces as this character inside pieces
N_SPECIAL = 3  # <unk> <s> </s>
N_BYTES = 256


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
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with a C++ message
            raise ValueError(f"{path} is not a valid sentencepiece model ({e})") from None
        self._setup(sp, path, sha256_file(path))
        template = path.with_name(CHAT_TEMPLATE_FILE)
        if template.is_file():
            self.chat_template = template.read_text()

    @classmethod
    def from_model_proto(cls, model_proto: bytes, source: str | os.PathLike) -> "Tokenizer":
        """A tokenizer from a serialized sentencepiece ModelProto (e.g. rebuilt from a GGUF's
        vocabulary); `source` names where it came from (model_path)."""
        sp = spm.SentencePieceProcessor()
        try:
            sp.load_from_serialized_proto(model_proto)
        except Exception as e:
            raise ValueError(f"{source}: not a valid sentencepiece model ({e})") from None
        self = cls.__new__(cls)
        self._setup(sp, Path(source), hashlib.sha256(model_proto).hexdigest())
        return self

    def _setup(self, sp: spm.SentencePieceProcessor, path: Path, sha256: str) -> None:
        self.sp = sp
        self.model_path = path
        self.sha256 = sha256
        self.add_bos = True  # encode(bos=True) adds bos; a GGUF may say its model wants none
        # Jinja, when the model carries one (a GGUF's tokenizer.chat_template, chat_template.jinja beside
        # tokenizer.model); chat then renders with it (llama.chat.encode_dialog)
        self.chat_template: str | None = None
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
        if bos and self.add_bos:
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


class TextStream:
    """Turns a growing list of token ids into text pieces, holding back an incomplete UTF-8
    character (a byte-fallback token that splits it) and any tail that could start a stop string.

    `push(ids)` returns the new text that is safe to show; `stopped` turns True once a stop string
    appeared (the text before it has been returned, the stop string is never shown).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.shown = 0  # characters of the decoded text already returned
        self.stopped = False

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        return self._emit(final=False)

    def finish(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        cut = find_stop(text, self.stop, start=max(0, self.shown - max((len(s) for s in self.stop), default=0)))
        if cut is not None:
            self.stopped = True
            end = cut
        elif final:
            end = len(text)
        else:
            end = len(text.rstrip("\ufffd"))  # an incomplete multi-byte character decodes to U+FFFD
            for s in self.stop:  # hold back a tail that may grow into a stop string
                for n in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:n]):
                        end = min(end, len(text[:end]) - n)
                        break
        if end <= self.shown:
            return ""
        piece, self.shown = text[self.shown:end], end
        return piece


def find_stop(text: str, stop: Sequence[str], start: int = 0) -> Optional[int]:
    hits = [i for i in (text.find(s, start) for s in stop if s) if i >= 0]
    return min(hits) if hits else None
