"""2-rank worker of tests/test_train.py, run by `conftest.torchrun`: trains the tiny model on dp=2 and on tp=2
(losses and validation loss), and a dp=2 run stopped at step 2 and resumed (on dp=2, and on tp=2), writing every rank-0 loss history to the JSON file argv[2]."""

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llama.train import TrainConfig, Trainer
from tests.helpers import make_pattern_loader
from tests.workers import finish


class Stop(Exception):
    pass


def run(base, out, callback=None, **overrides):
    cfg = TrainConfig.from_dict(base, out_dir=str(out), **overrides)
    summary = Trainer(cfg, make_loader=make_pattern_loader).fit(callback)
    return [r["loss"] for r in summary["history"]], summary


def main(work, result_path):
    torch.set_num_threads(1)
    base = json.loads((Path(work) / "base.json").read_text())
    work = Path(work)
    results = {}
    results["dp2"], s = run(base, work / "dp2", dp=2, tp=1, export_dir=str(work / "dp2_meta"))
    results["dp2_ckpt"] = s["checkpoint"]
    results["dp2_val"], results["dp2_val_tokens"] = s["val_loss"], s["history"][-1]["val_tokens"]
    results["tp2"], s = run(base, work / "tp2", dp=1, tp=2)
    results["tp2_val"], results["tp2_ckpt"] = s["val_loss"], s["checkpoint"]
    results["dp2_bf16"], _ = run(base, work / "dp2_bf16", dp=2, tp=1, dtype="bf16")
    results["dp2_selective_ac"], _ = run(base, work / "dp2_ac", dp=2, tp=1, ac="selective")

    def stop_at_2(rec):
        if rec["step"] == 2:
            raise Stop

    try:
        run(base, work / "dp2_resume", dp=2, tp=1, ckpt_every=2, callback=stop_at_2)
    except Stop:
        pass
    # a copy of the step-2 checkpoint resumes on another layout
    if dist.get_rank() == 0:
        shutil.copytree(work / "dp2_resume", work / "dp2_to_tp2")
    dist.barrier()
    results["dp2_resumed"], _ = run(base, work / "dp2_resume", dp=2, tp=1, ckpt_every=2)
    results["dp2_to_tp2"], _ = run(base, work / "dp2_to_tp2", dp=1, tp=2, ckpt_every=2)
    # meta-device init, sharded: the two ranks' shards of a weight must differ
    cfg = TrainConfig.from_dict(base, out_dir=str(work / "meta_dp2"), dp=2, tp=1, init="meta")
    trainer = Trainer(cfg, make_loader=make_pattern_loader)
    halves = trainer.model.layers[0].attention.wq.weight.full_tensor().chunk(2)
    results["meta_halves_equal"] = bool(torch.equal(*halves))
    results["meta_std"] = trainer.model.layers[0].attention.wq.weight.full_tensor().std().item()
    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps(results))
    finish()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
