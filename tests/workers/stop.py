"""2-rank worker of tests/test_train.py::test_a_signal_to_torchrun_or_to_one_rank_stops_every_rank_at_one_step_with_a_checkpoint:
the tiny model on dp=2, config argv[1] (JSON), out_dir argv[2]. With argv[3] == "slow", rank 0 writes
argv[2]/ready after step 2 and every step from then on takes a second more, so that the test's signal
lands mid-run; each rank writes its pid to argv[2]/pid_RANK first. Rank 0 writes the losses of the
steps it ran and how the run ended to argv[2]/result.json."""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llama.train import TrainConfig, Trainer
from tests.helpers import make_pattern_loader
from tests.workers import finish


def main(config, out, mode):
    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(json.loads(Path(config).read_text()), out_dir=out)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"pid_{os.environ['RANK']}").write_text(str(os.getpid()))  # (before the process group)
    losses = []

    def step_done(rec):
        losses.append(rec["loss"])
        if mode == "slow" and rec["step"] >= 2:
            if rec["step"] == 2 and dist.get_rank() == 0:
                (Path(out) / "ready").write_text("2")
            time.sleep(1.0)

    trainer = Trainer(cfg, make_loader=make_pattern_loader)
    first = trainer.step
    try:
        trainer.fit(step_done)
        ended = "finished"
    except KeyboardInterrupt:
        ended = "stopped"
    if dist.get_rank() == 0:
        (Path(out) / "result.json").write_text(json.dumps({"first": first, "losses": losses, "ended": ended,
                                                           "step": trainer.step}))
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:4])
