"""Reshard a Meta checkpoint directory to another number of model-parallel shards.

    python scripts/reshard.py --in_dir weights/13B --out_dir weights/13B-mp1 --num_shards 1
    python scripts/reshard.py --in_dir weights/7B --out_dir weights/7B-mp2 --num_shards 2 --dtype bf16
"""

from llama.formats.meta import reshard
from llama.cli import run


def main(in_dir: str, out_dir: str, num_shards: int, dtype: str = None, overwrite: bool = False):
    out = reshard(in_dir, out_dir, num_shards, dtype=dtype, overwrite=overwrite, progress=True)
    print(f"wrote {num_shards} shard(s) to {out}")


if __name__ == "__main__":
    run(main)
