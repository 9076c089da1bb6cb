"""Training checkpoints: `CheckpointManager` saves, rotates, verifies and loads them;
`export_checkpoint` turns one into Meta's layout.

A checkpoint is a torch.distributed.checkpoint (DCP) directory `out_dir/checkpoints/step_NNNNNNNN`
holding the sharded model and optimizer, one `rank_NNNNN.pt` per rank (data-loader position and RNG
states, read back with weights_only=True) and `meta.json` (step, resolved config, model args,
layout, and a manifest: every file's size). Each is written under a `.tmp-` name, fsynced, then
renamed: a save that dies half way leaves the previous checkpoint as the latest. A save first checks
the free space (model + optimizer bytes) and removes its temporary folder when it fails.

Reading runs no code from the files: DCP's `.metadata` is a pickle, read here with an allow-list of
DCP's metadata classes (torch's own reader unpickles it without restriction), and the non-tensor
entries of the state (optimizer hyper-parameters) are read with weights_only=True. Resuming checks
the manifest of the latest checkpoint and falls back to the newest intact one, saying which it
skipped and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import random
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from llama.chat import trained_chat_template
from llama.env import (DiskFullError, UnsafeFileError, atomic_save, check_free_space, free_bytes, fsync_path,
                       fsync_tree, is_disk_full, parse_dtype, restricted_unpickle, safe_torch_load)
from llama.formats.meta import save_meta_checkpoint
from llama.model import ModelArgs, Transformer

CKPT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
META = "meta.json"


DCP_METADATA = ".metadata"


def read_checkpoint_meta(ckpt: str | Path) -> dict:
    ckpt = Path(ckpt)
    if not (ckpt / META).is_file():
        raise FileNotFoundError(f"{ckpt} is not a training checkpoint (no {META}); "
                                f"give a directory out_dir/checkpoints/{CKPT_PREFIX}NNNNNNNN")
    try:
        meta = json.loads((ckpt / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ckpt / META} is not valid JSON ({e}): the checkpoint is damaged") from None
    if not isinstance(meta, dict) or not {"step", "model_args", "config"} <= set(meta):
        raise ValueError(f"{ckpt / META} lacks step, model_args or config: the checkpoint is damaged")
    return meta


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """Why `ckpt` cannot be resumed (a missing file, a size other than the manifest's, an unreadable
    meta.json), or None when it is intact. Checkpoints written before the manifest existed are only
    checked for meta.json and DCP's .metadata."""
    ckpt = Path(ckpt)
    try:
        meta = read_checkpoint_meta(ckpt)
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    files = meta.get("files") or {DCP_METADATA: None}
    for name, size in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if size is not None and f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes where {size} were written (truncated or altered)"
    return None


# ---- reading DCP checkpoints without running code from them -----------------------------------------

_PATHS = {"PosixPath": pathlib.PosixPath, "WindowsPath": pathlib.WindowsPath, "Path": pathlib.Path,
          "PurePosixPath": pathlib.PurePosixPath, "PureWindowsPath": pathlib.PureWindowsPath}


def _dcp_allowed(module: str, name: str):
    """The globals a DCP .metadata pickle may name: DCP's metadata dataclasses and enum, the
    filesystem's _StorageInfo, torch.Size, dtypes, layouts and paths. Anything else is refused."""
    if module == dcp_metadata.__name__:
        obj = getattr(dcp_metadata, name, None)
        return obj if isinstance(obj, type) and obj.__module__ == module else None
    if (module, name) == ("torch.distributed.checkpoint.filesystem", "_StorageInfo"):
        return torch.distributed.checkpoint.filesystem._StorageInfo
    if (module, name) == ("torch.serialization", "_get_layout"):  # looks a layout up by its name
        return torch.serialization._get_layout
    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
        return getattr(torch, name)
    if module == "pathlib" and name in _PATHS:
        return _PATHS[name]
    if (module, name) == ("collections", "OrderedDict"):
        return dict
    return None


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader, except that .metadata is unpickled with an allow-list
    (`_dcp_allowed`): a payload asking for anything else raises UnsafeFileError and runs nothing
    (kept in `refused`: DCP folds a failed read into an error of its own)."""

    refused: UnsafeFileError | None = None

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        name = DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}"
        path = Path(self.path) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete")
        with open(path, "rb") as f:
            try:
                metadata = restricted_unpickle(f, _dcp_allowed, path)
            except UnsafeFileError as e:
                self.refused = e
                raise
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise ValueError(f"{path} does not hold DCP metadata (found {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor entries (stored as torch.save'd bytes,
    which the default reads with weights_only=False) are read with weights_only=True."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = safe_torch_load(value, what=f"entry {read_item.dest_index.fqn} of checkpoint {self.path}")
        plain = io.BytesIO()  # plain data by now: re-encoded for the default planner to place
        torch.save(obj, plain)
        plain.seek(0)
        super().load_bytes(read_item, plain)


def _first_failure(e: BaseException) -> BaseException | None:
    """The exception a rank raised inside DCP (which wraps every rank's failure into one
    CheckpointException), preferring the clear errors raised by the readers above."""
    failures = getattr(e, "failures", None)
    if not isinstance(failures, dict):
        return None
    found = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    for kind in (UnsafeFileError, FileNotFoundError, ValueError):
        for f in found:
            if isinstance(f, kind):
                return f
    return found[0] if found else None


def dcp_load(state: dict, ckpt: Path, distributed: bool) -> None:
    """dcp.load through the safe reader and planner; failures as one sentence naming the checkpoint."""
    reader = SafeFileSystemReader(str(ckpt))
    try:
        with quiet_single_process():
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(ckpt), no_dist=not distributed)
    except (UnsafeFileError, FileNotFoundError):
        raise
    except (Exception, CheckpointException) as e:
        if reader.refused is not None:
            raise reader.refused from None
        inner = _first_failure(e) or e
        if isinstance(inner, (UnsafeFileError, FileNotFoundError)):
            raise inner from None
        msg = str(inner).splitlines()[0] if str(inner) else type(inner).__name__
        raise ValueError(f"cannot read checkpoint {ckpt}: it is truncated or corrupt ({type(inner).__name__}: "
                         f"{msg}); resume from another checkpoint") from None


def _state_bytes(obj) -> int:
    """Bytes of every tensor in a nested state dict, counting a DTensor's full (global) size."""
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    if isinstance(obj, DTensor):
        return obj.shape.numel() * obj.element_size()
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return 0


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every single-process save/load that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state(device: torch.device) -> dict:
    """The RNG states a resumed run needs to continue bit for bit (torch, Python, numpy, CUDA)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
             "numpy_rng": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                           "has_gauss": int(has_gauss), "cached": float(cached)}}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_tuples(state["python_rng"]))
    s = state["numpy_rng"]
    np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class CheckpointManager:
    """The checkpoints of one run under `out_dir/checkpoints`: save (atomic), keep the last
    `keep_last`, find the latest, load. Every rank calls save/load; rank 0 renames and rotates.
    `trainable_only`: the model's frozen parameters are left out (a LoRA run saves its adapters;
    the base comes from init_from again on resume)."""

    def __init__(self, out_dir: str | Path, keep_last: int = 3, rank: int = 0, distributed: bool = False,
                 trainable_only: bool = False):
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last, self.rank, self.distributed = keep_last, rank, distributed
        self.skipped: list[tuple[Path, str]] = []  # (checkpoint, why) passed over by the last latest()
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary dirs are ignored)."""
        if not self.root.is_dir():
            return []
        ckpts = [p for p in self.root.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / META).is_file()]
        return sorted(ckpts, key=lambda p: int(p.name[len(CKPT_PREFIX):]))

    def latest(self) -> Path | None:
        """The newest intact checkpoint (see `checkpoint_problem`); damaged newer ones are named on
        stderr (rank 0) and kept in `skipped`. None when there is none; an error when every one is
        damaged (starting over would silently drop the run)."""
        self.skipped = []
        ckpts = self.list()
        for ckpt in reversed(ckpts):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                if self.skipped and self.rank == 0:
                    for bad, why in self.skipped:
                        print(f"skipping damaged checkpoint {bad}: {why}; resuming from {ckpt.name} instead",
                              file=sys.stderr, flush=True)
                return ckpt
            self.skipped.append((ckpt, problem))
        if self.skipped:
            raise ValueError(f"every checkpoint in {self.root} is damaged ("
                             + "; ".join(f"{p.name}: {why}" for p, why in self.skipped)
                             + "): copy an intact one back, or start over with resume=never")
        return None

    def clean_tmp(self) -> None:
        """Remove what a save that died half way left behind (rank 0)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)

    def _barrier(self):
        if self.distributed:
            dist.barrier()

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (the same answer everywhere, so all ranks stop together)."""
        if not self.distributed:
            return flag
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def save(self, step: int, model, optimizer, rank_state: dict, meta: dict) -> Path:
        """Write model + optimizer (sharded), this rank's `rank_state` and rank 0's `meta` (with a
        manifest of every file's size) as the checkpoint of `step`, atomically; then drop all but
        the last `keep_last`. Raises DiskFullError, before writing, when the model and optimizer
        bytes do not fit, and when the disk fills during the save (its temporary folder removed)."""
        name = f"{CKPT_PREFIX}{step:08d}"
        tmp, final = self.root / (TMP_PREFIX + name), self.root / name
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        needed = _state_bytes(model_sd) + _state_bytes(optim_sd)  # global sizes: the same on every rank
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            check_free_space(self.root, needed)
            short = None
        except DiskFullError as e:
            short = e
        if self._any_rank(short is not None):
            raise short or DiskFullError(self.root, needed, free_bytes(self.root))
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self._barrier()
            with quiet_single_process():
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp),
                         no_dist=not self.distributed)
            atomic_save(rank_state, tmp / f"rank_{self.rank:05d}.pt")
            self._barrier()
            if self.rank == 0:
                files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
                (tmp / META).write_text(json.dumps({"step": step, **meta, "files": files}, indent=2) + "\n")
                fsync_tree(tmp)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e):
                raise DiskFullError(self.root, needed, free_bytes(self.root)) from None
            raise
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(self.root)
            for old in self.list()[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def load(self, ckpt: str | Path, model, optimizer, layout: dict) -> tuple[dict, dict, bool]:
        """Restore model and optimizer from `ckpt` (any layout); returns (meta, rank state, whether the
        layout is the same). With the same layout the rank state is this rank's own, else rank 0's
        (the loader position is global; RNG states then do not carry over)."""
        ckpt = Path(ckpt)
        problem = checkpoint_problem(ckpt)
        if problem is not None:
            raise ValueError(f"checkpoint {ckpt} is damaged: {problem}; resume from another one")
        meta = read_checkpoint_meta(ckpt)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        state = {"model": model_sd, "optim": optim_sd}
        dcp_load(state, ckpt, self.distributed)  # every key asked for must be in the checkpoint
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.options)
        same_layout = all(meta["layout"].get(k) == layout[k] for k in ("dp", "tp"))
        rank_file = ckpt / f"rank_{self.rank if same_layout else 0:05d}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(f"{rank_file} is missing: checkpoint {ckpt} is incomplete")
        return meta, safe_torch_load(rank_file, what="rank state"), same_layout


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, num_shards: int = 1,
                      dtype: torch.dtype | str | None = torch.float16, tokenizer_path: str | Path | None = None,
                      overwrite: bool = False) -> Path:
    """Write training checkpoint `ckpt` (any layout) in Meta's layout: `num_shards` consolidated.NN.pth,
    params.json and, when given (or recorded in the run's config), tokenizer.model. One process."""
    ckpt = Path(ckpt)
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise ValueError(f"checkpoint {ckpt} is damaged: {problem}; export another one")
    meta = read_checkpoint_meta(ckpt)
    if meta["config"].get("lora"):
        raise ValueError(f"{ckpt} is a checkpoint of a LoRA run: it holds the adapters, not the model; the run's "
                         f"export_dir has the merged model (set export_dir and resume the run to write it)")
    args = ModelArgs.from_dict(meta["model_args"])
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    loaded = {"model": model.state_dict()}
    dcp_load(loaded, ckpt, distributed=False)
    tokenizer_path = tokenizer_path or meta["config"].get("tokenizer")
    chat = trained_chat_template(meta["config"].get("data_format"))
    return save_meta_checkpoint(loaded["model"], args, out_dir, num_shards=num_shards, dtype=parse_dtype(dtype),
                                tokenizer_path=tokenizer_path, overwrite=overwrite, chat_template=chat)


def model_diff(saved: dict, args: ModelArgs) -> list[str]:
    """What differs between the model args a checkpoint recorded and `args`."""
    now = dataclasses.asdict(args)
    return [f"{k} {saved.get(k)} != {now[k]}" for k in now if saved.get(k) != now[k]]
