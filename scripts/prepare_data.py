"""Tokenize text into memory-mapped token shards for pretraining (llama.data.prepare_data).

One source:
    python scripts/prepare_data.py --inputs 'corpus/*.jsonl' --tokenizer tokenizer.model --out data/corpus
Every source of a mixture (each entry's "inputs" prepared into its "path"; weights are used by
the loader, e.g. TrainConfig data = the same JSON file):
    python scripts/prepare_data.py --mixture configs/data/llama_mixture.json --tokenizer tokenizer.model
"""

import json

from llama.cli import run
from llama.data import prepare_data


def main(tokenizer: str, inputs: str = "", out: str = "", mixture: str = "",
         val_fraction: float = 0.01, seed: int = 0, num_workers: int = None,
         shard_tokens: int = 1 << 30, overwrite: bool = False, skip_binary: bool = False):
    """inputs: files, directories or globs (comma-separated); .jsonl(.gz) lines need a "text" field,
    any other file is one document. A binary file is an error naming it, unless --skip_binary
    (then it is skipped and counted)."""
    if bool(mixture) == bool(inputs):
        raise ValueError("give either --inputs with --out, or --mixture")
    if mixture:
        jobs = [(name, src.get("inputs"), src.get("path"))
                for name, src in json.loads(open(mixture).read()).items()]
        for name, src_inputs, path in jobs:
            if not src_inputs or not path:
                raise ValueError(f'mixture source {name!r} in {mixture} needs "inputs" and "path"')
    else:
        if not out:
            raise ValueError("--out is required with --inputs")
        jobs = [("data", inputs, out)]
    for name, src_inputs, path in jobs:
        if isinstance(src_inputs, str):
            src_inputs = [s for s in src_inputs.split(",") if s]
        meta = prepare_data(src_inputs, tokenizer, path, val_fraction=val_fraction, seed=seed,
                            num_workers=num_workers, shard_tokens=shard_tokens, overwrite=overwrite,
                            skip_binary=skip_binary)
        tr, va = meta["splits"]["train"], meta["splits"]["val"]
        print(f"{name}: wrote {path}: train {tr['n_tokens']:,} tokens / {tr['n_docs']:,} docs, "
              f"val {va['n_tokens']:,} tokens / {va['n_docs']:,} docs ({meta['dtype']})"
              + (f"; skipped {len(meta['skipped_binary'])} binary file(s)" if meta["skipped_binary"] else ""))


if __name__ == "__main__":
    run(main)
