"""Tokenize text into memory-mapped token shards for pretraining (llama.data.prepare_data).

One source:
    python scripts/prepare_data.py --inputs 'corpus/*.jsonl' --tokenizer tokenizer.model --out data/corpus
Every source of a mixture (each entry's "inputs" prepared into its "path"; weights are used by
the loader, e.g. TrainConfig data = the same JSON file):
    python scripts/prepare_data.py --mixture llama_mixture --tokenizer tokenizer.model   # or a JSON path
"""

from llama.cli import run
from llama.config import config_path, read_json_object
from llama.data import prepare_data
from llama.data.loader import read_meta
from llama.data.prepare import list_files
from llama.tokenizer import Tokenizer


def main(tokenizer: str, inputs: str = "", out: str = "", mixture: str = "",
         val_fraction: float = 0.01, seed: int = 0, num_workers: int = None,
         shard_tokens: int = 1 << 30, overwrite: bool = False, skip_binary: bool = False):
    """inputs: files, directories or globs (comma-separated); .jsonl(.gz) lines need a "text" field,
    any other file is one document. A binary file is an error naming it, unless --skip_binary
    (then it is skipped and counted)."""
    if bool(mixture) == bool(inputs):
        raise ValueError("give either --inputs with --out, or --mixture")
    if mixture:
        spec_path = config_path("data", mixture)  # a path, or the name of a shipped mixture (llama_mixture)
        jobs = [(name, src.get("inputs") if isinstance(src, dict) else None, src.get("path") if isinstance(src, dict) else None)
                for name, src in read_json_object(spec_path).items()]
        for name, src_inputs, path in jobs:
            if not src_inputs or not path:
                raise ValueError(f'mixture source {name!r} in {spec_path} needs "inputs" and "path"')
    else:
        if not out:
            raise ValueError("--out is required with --inputs")
        jobs = [("data", inputs, out)]
    jobs = [(name, [s for s in src.split(",") if s] if isinstance(src, str) else src, path) for name, src, path in jobs]
    sha = Tokenizer(tokenizer).sha256
    kept = {name for name, _, path in jobs if mixture and not overwrite and _prepared_with(path, sha)}
    for name, src_inputs, _ in jobs:  # every source to prepare has its inputs before any is tokenized
        try:
            if name not in kept:
                list_files(src_inputs)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{name}: {e} (nothing was prepared)") from None
    for name, src_inputs, path in jobs:
        if name in kept:  # a rerun after a source was added
            print(f"{name}: {path} is already prepared with this tokenizer (kept; --overwrite redoes every source)")
            continue
        meta = prepare_data(src_inputs, tokenizer, path, val_fraction=val_fraction, seed=seed,
                            num_workers=num_workers, shard_tokens=shard_tokens, overwrite=overwrite,
                            skip_binary=skip_binary)
        tr, va = meta["splits"]["train"], meta["splits"]["val"]
        print(f"{name}: wrote {path}: train {tr['n_tokens']:,} tokens / {tr['n_docs']:,} docs, "
              f"val {va['n_tokens']:,} tokens / {va['n_docs']:,} docs ({meta['dtype']})"
              + (f"; skipped {len(meta['skipped_binary'])} binary file(s)" if meta["skipped_binary"] else "")
              + (f"; no document was held out for validation (val_fraction {val_fraction:g} of {tr['n_docs']} docs): "
                 f"raise --val_fraction (with --overwrite for a prepared mixture), or validation leaves this source out"
                 if val_fraction and not va["n_docs"] else ""))


def _prepared_with(path: str, sha256: str) -> bool:
    try:
        return read_meta(path)["tokenizer_sha256"] == sha256
    except (FileNotFoundError, ValueError, KeyError, OSError):
        return False


if __name__ == "__main__":
    run(main)
