"""llama.env: the torchrun environment, device and dtype choices, atomic writes."""

import os
from pathlib import Path

import pytest
import torch

from llama.env import (Ranks, atomic_write_text, check_attention_device, cpu_has_native_bf16, default_dtype,
                       parse_dtype, resolve_dtype, torchrun_ranks)


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
    env._MATMUL_SPEEDS.clear()
    speeds = env.cpu_matmul_speeds(n=256, seconds=0.02)
    assert set(speeds) == {"bf16", "fp32"} and all(v > 1e8 for v in speeds.values())
    assert (tmp_path / "llama" / "matmul_speeds.json").is_file()  # cached per CPU, threads and torch
    env._MATMUL_SPEEDS.clear()
    assert env.cpu_matmul_speeds() == speeds  # read back from the file, not measured again
    for fast, want in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        monkeypatch.setattr(env, "cpu_matmul_speeds", lambda: {"bf16": 2e11 if fast == "bf16" else 1e11,
                                                               "fp32": 2e11 if fast == "fp32" else 1e11})
        dt, why = env.compute_dtype("cpu")
        assert dt is want and "measured" in why and "200 GFLOP/s" in why
