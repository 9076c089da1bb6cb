"""Training checkpoints: `CheckpointManager` saves, rotates and loads them; `export_checkpoint`
turns one into Meta's layout.

A checkpoint is a torch.distributed.checkpoint (DCP) directory `out_dir/checkpoints/step_NNNNNNNN`
holding the sharded model and optimizer, one `rank_NNNNN.pt` per rank (data-loader position and RNG
states, read back with weights_only=True) and `meta.json` (step, resolved config, model args,
layout). Each is written under a `.tmp-` name, fsynced, then renamed: a save that dies half way
leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from llama.env import atomic_save, fsync_path, fsync_tree, parse_dtype
from llama.formats.meta import save_meta_checkpoint
from llama.model import ModelArgs, Transformer

CKPT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
META = "meta.json"


def read_checkpoint_meta(ckpt: str | Path) -> dict:
    ckpt = Path(ckpt)
    if not (ckpt / META).is_file():
        raise FileNotFoundError(f"{ckpt} is not a training checkpoint (no {META}); "
                                f"give a directory out_dir/checkpoints/{CKPT_PREFIX}NNNNNNNN")
    return json.loads((ckpt / META).read_text())


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
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary dirs are ignored)."""
        if not self.root.is_dir():
            return []
        ckpts = [p for p in self.root.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / META).is_file()]
        return sorted(ckpts, key=lambda p: int(p.name[len(CKPT_PREFIX):]))

    def latest(self) -> Path | None:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def clean_tmp(self) -> None:
        """Remove what a save that died half way left behind (rank 0)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)

    def _barrier(self):
        if self.distributed:
            dist.barrier()

    def save(self, step: int, model, optimizer, rank_state: dict, meta: dict) -> Path:
        """Write model + optimizer (sharded), this rank's `rank_state` and rank 0's `meta` as the
        checkpoint of `step`, atomically; then drop all but the last `keep_last`."""
        name = f"{CKPT_PREFIX}{step:08d}"
        tmp, final = self.root / (TMP_PREFIX + name), self.root / name
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        with quiet_single_process():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=not self.distributed)
        atomic_save(rank_state, tmp / f"rank_{self.rank:05d}.pt")
        self._barrier()
        if self.rank == 0:
            (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
            fsync_tree(tmp)
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
        meta = read_checkpoint_meta(ckpt)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        state = {"model": model_sd, "optim": optim_sd}
        with quiet_single_process():  # every key asked for must be in the checkpoint
            dcp.load(state, checkpoint_id=str(ckpt), no_dist=not self.distributed)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.options)
        same_layout = all(meta["layout"].get(k) == layout[k] for k in ("dp", "tp"))
        rank_file = ckpt / f"rank_{self.rank if same_layout else 0:05d}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(f"{rank_file} is missing: checkpoint {ckpt} is incomplete")
        return meta, torch.load(rank_file, weights_only=True), same_layout


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, num_shards: int = 1,
                      dtype: torch.dtype | str | None = torch.float16, tokenizer_path: str | Path | None = None,
                      overwrite: bool = False) -> Path:
    """Write training checkpoint `ckpt` (any layout) in Meta's layout: `num_shards` consolidated.NN.pth,
    params.json and, when given (or recorded in the run's config), tokenizer.model. One process."""
    ckpt = Path(ckpt)
    meta = read_checkpoint_meta(ckpt)
    if meta["config"].get("lora"):
        raise ValueError(f"{ckpt} is a checkpoint of a LoRA run: it holds the adapters, not the model; the run's "
                         f"export_dir has the merged model (set export_dir and resume the run to write it)")
    args = ModelArgs.from_dict(meta["model_args"])
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    loaded = {"model": model.state_dict()}
    with quiet_single_process():
        dcp.load(loaded, checkpoint_id=str(ckpt), no_dist=True)
    tokenizer_path = tokenizer_path or meta["config"].get("tokenizer")
    return save_meta_checkpoint(loaded["model"], args, out_dir, num_shards=num_shards, dtype=parse_dtype(dtype),
                                tokenizer_path=tokenizer_path, overwrite=overwrite)


def model_diff(saved: dict, args: ModelArgs) -> list[str]:
    """What differs between the model args a checkpoint recorded and `args`."""
    now = dataclasses.asdict(args)
    return [f"{k} {saved.get(k)} != {now[k]}" for k in now if saved.get(k) != now[k]]
