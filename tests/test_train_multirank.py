"""Pretraining on 2 ranks (torchrun, gloo on CPU) against the same run in one process: FSDP2 over
dp=2 and DTensor tensor parallel over tp=2 give the 1-rank losses for the same global batch;
a 2-rank run resumes exactly, on its own layout and on another; its checkpoints load in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import make_pattern_loader  # noqa: E402

from llama.train import TrainConfig, Trainer, export_checkpoint  # noqa: E402

HERE = Path(__file__).resolve().parent


def one_rank(base, out, **kw):
    s = Trainer(TrainConfig.from_dict(base, out_dir=str(out), **kw), make_loader=make_pattern_loader).fit()
    return [r["loss"] for r in s["history"]], s


def _launch(tmp_path, base) -> Path:
    """torchrun the 2-rank worker; returns its result file. A rare abort of a gloo rank ("terminate
    called without an active exception", seen once in ~10 runs on a loaded 2-core machine; cause not
    found yet) gets one retry in a fresh directory - the numbers are checked all the same."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    for attempt in range(2):
        work = tmp_path / f"run{attempt}"
        work.mkdir()
        (work / "base.json").write_text(json.dumps(base))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--standalone", str(HERE / "_train_multirank.py"), str(work),
                               str(work / "res.json")], env=env, capture_output=True, text=True, timeout=400)
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return work / "res.json"


@pytest.mark.slow
def test_dp2_and_tp2_match_one_rank(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text("{}")
    # 4 sequences of 32 tokens per step: 1 rank does 2 micro-batches of 2, dp=2 one of 2 per rank
    base = dict(model="tiny", data=str(tmp_path / "data"), steps=4, warmup_steps=2, lr=3e-3, seq_len=32,
                global_batch_tokens=128, micro_batch_size=2, dtype="fp32", eval_every=0, eval_batches=2,
                ckpt_every=100, peak_flops=1e12, progress=False, resume="auto")
    res_file = _launch(tmp_path, base)
    work = res_file.parent  # where the 2-rank runs wrote their checkpoints
    res = json.loads(res_file.read_text())

    ref, ref_summary = one_rank(base, tmp_path / "one")
    ref_bf16, _ = one_rank(base, tmp_path / "one_bf16", dtype="bf16")
    assert ref[-1] < ref[0] - 0.3
    for key in ("dp2", "tp2", "dp2_selective_ac"):
        assert res[key] == pytest.approx(ref, abs=2e-5), key
    assert res["tp2_val"] == pytest.approx(ref_summary["val_loss"], abs=2e-5)
    # bf16: FSDP's bf16 parameters on 2 ranks against autocast in one process
    assert res["dp2_bf16"] == pytest.approx(ref_bf16, abs=2e-2)
    # stopped after step 2 and resumed: exact on the same layout, the same numbers on tp=2
    assert res["dp2_resumed"] == res["dp2"][2:]
    assert res["dp2_to_tp2"] == pytest.approx(res["dp2"][2:], abs=2e-5)

    # meta-device init over dp=2: N(0, 0.02) with distinct shards
    assert not res["meta_halves_equal"] and res["meta_std"] == pytest.approx(0.02, rel=0.1)

    # the sharded checkpoints (FSDP dp=2, TP tp=2) load in one process: same validation loss
    resumed = Trainer(TrainConfig.from_dict(base, out_dir=str(work / "tp2")), make_loader=make_pattern_loader)
    assert resumed.resume_from is not None
    assert resumed.evaluate()["val_loss"] == pytest.approx(res["tp2_val"], abs=2e-5)
    # Meta export gathered from 2 FSDP ranks == offline export of the sharded checkpoint
    offline = export_checkpoint(res["dp2_ckpt"], tmp_path / "offline_meta")
    a = torch.load(work / "dp2_meta" / "consolidated.00.pth", weights_only=True)
    b = torch.load(offline / "consolidated.00.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and equals the 1-rank run's weights (fp16 export of fp32 training)
    ref_sd = one_rank_weights(base, ref_summary["checkpoint"])
    for k in a:
        torch.testing.assert_close(a[k].float(), ref_sd[k].half().float(), atol=1e-3, rtol=1e-3)


def one_rank_weights(base, ckpt):
    trainer = Trainer(TrainConfig.from_dict(base, out_dir=str(Path(ckpt).parent.parent)), make_loader=make_pattern_loader)
    trainer.evaluate(1)  # builds and loads the checkpoint
    return trainer.model.state_dict()
