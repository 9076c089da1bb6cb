"""Byte-level BPE tokenizers (GPT-2's scheme, used by Llama 3, SmolLM, Qwen, ...) with the interface
of `llama.tokenizer.Tokenizer`: `encode(s, bos, eos)`, `decode(ids)`, `n_words`, `bos_id`, `eos_id`,
`pad_id`, `sha256`, `model_path`. Generation, streaming and chat do not care which one they hold.

A vocabulary is what a GGUF file stores (`tokenizer.ggml.model = "gpt2"`): the tokens spelled in
GPT-2's byte alphabet (a space is "Ġ"), the merges by rank, the token types and the name of the
pre-tokenizer (`tokenizer.ggml.pre`) that splits text into words before merging. The names and the
regexes below are llama.cpp's (src/llama-vocab.cpp): each regex in a list splits every piece the
previous one produced, matches and the text between them becoming pieces of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

# pre-tokenizer name -> (regexes applied in turn, ignore_merges: a word that is a token is not merged)
_PRE_GROUPS = [
    (("default",), _DEFAULT, False),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"), [_LLAMA3], True),
    (("dbrx", "smaug-bpe"), [_LLAMA3], False),
    (("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de",
      "gigachat", "mellum", "trillion", "granite-docling"), [_GPT2], False),
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"), [r"\p{N}", _GPT2], False),
    (("qwen2", "deepseek-r1-qwen", "kormo", "stablelm2", "megrez", "hunyuan"), [_QWEN2], False),
]
PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {name: (regexes, ignore) for names, regexes, ignore in _PRE_GROUPS
                                                     for name in names}
# llama.cpp adds bos by default for these (the file's tokenizer.ggml.add_bos_token overrides)
_ADD_BOS_DEFAULT = set(_PRE_GROUPS[1][0])


class BPETokenizer:
    """A byte-level BPE vocabulary: `tokens` (GPT-2 byte alphabet), `merges` ("a b", by rank),
    `token_types` (GGUF's; control and user-defined tokens are matched whole in the text, so a
    chat template's `<|im_start|>` is one id), the pre-tokenizer `pre` (a name in PRE_TOKENIZERS).

    `encode(s, bos=True)` adds bos only when the vocabulary wants one (`add_bos`, from the file);
    `encode(s, eos=True)` always appends eos. `decode(encode(s, ...))` gives back s (special tokens
    decode to their text).
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None = None,
                 pre: str = "default", bos_id: int = -1, eos_id: int = -1, pad_id: int = -1,
                 add_bos: bool | None = None, source: str | os.PathLike = "<memory>"):
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"{source}: unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
                             f"{sorted(PRE_TOKENIZERS)}")
        n = len(tokens)
        for name, i in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
            if not -1 <= i < n:
                raise ValueError(f"{source}: {name} token id {i} is outside the vocabulary of {n} tokens")
        token_types = list(token_types) if token_types is not None else [NORMAL] * n
        if len(token_types) != n:
            raise ValueError(f"{source}: {len(token_types)} token types for {n} tokens")
        self.tokens, self.merges, self.token_types = list(tokens), list(merges), token_types
        self.pre = pre
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
        self.add_bos = (pre in _ADD_BOS_DEFAULT) if add_bos is None else bool(add_bos)
        self.model_path = Path(source)
        self.n_words = n
        self.chat_template: str | None = None
        ident = json.dumps([self.tokens, self.merges, self.token_types, pre, self.bos_id, self.eos_id, self.add_bos])
        self.sha256 = hashlib.sha256(ident.encode("utf-8")).hexdigest()

        regexes, ignore_merges = PRE_TOKENIZERS[pre]
        pairs = []
        for rank, m in enumerate(self.merges):
            cut = m.find(" ", 1)  # the left token is never empty; the first space after it separates
            if cut < 0:
                raise ValueError(f"{source}: merge {rank} {m!r} (tokenizer.ggml.merges) is not two tokens "
                                 f"separated by a space")
            pairs.append((m[:cut], m[cut + 1:]))
        vocab = {t: i for i, t in enumerate(self.tokens)}
        self.tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False))
        self.tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # bytes -> GPT-2 alphabet
        self.tok.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(self.tokens, token_types) if ty == CONTROL]
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(self.tokens, token_types) if ty == USER_DEFINED]
        if special:
            self.tok.add_special_tokens(special)
        if user:
            self.tok.add_tokens(user)

    def __repr__(self):
        return f"BPETokenizer({str(self.model_path)!r}, n_words={self.n_words}, pre={self.pre!r})"

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"cannot encode {s[max(0, e.start - 10):e.end + 10]!r}: it is not valid Unicode "
                             f"({e.reason} at index {e.start}); decode the source text with errors='replace'") from None
        ids = self.tok.encode(s, add_special_tokens=False).ids
        if bos and self.add_bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_words]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for a tokenizer of {self.n_words} "
                             f"tokens ({self.model_path})")
        # an incomplete UTF-8 character decodes to U+FFFD, which streaming holds back
        return self.tok.decode(ids, skip_special_tokens=False)
