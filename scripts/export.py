"""Export a training checkpoint (any dp x tp layout) to Meta's layout: consolidated.NN.pth shards,
params.json and tokenizer.model, loadable by scripts/example.py and by transformers' converter.

    python scripts/export.py --ckpt runs/demo/checkpoints/step_00000300 --out models/demo --num_shards 1
    python scripts/export.py --ckpt runs/demo --out models/demo     # the latest checkpoint of a run
"""

from pathlib import Path

from llama.cli import run
from llama.train import CheckpointManager, export_checkpoint


def main(ckpt: str, out: str, num_shards: int = 1, dtype: str = "fp16", tokenizer: str = None,
         overwrite: bool = False):
    """ckpt: a checkpoint directory or a run's out_dir; dtype: fp16 (Meta's), bf16 or fp32;
    tokenizer: tokenizer.model to copy (default: the one the run was trained with)."""
    path = Path(ckpt)
    if not (path / "meta.json").is_file():
        latest = CheckpointManager(path).latest()
        if latest is None:
            raise FileNotFoundError(f"{ckpt} is neither a training checkpoint nor a run directory with checkpoints")
        path = latest
    out_dir = export_checkpoint(path, out, num_shards=num_shards, dtype=dtype, tokenizer_path=tokenizer,
                                overwrite=overwrite)
    print(f"exported {path} -> {out_dir}")


if __name__ == "__main__":
    run(main)
