"""The environment a run finds itself in: torchrun's ranks, the device and dtype, safe file writes
and reads (atomic writes, pickles read without running code, free-space checks, directory locks).

Every other module asks here instead of reading RANK / WORLD_SIZE / LOCAL_RANK or guessing a dtype
itself, so there is one answer per process.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but this torch sees no CUDA GPU (torch {torch.__version__})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device} asked for, but MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device} is not supported; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torchrun_ranks().local_rank)
    return device


def scoring_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None) -> str | torch.dtype | None:
    """The dtype evaluation loads a model in: `dtype` when given, else fp32 on a CPU, so that scores do
    not depend on which CPU ran them (bf16 moves log-likelihoods by ~0.1 nat, enough to flip a close
    choice), else None (the library's default for the device)."""
    if dtype is None and resolve_device(device).type == "cpu":
        return "float32"
    return dtype


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


_MEASURED: dict = {}  # (file name, key) -> what `cached_measurement` measured in this process


def machine_key() -> str:
    """What a speed measured on this machine depends on: CPU model, thread count, torch."""
    return f"{cpu_model_name()} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def cached_measurement(name: str, key: str, measure: Callable[[], dict],
                       keep: Callable[[dict], bool] = lambda value: True) -> dict:
    """measure() once per `key`: kept in memory and in ~/.cache/llama/NAME.json (XDG_CACHE_HOME),
    so later processes on the same machine read it instead of measuring again; a value `keep`
    rejects (e.g. an inconclusive measurement on a busy machine) is returned but not kept."""
    if (name, key) in _MEASURED:
        return _MEASURED[name, key]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama" / f"{name}.json"
    try:
        saved = json.loads(cache.read_text())
    except (OSError, ValueError):
        saved = {}
    saved = saved if isinstance(saved, dict) else {}
    if isinstance(saved.get(key), dict):
        _MEASURED[name, key] = saved[key]
        return saved[key]
    value = measure()
    if not keep(value):
        return value
    _MEASURED[name, key] = value
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps({**saved, key: value}, indent=1), cache)
    except OSError:
        pass  # a read-only home: measure again next time
    return value


def cpu_matmul_speeds(n: int = 1024, seconds: float = 0.15) -> dict[str, float]:
    """{"bf16": FLOP/s, "fp32": FLOP/s} of an (n, n) @ (n, n) matmul on this CPU with the current
    thread count: the best of repeated products over `seconds` per dtype (~0.4 s in all). Cached
    per CPU model, thread count and torch (`cached_measurement`, matmul_speeds.json)."""
    def measure() -> dict[str, float]:
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
        return speeds
    return cached_measurement("matmul_speeds", machine_key(), measure)


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


_SAID: set = set()


def say_once(message: str) -> None:
    """Print `message` to stderr the first time this process says it (rank 0 only under torchrun)."""
    if message not in _SAID and torchrun_ranks().rank == 0:
        _SAID.add(message)
        print(message, file=sys.stderr, flush=True)


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
    """The trainer's default: xformers on CUDA where it is installed (the paper's memory-efficient
    kernel), blocked on CPUs (1.5-2.3x torch's CPU flash attention forward + backward at 512
    positions), else sdpa."""
    if torch.device(device).type == "cpu":
        return "blocked"
    if torch.device(device).type == "cuda":
        reason = xformers_unusable(device)
        if reason is None:
            return "xformers"
        if reason != "not installed":
            warnings.warn(f"xformers is installed but cannot run here ({reason}); attention uses sdpa", stacklevel=2)
    return "sdpa"


def xformers_unusable(device: torch.device | str) -> str | None:
    """None where xformers' causal attention runs forward and backward on `device`, else why not.
    Its wheels are built for one torch and CUDA: elsewhere `xformers.ops` imports, and every kernel
    declines at the first call (seen: xformers 0.0.35 on torch 2.11 + CUDA 13)."""
    try:
        from xformers.ops import fmha
    except ImportError:
        return "not installed"
    try:
        q = torch.randn(1, 16, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        causal = fmha.attn_bias.LowerTriangularFromBottomRightMask()
        fmha.memory_efficient_attention(q, q, q, attn_bias=causal).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means: do not train on it
        return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return None


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


class StagedFiles:
    """The files of one model written into `folder` as a whole: each under a hidden name beside its
    destination (`.NAME.staged`), and all moved into place, with the files to `remove`, only once
    every one is written. A write that fails or is interrupted halfway leaves the folder as it was:
    never some new shards beside old ones (read as one model: the old weights mixed into the new),
    and never the old model deleted before the new one is whole. Its staged files are removed, or,
    after a kill, by the next write into the folder. Until the end the folder needs room for the old
    files and the new. Use under a DirLock on `folder` (the staged names are not per process):

        with DirLock(folder), StagedFiles(folder) as files:
            files.save(state, "consolidated.00.pth"); files.write_text(text, "params.json")
            files.remove("context.json")
    """

    SUFFIX = ".staged"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.staged: dict[str, Path] = {}
        self.removed: set[str] = set()
        for left in self.folder.glob(f".*{self.SUFFIX}"):  # from a write that was killed (the lock is ours now)
            left.unlink()

    def path(self, name: str) -> Path:
        """Where to write the file `name` now (moved to folder/name at the end)."""
        self.removed.discard(name)
        self.staged[name] = self.folder / f".{name}{self.SUFFIX}"
        return self.staged[name]

    def save(self, obj, name: str) -> None:
        torch.save(obj, self.path(name))

    def write_text(self, text: str, name: str) -> None:
        self.path(name).write_text(text, encoding="utf-8")

    def copy(self, src: str | os.PathLike, name: str) -> None:
        shutil.copyfile(src, self.path(name))

    def remove(self, name: str) -> None:
        """Delete folder/name at the end (a file of the old model that the new one does not have)."""
        if name in self.staged:
            self.staged.pop(name).unlink(missing_ok=True)
        self.removed.add(name)

    def commit(self) -> None:
        """Flush every staged file to disk, delete the removed ones, then rename the staged ones into
        place (a few renames: the only moment the folder holds part old, part new). Where this fails
        (a full disk at the flush), the files not yet in place are deleted."""
        try:
            for p in self.staged.values():
                fsync_path(p)
            # the removals first: weights left over from the old model would be read with the new
            # ones; a crash between removals and renames leaves a file missing instead
            for name in self.removed:
                (self.folder / name).unlink(missing_ok=True)
            while self.staged:
                name, p = next(iter(self.staged.items()))
                os.replace(p, self.folder / name)
                del self.staged[name]
            fsync_path(self.folder)
        finally:
            self.discard()

    def discard(self) -> None:
        for p in self.staged.values():
            p.unlink(missing_ok=True)
        self.staged.clear()

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


# ---------------------------------------------------------------------------------------------
# reading files that may come from someone else


class UnsafeFileError(ValueError):
    """A pickle that asks for code or objects beyond plain data: refused, never run."""


def refused_message(path, detail: str = "") -> str:
    return (f"refused to unpickle {path} (it holds code or non-tensor objects{': ' + detail if detail else ''}): "
            f"not loaded for safety; get the file again from a source you trust")


def safe_torch_load(path: str | os.PathLike, what: str = "file", **kwargs):
    """`torch.load(path, weights_only=True, map_location="cpu", **kwargs)` with its failures as one
    sentence: a pickle asking for anything but tensors and plain containers raises UnsafeFileError
    (refused for safety: torch's own message would suggest weights_only=False, which runs the code),
    a truncated or foreign file a ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"cannot read {what} {path}: it is truncated or corrupt (UnpicklingError: {e})") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise UnsafeFileError(refused_message(path, f"it asks for {found.group(1)}" if found else "")) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        if isinstance(e, RuntimeError) and "mmap can only be used" in str(e):
            raise  # the caller retries without mmap (a legacy, pre-zip file)
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot read {what} {path}: it is truncated or corrupt ({type(e).__name__}: {first}); "
                         f"write or copy it again") from None


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: Callable[[str, str], object | None], path):
        super().__init__(file)
        self.allowed, self.path = allowed, path

    def find_class(self, module: str, name: str):
        obj = self.allowed(module, name)
        if obj is None:
            raise UnsafeFileError(refused_message(self.path, f"it asks for {module}.{name}"))
        return obj


def restricted_unpickle(file, allowed: Callable[[str, str], object | None], path="<stream>"):
    """pickle.load from `file` where every global the pickle names goes through `allowed(module, name)`,
    which returns the object to use or None to refuse (UnsafeFileError, nothing run). A file that is
    cut short or not a pickle is a ValueError naming `path`."""
    try:
        return _AllowListUnpickler(file, allowed, path).load()
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"cannot read {path}: it is truncated or corrupt ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# disk space


class DiskFullError(OSError):
    """Not enough free space for a write; the message names the path, the bytes needed and free."""

    def __init__(self, path, needed: int | None, free: int | None):
        need = f"needed ~{human_bytes(needed)}" if needed is not None else "needed more"
        super().__init__(errno.ENOSPC, f"disk full at {path} ({need}, free {human_bytes(free)}); free some space "
                                       f"or write elsewhere")

    def __str__(self):
        return self.strerror


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for an unprivileged user) on the filesystem holding `path` or its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(path: str | os.PathLike, needed: int, margin: float = 0.05) -> None:
    """Raise DiskFullError unless `needed` bytes (plus `margin` of it) fit at `path`."""
    free = free_bytes(path)
    if free < needed * (1 + margin):
        raise DiskFullError(path, needed, free)


def is_disk_full(e: BaseException) -> bool:
    """Whether `e`, or an error it wraps (cause, context, or the per-rank failures of a distributed
    checkpoint's exception), is "no space left on device"."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, tuple):  # torch's (exception, traceback) pairs
            todo.extend(v for v in x if isinstance(v, BaseException))
            continue
        if (isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(x):
            return True
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += list(failures.values())
    return False


# ---------------------------------------------------------------------------------------------
# owning a directory


class DirectoryLockedError(FileExistsError):
    """Another live process holds the directory's lock."""


_held: dict[str, list] = {}  # lock file -> [open file, count]: a process may take its own lock again
_held_guard = threading.Lock()


class DirLock:
    """An exclusive lock on a directory for the life of a job: `fcntl.flock` on a lock file, with the
    holder's pid, host and start time written in it. A second process is refused with a
    DirectoryLockedError naming the holder; a lock whose holder died is free (the kernel drops a
    flock with its process), so it is simply taken over. The same process may take it again
    (counted). The lock file is removed on release. Note: flock does not reach across hosts on some
    network filesystems (old NFS); there each host only sees its own runs.

    lock_file: default `path/.lock` (the directory is created); a destination that is renamed into
    place (prepared data) uses a sibling `.NAME.lock`."""

    def __init__(self, path: str | os.PathLike, what: str = "job", lock_file: str | os.PathLike | None = None):
        self.path = Path(path)
        self.what = what
        self.lock_file = Path(lock_file) if lock_file is not None else self.path / ".lock"
        self.held = False

    def acquire(self) -> "DirLock":
        if self.held:
            return self
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.lock_file.absolute())
        with _held_guard:
            if key in _held:
                _held[key][1] += 1
                self.held = True
                return self
            while True:
                f = open(self.lock_file, "a+")
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.seek(0)
                    holder = _describe_holder(f.read())
                    f.close()
                    raise DirectoryLockedError(
                        f"{self.path} is in use by another {self.what} ({holder}); wait for it to finish, "
                        f"stop it, or choose another directory") from None
                # the file may have been unlinked by a holder releasing it between our open and flock
                try:
                    same = os.stat(self.lock_file).st_ino == os.fstat(f.fileno()).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                f.close()
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                                "started": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")
            f.flush()
            _held[key] = [f, 1]
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        key = str(self.lock_file.absolute())
        with _held_guard:
            entry = _held.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                self.lock_file.unlink(missing_ok=True)  # while still locked: no one holds a stale name
                entry[0].close()

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"
