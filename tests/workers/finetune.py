"""2-rank worker of tests/test_finetune.py, run by `conftest.torchrun`: LoRA and full fine-tuning of the
config in argv[1]/base.json on dp=2 and on tp=2; rank 0 writes each run's step losses and validation
loss to argv[1]/res.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llama.train import TrainConfig, Trainer
from tests.workers import finish

SETTINGS = {"lora": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["wq", "wv", "wo", "w2"]}}, "full": {}}


def main(work):
    torch.set_num_threads(1)
    work = Path(work)
    base = json.loads((work / "base.json").read_text())
    res = {}
    for name, kw in SETTINGS.items():
        for layout, (dp, tp) in (("dp2", (2, 1)), ("tp2", (1, 2))):
            cfg = TrainConfig.from_dict(base, out_dir=str(work / f"{name}_{layout}"), dp=dp, tp=tp, **kw)
            summary = Trainer(cfg).fit()
            res[f"{name}_{layout}"] = {"losses": [r["loss"] for r in summary["history"]],
                                       "val_loss": summary["val_loss"]}
    if dist.get_rank() == 0:
        (work / "res.json").write_text(json.dumps(res))
    finish()


if __name__ == "__main__":
    main(sys.argv[1])
