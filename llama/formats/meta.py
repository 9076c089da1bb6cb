"""Meta's checkpoint layout: read, write, reshard, and slice for tensor parallelism.

A checkpoint directory holds `params.json` and one `consolidated.NN.pth` per model-parallel rank
(a torch.save'd state dict; fp16 in Meta's releases), optionally `tokenizer.model`. Each sharded
weight is split across the P files along the dimension `meta_split_dim(key)` gives; norms are
replicated; `rope.freqs` (a buffer some releases carry) is dropped on load.

Every shard is opened with `torch.load(weights_only=True, mmap=True)`: nothing runs from the
pickle, and a tensor's bytes are only read when a slice of it is used. So loading one rank's
tensor-parallel slice, or resharding P -> Q, holds about one slice / one output shard in memory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from llama.config import read_json_object
from llama.env import DirLock, StagedFiles, check_free_space, dtype_name, parse_dtype, safe_torch_load
from llama.model import ModelArgs, Transformer, weight_info
from llama.tokenizer import CHAT_TEMPLATE_FILE

PARAMS = "params.json"
TOKENIZER = "tokenizer.model"
VOCAB_FILE = "tokenizer.gguf"  # a byte-level BPE vocabulary beside a Meta-layout checkpoint (llama.formats.gguf)
DROPPED_KEYS = ("rope.freqs",)
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")


def meta_split_dim(key: str) -> int | None:
    """The dimension along which Meta's checkpoints split `key` across model-parallel shards
    (None: replicated); an unknown key is kept whole."""
    try:
        return weight_info(key).meta_dim
    except KeyError:
        return None


def tp_shard_dim(key: str) -> int | None:
    """The dimension of `key` that our tensor-parallel plan splits (None: replicated)."""
    try:
        return weight_info(key).tp_dim
    except KeyError:
        return None


def shard_name(i: int) -> str:
    return f"consolidated.{i:02d}.pth"


def shard_paths(ckpt_dir: str | Path) -> list[Path]:
    """The `consolidated.NN.pth` files of `ckpt_dir` in rank order; a gap in the numbering is an error."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    found = {int(m.group(1)): p for p in ckpt_dir.iterdir() if (m := _SHARD_RE.match(p.name))}
    if not found:
        raise FileNotFoundError(f"no consolidated.NN.pth shards in {ckpt_dir}")
    n = max(found) + 1
    missing = [shard_name(i) for i in range(n) if i not in found]
    if missing:
        raise FileNotFoundError(f"checkpoint {ckpt_dir} is missing shard(s) {missing} "
                                f"(found {[found[i].name for i in sorted(found)]}); copy them in or re-download")
    return [found[i] for i in range(n)]


def _open_shard(path: Path) -> dict:
    # a pickle asking for code is refused for safety (UnsafeFileError), a cut or foreign file is
    # "truncated or corrupt": both one sentence naming the shard
    try:
        sd = safe_torch_load(path, what="checkpoint shard", mmap=True)
    except RuntimeError:  # "mmap can only be used with ... zipfile": the legacy (pre-zip) format, read whole
        sd = safe_torch_load(path, what="checkpoint shard")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint shard {path} does not hold a state dict of tensors")
    for k in DROPPED_KEYS:
        sd.pop(k, None)
    return sd


def _expected_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = Transformer(args)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_state_dict(shapes: dict[str, tuple], args: ModelArgs, what: str = "checkpoint") -> None:
    """Raise a ValueError naming missing and unexpected keys and mismatched shapes of `shapes`
    (key -> full shape) against the model `args` describes."""
    expected = _expected_shapes(args)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    bad = [f"{k}: {what} {list(shapes[k])} vs model {list(expected[k])}"
           for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    if bad:
        problems.append("shape mismatch " + "; ".join(bad))
    if problems:
        raise ValueError(f"{what} does not match the model ({args}): " + ". ".join(problems))


class _Shards:
    """The mmapped shards of a checkpoint and the full shape of every key, checked for agreement."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        self.paths = shard_paths(self.dir)
        self.sds = [_open_shard(p) for p in self.paths]
        first = self.sds[0]
        for p, sd in zip(self.paths[1:], self.sds[1:]):
            if set(sd) != set(first):
                diff = sorted(set(sd) ^ set(first))
                raise ValueError(f"shards disagree: {p.name} and {self.paths[0].name} hold different keys {diff[:8]}")
        self.shapes: dict[str, torch.Size] = {}
        for k, t0 in first.items():
            d = meta_split_dim(k)
            for p, sd in zip(self.paths[1:], self.sds[1:]):
                t = sd[k]
                same = [i for i in range(t0.dim()) if i != d]
                if t.dim() != t0.dim() or [t.shape[i] for i in same] != [t0.shape[i] for i in same] or t.dtype != t0.dtype:
                    raise ValueError(f"shards disagree on {k}: {p.name} has {list(t.shape)} {t.dtype}, "
                                     f"{self.paths[0].name} has {list(t0.shape)} {t0.dtype}")
                if d is None and t.numel() <= 1 << 20 and not torch.equal(t, t0):
                    raise ValueError(f"shards disagree: replicated {k} differs between {p.name} and {self.paths[0].name}")
            shape = list(t0.shape)
            if d is not None:
                shape[d] = sum(sd[k].shape[d] for sd in self.sds)
            self.shapes[k] = torch.Size(shape)

    def __len__(self):
        return len(self.sds)

    def slice(self, key: str, dim: int | None, rank: int, world: int) -> torch.Tensor:
        """Rank `rank`'s chunk (of `world`) along `dim` of the full tensor `key`, built by narrowing
        the shards: only the bytes of this chunk are read."""
        m = meta_split_dim(key)
        if dim is None:
            if m is None:
                return self.sds[0][key]
            dim = m  # a key our plan replicates but Meta splits: gather it whole
            rank, world = 0, 1
        full = self.shapes[key][dim]
        if full % world:
            raise ValueError(f"{key} has size {full} on dim {dim}, not divisible by {world} ranks")
        lo, hi = rank * full // world, (rank + 1) * full // world
        if m is None:  # replicated in the checkpoint
            return self.sds[0][key].narrow(dim, lo, hi - lo)
        pieces, off = [], 0
        for sd in self.sds:
            t = sd[key]
            if dim == m:  # overlap of [lo, hi) with this shard's [off, off + n)
                n = t.shape[m]
                a, b = max(lo, off), min(hi, off + n)
                off += n
                if a < b:
                    pieces.append(t.narrow(m, a - (off - n), b - a))
            else:
                pieces.append(t.narrow(dim, lo, hi - lo))
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=m)
        return out.contiguous()


REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "norm_eps")  # every params.json Meta ships has them
# beside params.json, when the model was trained for another context than 2048: {"max_seq_len": N}.
# Not in params.json: Meta's loaders call ModelArgs(max_seq_len=..., **params), so a second one fails.
CONTEXT = "context.json"


def _read_params(ckpt_dir: Path) -> dict:
    if ckpt_dir.is_file():
        raise NotADirectoryError(f"{ckpt_dir} is a file, not a checkpoint directory (the folder holding params.json "
                                 f"and consolidated.NN.pth)")
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist; give a folder holding "
                                f"params.json and consolidated.NN.pth")
    if not (ckpt_dir / PARAMS).is_file() and (ckpt_dir / "model" / PARAMS).is_file():
        raise FileNotFoundError(f"{ckpt_dir} is a training run's folder; its exported model is {ckpt_dir / 'model'}")
    if not (ckpt_dir / PARAMS).is_file() and (ckpt_dir / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} holds config.json, not params.json: not Meta's layout. A transformers "
                                f"checkpoint converts with scripts/convert_hf.py --to meta --src {ckpt_dir} --dst DIR; "
                                f"a training run's model is in its export_dir")
    d = read_json_object(ckpt_dir / PARAMS, f"no {PARAMS} in {ckpt_dir}; a Meta checkpoint directory holds "
                                            f"params.json and consolidated.NN.pth")
    missing = [k for k in REQUIRED_PARAMS if k not in d]
    if missing:
        raise ValueError(f"{ckpt_dir / PARAMS} has no {missing} (a default would build another model)")
    if (ckpt_dir / CONTEXT).is_file() and "max_seq_len" not in d:
        d["max_seq_len"] = read_json_object(ckpt_dir / CONTEXT).get("max_seq_len", ModelArgs.max_seq_len)
    return d


def load_params(ckpt_dir: str | Path, vocab_size: int | None = None, **overrides) -> ModelArgs:
    """ModelArgs from `ckpt_dir/params.json`. A vocab_size of -1 (as Meta ships it) is taken from
    `vocab_size`, else from the shape of `output.weight` in the shards."""
    return _params(Path(ckpt_dir), vocab_size, None, overrides)


def _params(ckpt_dir: Path, vocab_size: int | None, shards: _Shards | None, overrides: dict) -> ModelArgs:
    d = _read_params(ckpt_dir)
    if vocab_size is not None:
        d["vocab_size"] = vocab_size
    elif d.get("vocab_size") is None or d["vocab_size"] < 0:
        shards = shards or _Shards(ckpt_dir)
        key = "output.weight" if "output.weight" in shards.shapes else "tok_embeddings.weight"  # tied: no output
        if key in shards.shapes:  # (vocab, dim) once the shards are concatenated
            d["vocab_size"] = shards.shapes[key][0]
    try:
        return ModelArgs.from_dict(d, **overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ckpt_dir / PARAMS}: {e}") from None


def _checked(ckpt_dir, vocab_size=None, **overrides) -> tuple[_Shards, ModelArgs]:
    """The opened shards and ModelArgs of a checkpoint whose keys and full shapes match params.json."""
    ckpt_dir = Path(ckpt_dir)
    shards = _Shards(ckpt_dir)
    args = _params(ckpt_dir, vocab_size, shards, overrides)
    try:
        check_state_dict(shards.shapes, args, what=f"checkpoint {ckpt_dir}")
    except ValueError as e:
        raise ValueError(_missing_shards(shards, args) or f"{e}. Check {PARAMS} and that no shard is missing") from None
    return shards, args


def _missing_shards(shards: _Shards, args: ModelArgs) -> str | None:
    """When the shards present are too narrow for params.json's dim by a whole factor, the sentence
    naming the shards missing from the end (a gap in the numbering is caught by `shard_paths`)."""
    key = "tok_embeddings.weight"
    have, n = shards.shapes.get(key), len(shards.paths)
    if have is None or have[meta_split_dim(key)] >= args.dim or (args.dim * n) % have[meta_split_dim(key)]:
        return None
    total = args.dim * n // have[meta_split_dim(key)]
    missing = [shard_name(i) for i in range(n, total)]
    return (f"checkpoint {shards.dir} holds {n} shard(s) of {total} (params.json's dim {args.dim}): missing "
            f"{missing}; copy them in or re-download")


def load_tp_slice(ckpt_dir: str | Path, rank: int, world_size: int,
                  split_dim: Callable[[str], Optional[int]] = tp_shard_dim) -> dict[str, torch.Tensor]:
    """This rank's slice of every tensor for a plan that splits `key` along `split_dim(key)` into
    `world_size` equal chunks (replicated where None), from a checkpoint with any number of shards.
    Tensors stay in the checkpoint's dtype on CPU; memory is about one slice."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    shards, _ = _checked(ckpt_dir)
    return {k: shards.slice(k, split_dim(k), rank, world_size) for k in shards.shapes}


def tp_slices(full: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's tensor-parallel slice of every full tensor in `full` (as `load_tp_slice` reads
    them from a Meta checkpoint): for weights read whole from another format."""
    return {k: v if tp_shard_dim(k) is None else v.chunk(world_size, dim=tp_shard_dim(k))[rank] for k, v in full.items()}


def load_consolidated(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full state dict of a Meta checkpoint (shards concatenated, rope.freqs dropped), checked
    against params.json. With one shard the tensors are memory-mapped views of the file."""
    return load_tp_slice(ckpt_dir, 0, 1, split_dim=meta_split_dim)


def load_model(ckpt_dir: str | Path, device=None, dtype: torch.dtype | None = None,
               vocab_size: int | None = None, **overrides) -> Transformer:
    """A `Transformer` loaded strictly from a Meta checkpoint directory, in `dtype` (default: the
    checkpoint's) on `device` (default: cpu). `overrides` set ModelArgs fields (e.g. max_seq_len)."""
    shards, args = _checked(ckpt_dir, vocab_size=vocab_size, **overrides)
    device = torch.device(device if device is not None else "cpu")
    dtype = parse_dtype(dtype)
    sd = {}
    for k in list(shards.shapes):
        t = shards.slice(k, meta_split_dim(k), 0, 1)
        sd[k] = t.to(device=device, dtype=dtype or t.dtype)
    del shards
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(sd, strict=True, assign=True)
    model.init_buffers(device)
    return model


class OutOfRangeError(ValueError):
    """A weight that the dtype asked for cannot hold (`key`, the largest such |value|, the dtype)."""

    def __init__(self, key: str, value: float, dtype: torch.dtype):
        self.key, self.value, self.dtype = key, value, dtype
        super().__init__(f"{key}: {value:.6g} does not fit in {dtype_name(dtype)} (largest {torch.finfo(dtype).max:.6g}); "
                         f"use bf16 or fp32 (--dtype bf16)")


def cast_weight(t: torch.Tensor, dtype: torch.dtype | None, key: str) -> torch.Tensor:
    """`t` in `dtype` (None: as it is); an OutOfRangeError where a finite value would become
    infinite (fp16 ends at 65504: a bf16 or fp32 model's outliers may not fit)."""
    if dtype is None or dtype == t.dtype:
        return t
    out = t.to(dtype)
    if t.is_floating_point() and out.is_floating_point() and torch.finfo(dtype).max < torch.finfo(t.dtype).max:
        lost = torch.isinf(out) & torch.isfinite(t)
        if lost.any():
            raise OutOfRangeError(key, t[lost].abs().max().item(), dtype)
    return out


def own_storage(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage: copy slices so each shard holds only its bytes
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


def _prepare_out_dir(out_dir: Path, num_shards: int, overwrite: bool, files: StagedFiles) -> bool:
    """Whether `out_dir` holds a model (shards) that this write replaces; stale shards go at the end."""
    old = sorted(p for p in out_dir.iterdir() if _SHARD_RE.match(p.name))
    if old and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {[p.name for p in old]}; choose an empty directory "
                              f"or pass overwrite=True")
    for p in old:  # stale shards beyond the new count would be read as part of the checkpoint
        if int(_SHARD_RE.match(p.name).group(1)) >= num_shards:
            files.remove(p.name)
    return bool(old)


def _check_divisible(shapes: dict, num_shards: int) -> None:
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    bad = [f"{k} dim {meta_split_dim(k)} = {s[meta_split_dim(k)]}" for k, s in shapes.items()
           if meta_split_dim(k) is not None and s[meta_split_dim(k)] % num_shards]
    if bad:
        raise ValueError(f"cannot split into {num_shards} shards: {bad[0]} (and {len(bad) - 1} more) is not "
                         f"divisible by {num_shards}; choose a shard count that divides the heads and vocabulary")


def _write_shards(get_slice: Callable[[str, int], torch.Tensor], keys: list[str], files: StagedFiles,
                  num_shards: int, dtype: torch.dtype | None, progress: bool, desc: str) -> None:
    dtype = parse_dtype(dtype)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_shards * len(keys), desc=desc, unit="tensor")
    for q in range(num_shards):
        shard = {}
        for k in keys:  # one output shard in memory at a time
            t = get_slice(k, q)
            shard[k] = own_storage(cast_weight(t, dtype, k))
            if bar is not None:
                bar.update()
        files.save(shard, shard_name(q))
        del shard
    if bar is not None:
        bar.close()


def save_meta_checkpoint(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path,
                         num_shards: int = 1, dtype: torch.dtype | None = torch.float16,
                         tokenizer_path: str | Path | None = None, overwrite: bool = False,
                         progress: bool = False, chat_template: str | None = None) -> Path:
    """Write `state_dict` (Meta's keys, full tensors) as a Meta checkpoint: params.json and
    `num_shards` consolidated.NN.pth split per `meta_split_dim`, in `dtype` (None keeps each
    tensor's); copies `tokenizer_path` to tokenizer.model (a vocabulary-only .gguf to tokenizer.gguf;
    over a model this replaces, that model's tokenizer files go), with the chat template (`chat_template`,
    else the chat_template.jinja beside tokenizer_path) as chat_template.jinja. Each file is written
    atomically, under a lock on `out_dir` (another process writing there is refused), after a
    free-space check. The files move into place together once all are written (`StagedFiles`): a
    write that fails or is interrupted leaves `out_dir` as it was."""
    out_dir = Path(out_dir)
    sd = {k: v for k, v in state_dict.items() if k not in DROPPED_KEYS}
    sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in sd.items()}  # DTensor
    shapes = {k: v.shape for k, v in sd.items()}
    check_state_dict(shapes, args, what="state dict")
    _check_divisible(shapes, num_shards)
    with DirLock(out_dir, "export"), StagedFiles(out_dir) as files:
        replacing = _prepare_out_dir(out_dir, num_shards, overwrite, files)
        check_free_space(out_dir, sum(v.numel() * (parse_dtype(dtype) or v.dtype).itemsize for v in sd.values()))
        _write_meta(sd, args, files, num_shards, dtype, progress)
        _write_tokenizer(files, tokenizer_path, replacing)
        if chat_template is None and tokenizer_path is not None and Path(tokenizer_path).with_name(CHAT_TEMPLATE_FILE).is_file():
            chat_template = Path(tokenizer_path).with_name(CHAT_TEMPLATE_FILE).read_text()
        if chat_template:
            files.write_text(chat_template, CHAT_TEMPLATE_FILE)
        else:  # a template left by an earlier model would be taken for this one's
            files.remove(CHAT_TEMPLATE_FILE)
    return out_dir


def _write_meta(sd, args, files: StagedFiles, num_shards, dtype, progress) -> None:
    def get_slice(k, q):
        d = meta_split_dim(k)
        t = sd[k].detach().cpu()
        return t if d is None else t.chunk(num_shards, dim=d)[q]

    _write_shards(get_slice, list(sd), files, num_shards, dtype, progress, "save")
    files.write_text(json.dumps(args.to_params_json(), indent=2) + "\n", PARAMS)
    if args.max_seq_len != ModelArgs.max_seq_len:
        files.write_text(json.dumps({"max_seq_len": args.max_seq_len}) + "\n", CONTEXT)
    else:
        files.remove(CONTEXT)


def _write_tokenizer(files: StagedFiles, src: str | Path | None, replacing: bool) -> None:
    """The tokenizer beside the model: `src` copied under its kind's name (tokenizer.model, or
    tokenizer.gguf for a vocabulary-only GGUF). Where this write replaces a model, that model's
    other tokenizer file goes (it would be read as this one's); one put in a folder without a model
    stays."""
    name = None if src is None else VOCAB_FILE if Path(src).suffix.lower() == ".gguf" else TOKENIZER
    if name is not None:
        files.copy(src, name)
    for other in (TOKENIZER, VOCAB_FILE):
        if replacing and other != name:
            files.remove(other)


def reshard(in_dir: str | Path, out_dir: str | Path, num_shards: int, dtype: torch.dtype | None = None,
            overwrite: bool = False, progress: bool = False) -> Path:
    """Rewrite the Meta checkpoint `in_dir` (P shards) as `num_shards` shards in `out_dir`, streaming
    key by key from the mmapped inputs (memory ~ one output shard). Copies params.json, context.json,
    the chat template and the tokenizer (tokenizer.model or tokenizer.gguf, or tokenizer.model one
    folder up); `dtype` converts (None keeps the checkpoint's). As in `save_meta_checkpoint`, the
    files move into place together at the end."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if out_dir.exists() and in_dir.resolve() == out_dir.resolve():
        raise ValueError(f"reshard writes a new directory: out_dir must differ from in_dir ({in_dir})")
    shards, args = _checked(in_dir)
    _check_divisible(shards.shapes, num_shards)
    with DirLock(out_dir, "reshard"), StagedFiles(out_dir) as files:
        replacing = _prepare_out_dir(out_dir, num_shards, overwrite, files)
        _reshard_into(shards, in_dir, files, num_shards, dtype, progress, replacing)
    return out_dir


def _reshard_into(shards: "_Shards", in_dir: Path, files: StagedFiles, num_shards: int, dtype, progress: bool,
                  replacing: bool) -> None:
    _write_shards(lambda k, q: shards.slice(k, meta_split_dim(k), q, num_shards), list(shards.shapes),
                  files, num_shards, dtype, progress, f"reshard {len(shards)} -> {num_shards}")
    files.copy(in_dir / PARAMS, PARAMS)
    for extra in (CONTEXT, CHAT_TEMPLATE_FILE):  # this model's, and none left from one written there before
        if (in_dir / extra).is_file():
            files.copy(in_dir / extra, extra)
        else:
            files.remove(extra)
    # the tokenizer where loading looks for it (llama.formats.locate.tokenizer_places)
    _write_tokenizer(files, next((p for p in (in_dir / TOKENIZER, in_dir / VOCAB_FILE, in_dir.parent / TOKENIZER)
                                  if p.is_file()), None), replacing)
