"""Convert between Meta's checkpoint layout and transformers' LLaMA format.

    python scripts/convert_hf.py --to hf --src weights/7B --dst llama-7b-hf [--dtype fp16]
    python scripts/convert_hf.py --to meta --src llama-7b-hf --dst weights/7B [--num_shards 1]

A tokenizer.model next to the source (or in its parent, Meta's layout) is copied along;
--tokenizer_path names another. An existing model at --dst is only replaced with --overwrite.
"""

from llama.cli import run
from llama.formats.hf import hf_to_meta, meta_to_hf


def main(to: str, src: str, dst: str, dtype: str = None, num_shards: int = 1, tokenizer_path: str = None,
         max_shard_size_gb: float = None, overwrite: bool = False):
    if to == "hf":
        size = int(max_shard_size_gb * 2**30) if max_shard_size_gb else None
        out = meta_to_hf(src, dst, dtype=dtype, tokenizer_path=tokenizer_path, max_shard_size=size, overwrite=overwrite)
    elif to == "meta":
        out = hf_to_meta(src, dst, num_shards=num_shards, dtype=dtype or "fp16", tokenizer_path=tokenizer_path,
                         overwrite=overwrite)
    else:
        raise ValueError(f"--to must be 'hf' or 'meta', got {to!r}")
    print(f"wrote {out}")


if __name__ == "__main__":
    run(main)
