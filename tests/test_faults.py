"""Fault injection: a process killed (-9) in the middle of a checkpoint save, a disk that fills, files
cut short or missing in each checkpoint format, pickles carrying code in each pickled file we read,
and two jobs on one destination. Each case checks the one sentence the user gets and that nothing
written earlier was lost (the reference: the same run left alone, or the files as they were)."""

import contextlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem

from llama.data import prepare_data
from llama.env import DirectoryLockedError, DiskFullError, UnsafeFileError
from llama.formats.hf import load_hf, save_hf
from llama.formats.meta import load_model, save_meta_checkpoint
from llama.model import ModelArgs, Transformer
from llama.train import CheckpointManager, TrainConfig, Trainer, export_checkpoint
from llama.train.checkpoint import SafeLoadPlanner
from tests.helpers import make_pattern_loader

ROOT = Path(__file__).resolve().parent.parent
SAFETY = "refused to unpickle"
SAFETY_END = "(it holds code or non-tensor objects"


class Payload:
    """Unpickling this runs `touch marker`: what a hostile file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def assert_refused(excinfo, path, marker: Path):
    msg = str(excinfo.value)
    assert msg.startswith(f"{SAFETY} {path} {SAFETY_END}") and "not loaded for safety" in msg, msg
    assert "weights_only=False" not in msg and "system" in msg  # names what it asked for
    assert not marker.exists()  # nothing ran


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"  # the synthetic loader ignores it; the trainer checks that it exists
    d.mkdir()
    (d / "meta.json").write_text("{}")
    return d


BASE = dict(model="tiny", steps=4, warmup_steps=2, lr=3e-3, seq_len=32, global_batch_tokens=128,
            micro_batch_size=2, eval_every=0, eval_batches=0, ckpt_every=2, peak_flops=1e12, progress=False,
            tensorboard=False, resume="auto", dtype="fp32")


def cfg(data_dir, out_dir, **kw):
    return TrainConfig.from_dict({**BASE, "data": str(data_dir), "out_dir": str(out_dir), **kw})


def fit(data_dir, out_dir, **kw):
    return Trainer(cfg(data_dir, out_dir, **kw), make_loader=make_pattern_loader).fit()


def losses(summary):
    return [r["loss"] for r in summary["history"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An undisturbed 4-step run (checkpoints at steps 2 and 4): its losses and checkpoints."""
    tmp = tmp_path_factory.mktemp("reference")
    (tmp / "data").mkdir()
    (tmp / "data" / "meta.json").write_text("{}")
    s = fit(tmp / "data", tmp / "run")
    return {"losses": losses(s), "run": tmp / "run"}


def copy_run(reference, dst: Path) -> Path:
    shutil.copytree(reference["run"], dst)
    return dst


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- kill -9 in the middle of a save ------------------------------------------------------------

# A training run in a child process that kills itself (SIGKILL) at its `kill_at`-th filesystem write
# (open for writing, rename, mkdir, delete, seen through Python's audit hooks) under checkpoints/
# once step 2's checkpoint is complete, i.e. somewhere inside the save of step 4. It prints the count
# of such writes when it is not killed.
KILLER = textwrap.dedent("""
    import json, os, signal, sys
    from llama.train import TrainConfig, Trainer
    from tests.helpers import make_pattern_loader

    cfg, kill_at = TrainConfig.from_dict(json.loads(sys.argv[1])), int(sys.argv[2])
    writes = 0
    armed = False

    def hook(event, args):
        global writes
        if not armed or not args or "checkpoints" not in str(args[0]):
            return
        if event == "open" and not any(m in str(args[1] or "r") for m in "wax+"):
            return
        if event in ("open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.unlink", "shutil.rmtree"):
            writes += 1
            if writes == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    def arm(rec):
        global armed
        armed = armed or rec["step"] == 2  # the step-2 checkpoint is written before callbacks run

    sys.addaudithook(hook)
    Trainer(cfg, make_loader=make_pattern_loader).fit(arm)
    print("writes", writes)
""")


def run_killer(config: dict, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, json.dumps(config), str(kill_at)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_kill_9_at_random_points_of_a_save_resumes_exactly(tmp_path, data_dir, reference):
    counting = run_killer(cfg(data_dir, tmp_path / "count").to_dict(), 10 ** 9)
    assert counting.returncode == 0, counting.stderr[-3000:]
    n_writes = int(counting.stdout.split("writes")[-1])
    assert n_writes >= 6  # the save of step 4: mkdir, DCP's files and rename, rank file, meta.json, rename
    for seed in range(3):
        kill_at = random.Random(seed).randint(1, n_writes)
        out = tmp_path / f"run{seed}"
        proc = run_killer(cfg(data_dir, out).to_dict(), kill_at)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr[-3000:])
        step2 = out / "checkpoints" / "step_00000002"
        kept = snapshot(step2)
        # the next plain run resumes from the newest complete checkpoint and ends where the
        # undisturbed run ended, bit for bit
        resumed = fit(data_dir, out)
        latest = CheckpointManager(out).latest()
        assert latest.name == "step_00000004" and resumed["step"] == 4
        assert losses(resumed) == reference["losses"][len(reference["losses"]) - len(losses(resumed)):], kill_at
        assert len(losses(resumed)) in (0, 2)  # nothing to do when the kill came after the rename
        if losses(resumed):
            assert snapshot(step2) == kept  # the earlier checkpoint untouched
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


# ---- a full disk -----------------------------------------------------------------------------------


@contextlib.contextmanager
def disk_with_room(monkeypatch, room: int):
    """DCP's writes fail with ENOSPC once `room` bytes have been written (a full filesystem; mounting
    a small tmpfs needs privileges the tests may not have)."""
    written = [0]
    real = dcp_filesystem.FileSystem.create_stream

    class Full(io.FileIO):
        def write(self, b):
            written[0] += len(b)
            if written[0] > room:
                raise OSError(28, "No space left on device")
            return super().write(b)

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if "w" not in mode:
            with real(self, path, mode) as f:
                yield f
            return
        with Full(path, "w") as f:
            yield f

    monkeypatch.setattr(dcp_filesystem.FileSystem, "create_stream", create_stream)
    yield


def test_disk_full_during_a_save_names_it_cleans_up_and_keeps_the_last_checkpoint(tmp_path, data_dir, reference,
                                                                                   monkeypatch):
    out = copy_run(reference, tmp_path / "run")
    kept = snapshot(out / "checkpoints")
    trainer = Trainer(cfg(data_dir, out, steps=6), make_loader=make_pattern_loader)
    assert trainer.resume_from.name == "step_00000004"
    trainer.train_step()
    with disk_with_room(monkeypatch, 4096):
        with pytest.raises(DiskFullError, match=rf"^disk full at {out / 'checkpoints'} \(needed ~[\d.]+ [KM]iB, "
                                                r"free [\d.]+ [KMGT]?i?B\); free some space"):
            trainer.save()
    assert snapshot(out / "checkpoints") == kept  # the temporary folder is gone, the others untouched
    monkeypatch.undo()
    assert trainer.save().name == "step_00000005"  # with room again, the same trainer saves


def test_a_save_that_cannot_fit_stops_before_writing(tmp_path, data_dir, reference, monkeypatch):
    out = copy_run(reference, tmp_path / "run")
    kept = snapshot(out / "checkpoints")
    trainer = Trainer(cfg(data_dir, out, steps=6), make_loader=make_pattern_loader)
    params = sum(p.numel() for p in trainer.model.parameters())
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    # fp32 weights + AdamW's two moments: 12 bytes per parameter (and the step counters)
    needed = 12 * params
    with pytest.raises(DiskFullError, match=rf"disk full at .*checkpoints \(needed ~{needed / 2**20:.1f} MiB, "
                                            r"free 97.7 KiB\)"):
        trainer.save()
    assert snapshot(out / "checkpoints") == kept


# ---- files cut short or missing --------------------------------------------------------------------


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("damage", ["truncate_data", "remove_rank", "truncate_metadata"])
def test_resume_skips_a_damaged_latest_checkpoint_by_name(tmp_path, data_dir, reference, damage, capsys):
    out = copy_run(reference, tmp_path / "run")
    step4 = out / "checkpoints" / "step_00000004"
    victim = {"truncate_data": step4 / "__0_0.distcp", "remove_rank": step4 / "rank_00000.pt",
              "truncate_metadata": step4 / ".metadata"}[damage]
    size = victim.stat().st_size
    truncate(victim) if damage != "remove_rank" else victim.unlink()
    why = (f"{victim.name} is missing" if damage == "remove_rank"
           else f"{victim.name} has {size // 2} bytes where {size} were written \\(truncated or altered\\)")
    # explicitly asked for: a clear error; exported: the same
    with pytest.raises(ValueError, match=rf"checkpoint {step4} is damaged: {why}"):
        Trainer(cfg(data_dir, out, resume=str(step4)), make_loader=make_pattern_loader)
    with pytest.raises(ValueError, match=rf"checkpoint {step4} is damaged: {why}; export another one"):
        export_checkpoint(step4, tmp_path / "export")
    # resume=auto falls back to step 2, says so, and trains steps 3-4 to the undisturbed losses
    resumed = Trainer(cfg(data_dir, out), make_loader=make_pattern_loader)
    assert resumed.resume_from.name == "step_00000002"
    assert re.search(f"skipping damaged checkpoint {step4}: {why}; resuming from step_00000002 instead",
                     capsys.readouterr().err)
    assert losses(resumed.fit()) == reference["losses"][2:]


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path, data_dir, reference):
    out = copy_run(reference, tmp_path / "run")
    for step in ("step_00000002", "step_00000004"):
        (out / "checkpoints" / step / "rank_00000.pt").unlink()
    with pytest.raises(ValueError, match=r"every checkpoint in .*checkpoints is damaged \(step_00000004: "
                                         r"rank_00000.pt is missing; step_00000002: .*\): copy an intact one back"):
        Trainer(cfg(data_dir, out), make_loader=make_pattern_loader)


def test_same_size_garbage_in_dcp_metadata_is_corrupt_not_a_traceback(tmp_path, data_dir, reference):
    out = copy_run(reference, tmp_path / "run")
    md = out / "checkpoints" / "step_00000004" / ".metadata"
    md.write_bytes(bytes(range(256)) * (md.stat().st_size // 256) + b"\0" * (md.stat().st_size % 256))
    with pytest.raises(ValueError, match=rf"cannot read {md}: it is truncated or corrupt"):
        Trainer(cfg(data_dir, out), make_loader=make_pattern_loader)


@pytest.fixture
def meta_ckpt(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", n_layers=1))
    save_meta_checkpoint(model.state_dict(), model.args, tmp_path / "meta", num_shards=2, dtype=torch.float32)
    return tmp_path / "meta"


def test_meta_shard_truncated_or_missing(meta_ckpt):
    shard = meta_ckpt / "consolidated.01.pth"
    kept = (meta_ckpt / "consolidated.00.pth").read_bytes()
    truncate(shard)
    with pytest.raises(ValueError, match=rf"cannot read checkpoint shard {shard}: it is truncated or corrupt"):
        load_model(meta_ckpt)
    (meta_ckpt / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing shard\(s\) \['consolidated.00.pth'\]"):
        load_model(meta_ckpt)
    # the last shard gone: Meta's layout records no shard count; the shapes give it away, and name it
    (meta_ckpt / "consolidated.00.pth").write_bytes(kept)
    shard.unlink()
    with pytest.raises(ValueError, match=r"holds 1 shard\(s\) of 2 \(params.json's dim 64\): missing "
                                         r"\['consolidated.01.pth'\]"):
        load_model(meta_ckpt)


def test_hf_safetensors_truncated_or_missing(tmp_path):
    model = Transformer(ModelArgs.from_name("tiny", n_layers=1))
    save_hf(model.state_dict(), model.args, tmp_path / "hf", dtype=torch.float32)
    f = tmp_path / "hf" / "model.safetensors"
    truncate(f, 0.9)
    with pytest.raises(ValueError, match=rf"cannot read {f}: it is truncated or corrupt"):
        load_hf(tmp_path / "hf")
    f.unlink()
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or model.safetensors.index.json in"):
        load_hf(tmp_path / "hf")


# ---- pickles that carry code -----------------------------------------------------------------------


def test_pickle_payload_in_a_meta_shard_is_refused(meta_ckpt, tmp_path):
    marker = tmp_path / "ran"
    shard = meta_ckpt / "consolidated.00.pth"
    torch.save({"tok_embeddings.weight": Payload(marker)}, shard)
    with pytest.raises(UnsafeFileError) as e:
        load_model(meta_ckpt)
    assert_refused(e, shard, marker)


def test_pickle_payload_in_dcp_metadata_is_refused(tmp_path, data_dir, reference):
    out = copy_run(reference, tmp_path / "run")
    marker = tmp_path / "ran"
    step4 = out / "checkpoints" / "step_00000004"
    md = step4 / ".metadata"
    md.write_bytes(pickle.dumps(Payload(marker)))
    # the attacker also fixes the manifest, so the size check alone does not catch it
    meta = json.loads((step4 / "meta.json").read_text())
    meta["files"][".metadata"] = md.stat().st_size
    (step4 / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UnsafeFileError) as e:  # the plain rerun (automatic resume)
        Trainer(cfg(data_dir, out), make_loader=make_pattern_loader)
    assert_refused(e, md, marker)
    with pytest.raises(UnsafeFileError) as e:  # scripts/export.py
        export_checkpoint(step4, tmp_path / "export")
    assert_refused(e, md, marker)
    assert not (tmp_path / "export").exists()


def test_pickle_payload_in_a_rank_file_is_refused(tmp_path, data_dir, reference):
    out = copy_run(reference, tmp_path / "run")
    marker = tmp_path / "ran"
    step4 = out / "checkpoints" / "step_00000004"
    rank_file = step4 / "rank_00000.pt"
    torch.save({"loader": Payload(marker)}, rank_file)
    meta = json.loads((step4 / "meta.json").read_text())
    meta["files"]["rank_00000.pt"] = rank_file.stat().st_size
    (step4 / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UnsafeFileError) as e:
        Trainer(cfg(data_dir, out), make_loader=make_pattern_loader)
    assert_refused(e, rank_file, marker)


def test_pickle_payload_in_a_dcp_bytes_entry_is_refused(tmp_path):
    # non-tensor entries (optimizer hyper-parameters) are torch.save'd bytes inside .distcp files,
    # which DCP's default planner reads with weights_only=False
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save([Payload(marker)], buf)
    buf.seek(0)
    item = types.SimpleNamespace(dest_index=types.SimpleNamespace(fqn="optim.param_groups"))
    with pytest.raises(UnsafeFileError, match=r"refused to unpickle .*not loaded for safety"):
        SafeLoadPlanner(tmp_path).load_bytes(item, buf)
    assert not marker.exists()


# ---- two jobs, one destination ---------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from llama.env import DirLock
    lock = DirLock(sys.argv[1], sys.argv[2], lock_file=sys.argv[3] if len(sys.argv) > 3 else None).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


@contextlib.contextmanager
def held_by_another_process(path: Path, what: str, lock_file: Path | None = None):
    args = [sys.executable, "-c", HOLDER, str(path), what] + ([str(lock_file)] if lock_file else [])
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_two_runs_on_one_out_dir(tmp_path, data_dir, reference):
    out = copy_run(reference, tmp_path / "run")
    kept = snapshot(out)
    with held_by_another_process(out, "training run") as other:
        with pytest.raises(DirectoryLockedError, match=rf"^{out} is in use by another training run \(pid {other.pid} "
                                                       r"on .*, started 20.*\); wait for it to finish"):
            Trainer(cfg(data_dir, out, steps=6), make_loader=make_pattern_loader)
        assert snapshot(out) == {**kept, ".lock": (out / ".lock").read_bytes()}  # nothing touched
        other.send_signal(signal.SIGKILL)  # dies holding it: the kernel drops the lock
        other.wait()
    resumed = fit(data_dir, out, steps=6)  # the stale lock is taken over
    assert [r["step"] for r in resumed["history"]] == [5, 6]
    assert not (out / ".lock").exists()  # released at the end


def test_two_preparations_into_one_destination(tmp_path, tiny_tokenizer):
    (tmp_path / "a.txt").write_text("some text to tokenize. " * 20)
    dest = tmp_path / "prepared"
    with held_by_another_process(dest, "data preparation", tmp_path / ".prepared.lock"):
        with pytest.raises(DirectoryLockedError, match=rf"{dest} is in use by another data preparation"):
            prepare_data([tmp_path / "a.txt"], tiny_tokenizer.model_path, dest, num_workers=1, progress=False)
    assert not dest.exists()
    prepare_data([tmp_path / "a.txt"], tiny_tokenizer.model_path, dest, num_workers=1, progress=False)
    assert (dest / "meta.json").is_file()


def test_an_export_into_a_folder_another_process_writes(tmp_path, reference):
    dest = tmp_path / "export"
    ckpt = reference["run"] / "checkpoints" / "step_00000004"
    with held_by_another_process(dest, "export"):
        with pytest.raises(DirectoryLockedError, match=rf"{dest} is in use by another export"):
            export_checkpoint(ckpt, dest)
    assert [p.name for p in dest.iterdir()] == [".lock"]  # nothing written; the killed holder's lock file
    export_checkpoint(ckpt, dest)  # taken over
    assert sorted(p.name for p in dest.iterdir()) == ["consolidated.00.pth", "context.json", "params.json"]  # tiny: 256


def test_a_full_disk_while_preparing_data_is_one_sentence_and_leaves_nothing(tmp_path, tiny_tokenizer, monkeypatch):
    """The shard writer's ENOSPC (a full filesystem) becomes DiskFullError naming the folder, as the
    trainer's and the exports' do; no half-written dataset or temporary folder is left."""
    import errno

    import llama.data.prepare as prepare

    (tmp_path / "a.txt").write_text("the model reads the data\n" * 50)

    def full(self, tokens):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare._ShardWriter, "write", full)
    with pytest.raises(DiskFullError, match=rf"^disk full at {re.escape(str(tmp_path))} \(needed more, free "):
        prepare_data([tmp_path / "a.txt"], tiny_tokenizer.model_path, tmp_path / "data", num_workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
