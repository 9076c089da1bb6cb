"""The environment a run finds itself in: torchrun's ranks, the device and dtype, and safe file writes.

Every other module asks here instead of reading RANK / WORLD_SIZE / LOCAL_RANK or guessing a dtype
itself, so there is one answer per process.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------
# torchrun


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in a torchrun launch; (0, 1, 0) when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_with_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_ranks() -> Ranks:
    """The ranks torchrun put in the environment (before any process group exists)."""
    if not launched_with_torchrun():
        return Ranks()
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device_type: str | None = None, timeout_s: int = 1800) -> Ranks:
    """Join the process group torchrun describes (nccl on CUDA, gloo otherwise); no group, and
    Ranks(0, 1, 0), when not launched by torchrun."""
    if not launched_with_torchrun():
        return Ranks()
    ranks = torchrun_ranks()
    if not dist.is_initialized():
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Ranks(dist.get_rank(), dist.get_world_size(), ranks.local_rank)


# ---------------------------------------------------------------------------------------------
# device and dtype

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """torch.float16 / "fp16" / "bf16" / "fp32" / ... -> a torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def default_device(local_rank: int | None = None) -> torch.device:
    """cuda (this rank's GPU), else mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", torchrun_ranks().local_rank if local_rank is None else local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A device name or None (the default device); "cuda" means this rank's GPU."""
    if device is None or device == "auto":
        return default_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torchrun_ranks().local_rank)
    return device


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype to hold weights in for generation: bf16 on GPUs that have it, fp16 on older GPUs
    and MPS; on a CPU bf16 where it multiplies bf16 natively (decoding reads every weight per token,
    so half the bytes wins even where bf16 matmuls are slower than fp32), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


_MATMUL_SPEEDS: dict = {}


def cpu_matmul_speeds(n: int = 1024, seconds: float = 0.15) -> dict[str, float]:
    """{"bf16": FLOP/s, "fp32": FLOP/s} of an (n, n) @ (n, n) matmul on this CPU with the current
    thread count: the best of repeated products over `seconds` per dtype (~0.4 s in all). Cached
    in memory and in ~/.cache/llama/matmul_speeds.json per CPU model, thread count and torch."""
    key = f"{cpu_model_name()} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    if key in _MATMUL_SPEEDS:
        return _MATMUL_SPEEDS[key]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama" / "matmul_speeds.json"
    try:
        saved = json.loads(cache.read_text())
    except (OSError, ValueError):
        saved = {}
    if isinstance(saved, dict) and isinstance(saved.get(key), dict):
        _MATMUL_SPEEDS[key] = saved[key]
        return saved[key]
    speeds = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm up
        best, end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < end or best == float("inf"):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        speeds[name] = 2 * n ** 3 / best
    _MATMUL_SPEEDS[key] = speeds
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps({**(saved if isinstance(saved, dict) else {}), key: speeds}, indent=1), cache)
    except OSError:
        pass  # a read-only home: measure again next time
    return speeds


def compute_dtype(device: torch.device | str) -> tuple[torch.dtype, str]:
    """The dtype to compute training and prefill matmuls in, and why: bf16 on GPUs; on a CPU the
    faster of bf16 and fp32 as measured by `cpu_matmul_speeds` (some CPUs with AVX512-BF16 but no
    AMX multiply fp32 twice as fast as bf16)."""
    device = torch.device(device)
    if device.type != "cpu":
        dt = default_dtype(device)
        return dt, f"{dtype_name(dt)} on {device.type}"
    speeds = cpu_matmul_speeds()
    dt = torch.bfloat16 if speeds["bf16"] > speeds["fp32"] else torch.float32
    return dt, (f"{dtype_name(dt)}: measured on {cpu_model_name()} with {torch.get_num_threads()} threads, "
                f"bf16 matmul {speeds['bf16'] / 1e9:.0f} GFLOP/s vs fp32 {speeds['fp32'] / 1e9:.0f} GFLOP/s")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """A dtype name or torch dtype; None picks the device's default."""
    return default_dtype(device) if dtype is None else parse_dtype(dtype)


def check_attention_device(backend: str, device: torch.device | str) -> None:
    """Raise a clear error where attention `backend` cannot run on `device` (xformers: CUDA only)."""
    if backend == "xformers":
        if torch.device(device).type != "cuda":
            raise ValueError(f"attention backend 'xformers' needs a CUDA device (got {device}); use 'sdpa'")
        try:
            import xformers.ops  # noqa: F401
        except ImportError:
            raise ValueError("attention backend 'xformers' is not installed: pip install 'llama[gpu]', "
                             "or use 'sdpa'") from None


def auto_attention_backend(device: torch.device | str) -> str:
    """xformers on CUDA where it is installed (the paper's memory-efficient kernel), else sdpa."""
    if torch.device(device).type == "cuda":
        try:
            import xformers.ops  # noqa: F401
            return "xformers"
        except ImportError:
            pass
    return "sdpa"


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# files


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            fsync_path(p)
    fsync_path(path)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write `path` so that a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` atomically."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        torch.save(obj, tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
