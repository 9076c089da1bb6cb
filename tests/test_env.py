"""llama.env: the torchrun environment, device and dtype choices, atomic writes."""

import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from llama.env import (DirLock, DiskFullError, Ranks, StagedFiles, UnsafeFileError, atomic_write_text, check_attention_device,
                       cpu_has_native_bf16, default_dtype, human_bytes, parse_dtype, resolve_dtype, restricted_unpickle,
                       safe_torch_load, torchrun_ranks)


def test_default_device_and_dtype():
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16 and resolve_dtype("float32", "cpu") is torch.float32
    assert resolve_dtype("fp16", "cpu") is torch.float16 and resolve_dtype(torch.float64, "cpu") is torch.float64
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_has_native_bf16() == native
    assert default_dtype("cpu") == (torch.bfloat16 if native else torch.float32)


def test_dtype_names_and_errors():
    assert parse_dtype("half") is torch.float16 and parse_dtype("torch.bfloat16") is torch.bfloat16
    assert parse_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'int3'; choose one of"):
        parse_dtype("int3")


def test_torchrun_ranks_read_once_from_the_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert torchrun_ranks() == Ranks(0, 1, 0) and torchrun_ranks().is_main
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_ranks() == Ranks(5, 8, 1) and not torchrun_ranks().is_main


def test_xformers_is_a_clear_error_where_it_cannot_run():
    with pytest.raises(ValueError, match="'xformers' needs a CUDA device"):
        check_attention_device("xformers", "cpu")
    check_attention_device("sdpa", "cpu")


def test_xformers_that_cannot_run_is_not_chosen(monkeypatch):
    """An xformers that imports but declines every kernel (a wheel built for another torch or CUDA,
    as on the GPU image: "xFormers wasn't build with CUDA support") is named and not used; one whose
    attention runs forward and backward is; none installed says so."""
    import sys
    import types

    from llama import env

    def fake(attention):
        ops = types.ModuleType("xformers.ops")
        ops.fmha = types.SimpleNamespace(memory_efficient_attention=attention,
                                         attn_bias=types.SimpleNamespace(LowerTriangularFromBottomRightMask=lambda: None))
        monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
        monkeypatch.setitem(sys.modules, "xformers.ops", ops)

    def declines(q, k, v, attn_bias=None):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n "
                                  "`fa2F@2.5.7-pt` is not supported because: xFormers wasn't build with CUDA support")

    fake(declines)
    assert "No operator found" in env.xformers_unusable("cpu")
    monkeypatch.setattr(env, "xformers_unusable", lambda device: "NotImplementedError: No operator found")
    with pytest.warns(UserWarning, match=r"xformers is installed but cannot run here \(NotImplementedError"):
        assert env.auto_attention_backend("cuda") == "sdpa"
    monkeypatch.undo()

    fake(lambda q, k, v, attn_bias=None: q * 2)  # runs, and differentiates
    assert env.xformers_unusable("cpu") is None
    monkeypatch.setattr(env, "xformers_unusable", lambda device: None)
    assert env.auto_attention_backend("cuda") == "xformers"
    monkeypatch.undo()

    monkeypatch.setitem(sys.modules, "xformers", None)  # not installed: import fails
    assert env.xformers_unusable("cpu") == "not installed"
    assert env.auto_attention_backend("cpu") == "blocked"


def test_atomic_write_leaves_the_old_file_when_it_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write_text("old", path)

    def fail(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_text("new", path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_compute_dtype_follows_the_measured_matmul_speed(monkeypatch, tmp_path):
    import llama.env as env

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    env._MEASURED.clear()
    speeds = env.cpu_matmul_speeds(n=256, seconds=0.02)
    assert set(speeds) == {"bf16", "fp32"} and all(v > 1e8 for v in speeds.values())
    assert (tmp_path / "llama" / "matmul_speeds.json").is_file()  # cached per CPU, threads and torch
    env._MEASURED.clear()
    assert env.cpu_matmul_speeds() == speeds  # read back from the file, not measured again
    for fast, want in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        monkeypatch.setattr(env, "cpu_matmul_speeds", lambda: {"bf16": 2e11 if fast == "bf16" else 1e11,
                                                               "fp32": 2e11 if fast == "fp32" else 1e11})
        dt, why = env.compute_dtype("cpu")
        assert dt is want and "measured" in why and "200 GFLOP/s" in why


def test_cached_measurement_keeps_only_what_it_is_told(monkeypatch, tmp_path):
    import llama.env as env

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    env._MEASURED.clear()
    calls = []
    measure = lambda: calls.append(1) or {"n": len(calls)}  # noqa: E731
    assert env.cached_measurement("t", "k", measure, keep=lambda v: False) == {"n": 1}
    assert env.cached_measurement("t", "k", measure) == {"n": 2}  # measured again: the first was not kept
    env._MEASURED.clear()
    assert env.cached_measurement("t", "k", measure) == {"n": 2}  # now from ~/.cache/llama/t.json
    assert json.loads((tmp_path / "llama" / "t.json").read_text()) == {"k": {"n": 2}}


def test_dir_lock_is_reentrant_in_a_process_and_leaves_nothing(tmp_path):
    a = DirLock(tmp_path / "run", "training run").acquire()
    holder = json.loads((tmp_path / "run" / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["what"] == "training run" and holder["started"].startswith("20")
    with DirLock(tmp_path / "run"):  # the same process again (a second Trainer on the run)
        pass
    assert (tmp_path / "run" / ".lock").exists()  # still held by `a`
    a.release()
    assert list((tmp_path / "run").iterdir()) == []


def test_safe_reads_refuse_code_and_name_corruption(tmp_path):
    class Boom:
        def __reduce__(self):
            return os.system, ("echo never",)
    torch.save({"x": Boom()}, tmp_path / "p.pt")
    with pytest.raises(UnsafeFileError, match=rf"^refused to unpickle {tmp_path / 'p.pt'} \(it holds code or "
                                              r"non-tensor objects: it asks for posix.system\): not loaded for safety"):
        safe_torch_load(tmp_path / "p.pt")
    torch.save({"x": torch.ones(2)}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot read rank state .*cut.pt: it is truncated or corrupt"):
        safe_torch_load(tmp_path / "cut.pt", what="rank state")
    data = pickle.dumps([Path("a"), {1: 2}])
    allowed = {("pathlib", "PosixPath"): Path}
    assert restricted_unpickle(io.BytesIO(data), lambda m, n: allowed.get((m, n))) == [Path("a"), {1: 2}]
    with pytest.raises(UnsafeFileError, match=r"it asks for posix.system"):
        restricted_unpickle(io.BytesIO(pickle.dumps(Boom())), lambda m, n: allowed.get((m, n)), "x")
    with pytest.raises(ValueError, match=r"cannot read x: it is truncated or corrupt"):
        restricted_unpickle(io.BytesIO(data[:-3]), lambda m, n: allowed.get((m, n)), "x")


def test_disk_full_sentence():
    assert human_bytes(512) == "512 B" and human_bytes(3 * 2**30) == "3.0 GiB"
    assert str(DiskFullError("/ckpt", 5 * 2**30, 2**30)) == (
        "disk full at /ckpt (needed ~5.0 GiB, free 1.0 GiB); free some space or write elsewhere")


def test_staged_files_move_together_or_not_at_all(tmp_path, monkeypatch):
    """Files staged for a folder replace its old ones only at the end; a failure before then (here:
    the flush to disk at the end, as on a full disk) leaves the old files and no staged ones."""
    import llama.env

    (tmp_path / "a").write_text("old a")
    (tmp_path / "gone").write_text("old")

    def full_disk(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(llama.env, "fsync_path", full_disk)
    with pytest.raises(OSError, match="No space"):
        with StagedFiles(tmp_path) as files:
            files.write_text("new a", "a")
            files.write_text("new b", "b")
            files.remove("gone")
            assert sorted(p.name for p in tmp_path.iterdir()) == [".a.staged", ".b.staged", "a", "gone"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "gone"] and (tmp_path / "a").read_text() == "old a"
    monkeypatch.undo()
    with StagedFiles(tmp_path) as files:
        files.write_text("new a", "a")
        files.write_text("new b", "b")
        files.remove("gone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"] and (tmp_path / "a").read_text() == "new a"
