"""Convert between Meta's checkpoint layout and GGUF, llama.cpp's format.

    python scripts/convert_gguf.py --src weights/7B --dst llama-7b.gguf [--dtype f16|f32|bf16|q8_0]
    python scripts/convert_gguf.py --src model.gguf --dst model/ [--dtype fp16|fp32|bf16] [--num_shards 1]

The direction follows --src: a .gguf file is read into Meta's layout (quantized weights are
dequantized), a checkpoint folder is written as .gguf. To GGUF, the vocabulary is tokenizer.model
(or tokenizer.gguf) next to the checkpoint or in its parent, or --tokenizer_path. An existing
output is kept unless --overwrite.
"""

from pathlib import Path

from llama.cli import run
from llama.formats.gguf import gguf_to_meta, meta_to_gguf


def main(src: str, dst: str, dtype: str = None, tokenizer_path: str = None, num_shards: int = 1,
         overwrite: bool = False):
    if not Path(src).exists():
        raise FileNotFoundError(f"--src {src} does not exist (a .gguf file, or a Meta-layout checkpoint folder)")
    if Path(src).suffix.lower() == ".gguf":
        out = gguf_to_meta(src, dst, dtype=dtype or "fp16", num_shards=num_shards, overwrite=overwrite)
    else:
        out = meta_to_gguf(src, dst, dtype=dtype or "f16", tokenizer_path=tokenizer_path, overwrite=overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    run(main)
