"""Where a model is and what it is, whatever its format: the architecture of a Meta-layout folder,
a transformers folder or a .gguf file (`checkpoint_args`), and the tokenizer kept beside it
(`tokenizer_beside`, `find_tokenizer`)."""

from __future__ import annotations

from pathlib import Path

from llama.env import say_once
from llama.formats.gguf import open_gguf, read_args
from llama.formats.hf import is_hf_checkpoint, read_hf_config
from llama.formats.meta import TOKENIZER, VOCAB_FILE, load_params
from llama.model import ModelArgs


def checkpoint_args(ckpt_dir: str | Path) -> ModelArgs:
    """The architecture of what `Llama.build` takes: a Meta-layout folder, a transformers folder or a
    .gguf file."""
    if Path(ckpt_dir).suffix.lower() == ".gguf":
        return read_args(open_gguf(ckpt_dir))
    return read_hf_config(ckpt_dir) if is_hf_checkpoint(ckpt_dir) else load_params(ckpt_dir)


def find_tokenizer(ckpt_dir: str | Path) -> str:
    """The tokenizer beside a checkpoint (`tokenizer_beside`), saying which it took; a clear error
    where there is none."""
    found = tokenizer_beside(ckpt_dir)
    if found is not None:
        say_once(f"llama: tokenizer {found} (--tokenizer_path overrides)")
        return str(found)
    places = ", ".join(map(str, tokenizer_places(ckpt_dir)))
    raise FileNotFoundError(f"no tokenizer given for {ckpt_dir}, and none at {places}: pass --tokenizer_path (a "
                            f"sentencepiece tokenizer.model, or a .gguf vocabulary)")


def tokenizer_places(ckpt_dir: str | Path) -> list[Path]:
    """Where a model's tokenizer is looked for, in order: ckpt_dir/tokenizer.model (this library's
    exports), ckpt_dir/tokenizer.gguf (an export with a BPE vocabulary), tokenizer.model one folder up
    (where Meta's releases keep it, beside 7B/, 13B/, ...)."""
    ckpt_dir = Path(ckpt_dir)
    return [ckpt_dir / TOKENIZER, ckpt_dir / VOCAB_FILE, ckpt_dir.parent / TOKENIZER]


def tokenizer_beside(ckpt_dir: str | Path) -> Path | None:
    """The first of `tokenizer_places` that exists, else None."""
    return next((p for p in tokenizer_places(ckpt_dir) if p.is_file()), None)
