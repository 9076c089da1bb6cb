"""Pretraining with the paper's recipe: `TrainConfig`, `Trainer`, `train(config) -> summary`.

Recipe (LLaMA paper, section 2): AdamW(beta1 0.9, beta2 0.95, eps 1e-8), weight decay 0.1 on every
weight matrix - the projections, `output` and the `tok_embeddings` table - and none on the RMSNorm
weights (the only 1-D parameters; there are no biases); linear warmup over `warmup_steps` then cosine
decay to `min_lr_ratio` (10%) of the peak at `steps`; gradients clipped to a global norm of 1.0;
gradient accumulation up to a global batch given in tokens. A step whose gradient norm is not finite
is skipped (no update; its batch is consumed and the schedule moves on), and `max_bad_steps` such
steps in a row stop the run. Weights start from `Transformer.init_weights()`: N(0, 0.02) everywhere,
wo and w2 scaled by 1/sqrt(2 n_layers), norms 1. Seeds: `seed` seeds torch, random and numpy on
every rank before the model is built, and the data order.

Mixed precision: fp32 master weights and optimizer state; with a process group the compute runs in
bf16 through FSDP2's `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, in one process
under `torch.autocast(bf16)`. The loss (cross-entropy) is computed in fp32 from the logits.

Parallelism: torchrun starts world = dp x tp processes on a (dp, tp) mesh, tp innermost (the ranks of
one tensor-parallel group are neighbours, i.e. on one node). The plain model gets, in torchtitan's
order, tensor parallel (`llama.parallel.apply_tp`, logits gathered to every tp rank) -> activation
checkpointing -> per-block torch.compile -> FSDP2 `fully_shard` per block and at the root over dp.
Without torchrun a single process trains with no process group.

Checkpoints are torch.distributed.checkpoint (DCP) directories `out_dir/checkpoints/step_NNNNNNNN`
holding the sharded model and optimizer, one `rank_NNNNN.pt` per rank (data-loader position and RNG
states, read back with weights_only=True) and `meta.json` (step, resolved config, model args,
layout). Each is written under a `.tmp-` name, fsynced, then renamed: a save that dies half way
leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from llama.checkpoint import parse_dtype
from llama.model import ModelArgs, Transformer, check_attention_backend, read_json_object
from llama.parallel import check_tp_degree, init_distributed, launched_with_torchrun
from llama.speed import adamw_kwargs, compile_blocks, compiled_cross_entropy, cross_entropy

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
RESUME_MODES = ("auto", "never")
CKPT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
META = "meta.json"


@dataclass
class TrainConfig:
    """Everything a pretraining run needs. Load with `TrainConfig.from_json(path, **overrides)`;
    `model.<field>` overrides (e.g. `model.n_layers=4`) go to the model architecture."""

    description: str = ""
    # model: a preset of configs/models (7B, 13B, 33B, 65B, 20M, tiny, ...) or a params.json path
    model: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    # data: a directory written by scripts/prepare_data.py, or a mixture {name: [dir, weight]}
    data: Any = ""
    # tokenizer.model: the data must have been made with it, the model's vocab_size is taken from
    # it, and it is copied into exports
    tokenizer: Optional[str] = None
    out_dir: str = "runs/pretrain"
    # schedule
    steps: int = 1000
    warmup_steps: int = 2000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # batch: global_batch_tokens = seq_len * micro_batch_size * dp * grad_accum
    seq_len: int = 2048
    global_batch_tokens: int = 4 * 1024 * 1024
    micro_batch_size: int = 1
    # execution
    dtype: str = "bf16"  # compute dtype; master weights are always fp32
    ac: str = "none"  # activation checkpointing: none | full | selective
    attention: str = "auto"  # auto (xformers on CUDA when installed, else sdpa) | sdpa | xformers | math
    compile: bool = False
    dp: int = 0  # 0: world_size // tp
    tp: int = 1
    device: str = "auto"  # auto | cpu | cuda
    init: str = "auto"  # auto | full (build the whole model per process, then shard) | meta
    seed: int = 0
    # seeing the run
    log_every: int = 1
    eval_every: int = 100  # 0: never (except at the end when eval_batches > 0)
    eval_batches: int = 8
    peak_flops: Optional[float] = None  # per device, for MFU; None: measured with a bf16 matmul
    tensorboard: bool = True
    progress: bool = True
    max_bad_steps: int = 5  # stop after this many non-finite losses/gradients in a row
    # checkpoints
    ckpt_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # auto (latest in out_dir, if any) | never | a checkpoint directory
    export_dir: Optional[str] = None  # at the end, write Meta's layout (params.json, consolidated.NN.pth)
    export_shards: int = 1

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "TrainConfig":
        """From a dict plus overrides; unknown keys are an error that lists the valid ones.
        Keys `model.<field>` (or a dict under `model_overrides`) set model fields."""
        d = dict(d)
        d.update(overrides)
        model_overrides = dict(d.pop("model_overrides", None) or {})
        for k in [k for k in d if k.startswith("model.")]:
            model_overrides[k[len("model."):]] = d.pop(k)
        unknown = sorted(set(d) - set(cls.fields()))
        if unknown:
            raise ValueError(f"unknown training config key(s) {unknown}; valid keys are {cls.fields()} "
                             f"and model.<field> for the model's fields")
        return cls(**d, model_overrides=model_overrides)

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> "TrainConfig":
        path = Path(path)
        d = read_json_object(path, f"no training config at {path}")
        try:
            return cls.from_dict(d, **overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_name(cls, name: str, **overrides) -> "TrainConfig":
        """A config of configs/train/ by name ("7B", "demo", "tiny", ...) or a path to a JSON file."""
        if str(name).endswith(".json") or Path(name).is_file():
            return cls.from_json(name, **overrides)
        path = TRAIN_CONFIG_DIR / f"{name}.json"
        if not path.is_file():
            names = sorted(p.stem for p in TRAIN_CONFIG_DIR.glob("*.json"))
            raise ValueError(f"unknown training config {name!r}; configs are {names} (or give a path to a JSON file)")
        return cls.from_json(path, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_args(self) -> ModelArgs:
        return ModelArgs.from_name(self.model, **self.model_overrides)


TRAIN_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "train"


# ----------------------------------------------------------------------------------------------
# the recipe


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr over
    `warmup_steps`, then cosine from lr down to min_lr_ratio * lr at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices (ndim >= 2: projections, output, tok_embeddings); none on
    the RMSNorm weights (ndim 1)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 L d T, N the non-embedding parameters (incl. `output`)."""
    d, hidden, hd = args.dim, args.ffn_hidden_dim, args.head_dim
    per_layer = d * args.n_heads * hd * 2 + d * args.n_kv_heads * hd * 2 + 3 * d * hidden + 2 * d
    n = args.n_layers * per_layer + d + args.vocab_size * d
    return 6 * n + 12 * args.n_layers * d * seq_len


def measure_peak_flops(device: torch.device, dtype=torch.bfloat16, n: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of a square `dtype` matmul on `device`: a practical peak for MFU. The fastest single
    product counts, so a machine busy with other work at start-up does not lower the peak (and
    inflate MFU past 100%)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    _sync(device)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == float("inf"):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# checkpoints on disk


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under out_dir/checkpoints, oldest first (temporary dirs are ignored)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    ckpts = [p for p in root.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / META).is_file()]
    return sorted(ckpts, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def read_checkpoint_meta(ckpt: str | Path) -> dict:
    ckpt = Path(ckpt)
    if not (ckpt / META).is_file():
        raise FileNotFoundError(f"{ckpt} is not a training checkpoint (no {META}); "
                                f"give a directory out_dir/checkpoints/{CKPT_PREFIX}NNNNNNNN")
    return json.loads((ckpt / META).read_text())


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            _fsync_path(p)
    _fsync_path(path)


def _model_diff(saved: dict, args: ModelArgs) -> list[str]:
    now = dataclasses.asdict(args)
    return [f"{k} {saved.get(k)} != {now[k]}" for k in now if saved.get(k) != now[k]]


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, num_shards: int = 1,
                      dtype: torch.dtype | str | None = torch.float16, tokenizer_path: str | Path | None = None,
                      overwrite: bool = False) -> Path:
    """Write training checkpoint `ckpt` (any layout) in Meta's layout: `num_shards` consolidated.NN.pth,
    params.json and, when given (or recorded in the run's config), tokenizer.model. One process."""
    import torch.distributed.checkpoint as dcp
    from llama.checkpoint import save_meta_checkpoint

    ckpt = Path(ckpt)
    meta = read_checkpoint_meta(ckpt)
    args = ModelArgs.from_dict(meta["model_args"])
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    sd = model.state_dict()
    loaded = {"model": sd}
    with _quiet_single_process():
        dcp.load(loaded, checkpoint_id=str(ckpt), no_dist=True)
    dtype = parse_dtype(dtype)
    tokenizer_path = tokenizer_path or meta["config"].get("tokenizer")
    return save_meta_checkpoint(loaded["model"], args, out_dir, num_shards=num_shards, dtype=dtype,
                                tokenizer_path=tokenizer_path, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# the trainer


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_data_path(data) -> None:
    """Every source of `data` (a prepared dir, a mixture JSON file or dict) exists and is not empty."""
    from llama.data import load_mixture

    if not data:
        raise ValueError("no data given: set data to a directory written by scripts/prepare_data.py "
                         "(or a mixture such as configs/data/llama_mixture.json)")
    for name, (path, _) in load_mixture(data).items():
        if not path.exists():
            raise FileNotFoundError(f"data path {path} does not exist; prepare it with scripts/prepare_data.py")
        if path.is_dir() and not any(path.iterdir()):
            raise ValueError(f"data directory {path} is empty; prepare it with scripts/prepare_data.py")


def _default_loader(cfg: TrainConfig, split: str, dp_rank: int, dp_size: int, seed: int):
    from llama.data import PackedLoader

    sha = _file_sha256(cfg.tokenizer) if cfg.tokenizer else None
    return PackedLoader(cfg.data, cfg.seq_len, cfg.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                        seed=seed, split=split, tokenizer_sha256=sha)


class Trainer:
    """A pretraining run. `Trainer(config).fit(callback)` trains to `config.steps` and returns the
    summary; `callback(record)` gets each logged record (dicts with step, loss, lr, val_loss, ...).

    Every check on the config, the layout, the data path and the checkpoint to resume runs in
    the constructor, before the model is built. `make_loader(config, split, dp_rank, dp_size, seed)`
    replaces the default `llama.data.PackedLoader` (e.g. for synthetic data).
    """

    def __init__(self, config: TrainConfig, make_loader: Callable | None = None):
        self.cfg = cfg = config
        self.make_loader = make_loader or _default_loader
        self._check_values()
        args = cfg.model_args()
        if cfg.tokenizer:
            if not Path(cfg.tokenizer).is_file():
                raise FileNotFoundError(f"tokenizer {cfg.tokenizer} does not exist")
            n_words = _tokenizer_vocab(cfg.tokenizer)
            if args.vocab_size != n_words:
                args = dataclasses.replace(args, vocab_size=n_words)
        self.args = args
        if cfg.seq_len > args.max_seq_len:
            raise ValueError(f"seq_len {cfg.seq_len} is above the model's max_seq_len {args.max_seq_len}; "
                             f"lower seq_len or set model.max_seq_len")
        check_tp_degree(args, cfg.tp)

        # layout: world = dp x tp
        world = int(os.environ.get("WORLD_SIZE", 1)) if launched_with_torchrun() else 1
        dp = cfg.dp or max(1, world // cfg.tp)
        if dp * cfg.tp != world:
            raise ValueError(f"dp {dp} x tp {cfg.tp} = {dp * cfg.tp} does not equal the world size {world}; "
                             f"launch {dp * cfg.tp} processes (torchrun --nproc_per_node) or change dp/tp")
        self.dp, self.tp, self.world = dp, cfg.tp, world
        tokens_per_micro = cfg.seq_len * cfg.micro_batch_size * dp
        if cfg.global_batch_tokens % tokens_per_micro:
            raise ValueError(f"global_batch_tokens {cfg.global_batch_tokens} is not a multiple of seq_len "
                             f"{cfg.seq_len} x micro_batch_size {cfg.micro_batch_size} x dp {dp} = {tokens_per_micro}")
        self.grad_accum = cfg.global_batch_tokens // tokens_per_micro
        _check_data_path(cfg.data)

        # the checkpoint to resume, checked against this model and layout before any work
        self.resume_from = self._find_resume()
        if self.resume_from is not None:
            meta = read_checkpoint_meta(self.resume_from)
            diff = _model_diff(meta["model_args"], args)
            if diff:
                raise ValueError(f"checkpoint {self.resume_from} is for another model ({'; '.join(diff)}); "
                                 f"use the same model settings, another out_dir, or resume=never")
            old_batch = meta["config"]["global_batch_tokens"] // meta["config"]["seq_len"]
            if old_batch != cfg.global_batch_tokens // cfg.seq_len:
                raise ValueError(f"checkpoint {self.resume_from} was trained with global batches of {old_batch} "
                                 f"sequences and this run has {cfg.global_batch_tokens // cfg.seq_len}: the step "
                                 f"count and data position would not match; keep global_batch_tokens and seq_len")
        # the mesh is (dp, tp) with tp innermost: this rank's coordinates, known before any process group
        rank = int(os.environ.get("RANK", 0)) if world > 1 else 0
        self.dp_rank, self.tp_rank = rank // cfg.tp, rank % cfg.tp
        # opening the data checks its metadata, tokenizer and size before the model is built
        self.train_loader = self.make_loader(cfg, "train", self.dp_rank, self.dp, cfg.seed)
        self._built = False
        self._val_loader = None
        self.history: list[dict] = []

    # -- checks and setup --------------------------------------------------------------------

    def _check_values(self):
        cfg = self.cfg
        choices = {"dtype": tuple(DTYPES), "ac": ("none", "full", "selective"),
                   "attention": ("auto", "sdpa", "xformers", "math"), "device": ("auto", "cpu", "cuda"),
                   "init": ("auto", "full", "meta")}
        for key, ok in choices.items():
            if getattr(cfg, key) not in ok:
                raise ValueError(f"{key}={getattr(cfg, key)!r} is not one of {ok}")
        positive = ["steps", "seq_len", "global_batch_tokens", "micro_batch_size", "tp", "log_every",
                    "keep_last", "ckpt_every", "max_bad_steps", "export_shards"]
        for key in positive:
            if getattr(cfg, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(cfg, key)})")
        for key in ["warmup_steps", "dp", "eval_every", "eval_batches"]:
            if getattr(cfg, key) < 0:
                raise ValueError(f"{key} must be >= 0 (got {getattr(cfg, key)})")
        if not cfg.lr > 0:
            raise ValueError(f"lr must be > 0 (got {cfg.lr})")

    def _find_resume(self) -> Path | None:
        r = self.cfg.resume
        if r == "never":
            return None
        if r == "auto":
            return latest_checkpoint(self.cfg.out_dir)
        path = Path(r)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint to resume {path} does not exist (resume takes auto, never or a directory)")
        read_checkpoint_meta(path)
        return path

    def _ensure_built(self):
        if not self._built:
            self._setup()

    def _setup(self):
        cfg, args = self.cfg, self.args
        self.rank, world = init_distributed(None if cfg.device == "auto" else cfg.device)
        assert world == self.world
        if cfg.device == "auto":
            dev_type = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            dev_type = cfg.device
        self.device = torch.device(dev_type, int(os.environ.get("LOCAL_RANK", 0))) if dev_type == "cuda" \
            else torch.device(dev_type)
        attention = cfg.attention
        if attention == "auto":
            attention = "sdpa"
            if dev_type == "cuda":
                try:
                    import xformers.ops  # noqa: F401
                    attention = "xformers"
                except ImportError:
                    pass
        check_attention_backend(attention, self.device)
        self.attention = attention
        self.compute_dtype = DTYPES[cfg.dtype]

        self.mesh = None
        if world > 1:
            from llama.parallel import build_mesh
            self.mesh = build_mesh(self.dp, self.tp, dev_type)
            assert (self.dp_rank, self.tp_rank) == (self.mesh["dp"].get_local_rank(), self.mesh["tp"].get_local_rank())

        # every rank seeds alike, so a full init gives identical weights everywhere
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = self._build_model()
        # fused kernel in one process, foreach with DTensors on CUDA (llama.speed measured them)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=lr_at(0, cfg),
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                           **adamw_kwargs(self.device, distributed=self.mesh is not None))
        self.step = 0
        self.tokens_seen = 0
        self.flops_per_token = flops_per_token(args, cfg.seq_len)
        self.peak_flops = cfg.peak_flops or measure_peak_flops(self.device, self.compute_dtype)
        if self.resume_from is not None:
            self.load(self.resume_from)
        self._built = True

    def _build_model(self) -> torch.nn.Module:
        cfg, args = self.cfg, self.args
        init = cfg.init
        if init == "auto":  # the whole fp32 model per process is fine up to ~1B parameters
            init = "full" if flops_per_token(args, 0) / 6 < 1e9 else "meta"
        if init == "full":
            with torch.device(self.device if self.world == 1 else "cpu"):
                model = Transformer(args)  # init_weights() under the seed set above
        else:
            with torch.device("meta"):
                model = Transformer(args)
        for layer in model.layers:  # the backend was checked against self.device in _setup
            layer.attention.backend = self.attention

        if self.mesh is not None and self.tp > 1:
            from llama.parallel import apply_tp
            apply_tp(model, self.mesh["tp"], output_replicated=True)
        if cfg.ac != "none":
            from llama.activation_checkpointing import apply_ac
            apply_ac(model, cfg.ac)
        if cfg.compile:
            compile_blocks(model)
        if self.mesh is not None:
            from llama.parallel import apply_fsdp
            from torch.distributed.fsdp import MixedPrecisionPolicy
            mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
            apply_fsdp(model, self.mesh["dp"], mp)
        if init == "meta":
            model.to_empty(device=self.device)
            # On CUDA, DTensor's RNG tracker draws each shard as a slice of one full random tensor. On
            # CPU it draws from the local generator, so seed ranks apart or every shard would be equal
            # (norm weights, the only replicated parameters, are ones).
            torch.manual_seed(self.cfg.seed + (self.rank if self.device.type == "cpu" else 0))
            model.init_weights()
        else:
            model.init_buffers(self.device)
        return model

    # -- one step ----------------------------------------------------------------------------

    def _autocast(self):
        if self.mesh is None and self.compute_dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self.model(inputs)  # (B, T, vocab)
        # fp32 loss; compiled, the fp32 copy of the logits is never materialised
        return (compiled_cross_entropy if self.cfg.compile else cross_entropy)(logits, targets)

    def _all_mean(self, x: float) -> float:
        if self.mesh is None:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def _grads_by_mesh(self) -> list[list[torch.Tensor]]:
        """Gradients grouped by the device mesh they live on (FSDP x TP mixes 1-D and 2-D meshes)."""
        by_mesh: dict[Any, list] = {}
        for p in self.model.parameters():
            if p.grad is not None:
                by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
        return list(by_mesh.values())

    def _clip_grads(self) -> float:
        """Global L2 norm of all gradients; scales them down to `grad_clip` when it is above."""
        groups = self._grads_by_mesh()
        total = 0.0
        for grads in groups:
            n = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
            if hasattr(n, "full_tensor"):
                n = n.full_tensor()
            total += n.double().item() ** 2
        norm = math.sqrt(total)
        coef = self.cfg.grad_clip / (norm + 1e-6)
        if math.isfinite(norm) and coef < 1.0:
            for grads in groups:
                torch._foreach_mul_(grads, coef)
        return norm

    def train_step(self) -> dict:
        """Forward and backward over grad_accum micro-batches, clip, step (or skip when not finite)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for _ in range(self.grad_accum):
            inputs, targets = self.train_loader.next()
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            loss = self._loss(inputs, targets)
            (loss / self.grad_accum).backward()
            loss_sum += loss.item()
        grad_norm = self._clip_grads()
        finite = math.isfinite(grad_norm)  # the same on every rank: the norm is global
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += cfg.global_batch_tokens
        return {"step": self.step, "loss": self._all_mean(loss_sum / self.grad_accum), "lr": lr,
                "grad_norm": grad_norm, "skipped": not finite}

    @torch.no_grad()
    def evaluate(self, n_batches: int | None = None) -> dict:
        """Mean loss and perplexity over the first `eval_batches` batches of the validation split
        (the same batches every time)."""
        self._ensure_built()
        n_batches = n_batches or self.cfg.eval_batches or 1
        if self._val_loader is None:
            self._val_loader = self.make_loader(self.cfg, "val", self.dp_rank, self.dp, self.cfg.seed)
        total, n = 0.0, 0
        for inputs, targets in self._val_loader.iter_eval(n_batches):
            total += self._loss(inputs.to(self.device), targets.to(self.device)).item()
            n += 1
        val_loss = self._all_mean(total / n)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, callback: Callable[[dict], None] | None = None) -> dict:
        """Train to `config.steps`; returns {"step", "train_loss", "val_loss", "val_ppl", "history",
        "checkpoint", "export"}. `callback(record)` runs on every rank after each logged step."""
        self._ensure_built()
        cfg = self.cfg
        is_main = self.rank == 0
        out = Path(cfg.out_dir)
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(self.resolved_config(), indent=2) + "\n")
            self._clean_tmp()
            print(f"training {self.args.n_layers} layers, {self.model_size() / 1e6:.1f}M parameters on "
                  f"dp={self.dp} x tp={self.tp} ({self.device.type}), {cfg.steps} steps of "
                  f"{cfg.global_batch_tokens} tokens (grad_accum {self.grad_accum})"
                  + (f", resuming from {self.resume_from} at step {self.step}" if self.resume_from else ""))
            print("resolved config: " + json.dumps(self.resolved_config()))
        if is_main and self.resume_from is not None:
            _truncate_metrics(out / "metrics.jsonl", self.step)  # steps after the checkpoint run again
        metrics = open(out / "metrics.jsonl", "a") if is_main else None
        tb = self._tensorboard() if is_main else None
        bar = None
        if is_main and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)

        bad_in_a_row = 0
        last, last_val = {}, {}
        saved = None
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                rec = self.train_step()
                _sync(self.device)
                dt = time.perf_counter() - t0
                bad_in_a_row = bad_in_a_row + 1 if rec["skipped"] else 0
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise FloatingPointError(
                        f"stopping at step {self.step}: {bad_in_a_row} steps in a row had a non-finite loss or "
                        f"gradient norm (each was skipped); lower lr, check the data, or resume from "
                        f"{latest_checkpoint(cfg.out_dir) or 'an earlier checkpoint'}")
                tps = cfg.global_batch_tokens / dt
                rec.update(tokens=self.tokens_seen, tokens_per_s=tps,
                           mfu=tps * self.flops_per_token / (self.peak_flops * self.world), time=time.time())
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or (self.step == cfg.steps and cfg.eval_batches):
                    last_val = self.evaluate()
                    rec.update(last_val)
                last = rec
                logged = self.step % cfg.log_every == 0 or "val_loss" in rec or self.step == cfg.steps
                if logged:
                    self.history.append(rec)
                    if metrics:
                        metrics.write(json.dumps(rec) + "\n")
                        metrics.flush()
                    if tb:
                        for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "val_ppl"):
                            if k in rec:
                                tb.add_scalar(k, rec[k], self.step)
                if bar:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{tps:.0f}",
                                    mfu=f"{100 * rec['mfu']:.1f}%",
                                    **({"val": f"{last_val['val_loss']:.4f}"} if last_val else {}))
                    bar.update(1)
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    saved = self.save()
                if callback and logged:
                    callback(rec)
        finally:
            if bar:
                bar.close()
            if metrics:
                metrics.close()
            if tb:
                tb.close()
        exported = None
        if cfg.export_dir:
            exported = self.export(cfg.export_dir, cfg.export_shards)
        return {"step": self.step, "train_loss": last.get("loss"), "val_loss": last_val.get("val_loss"),
                "val_ppl": last_val.get("val_ppl"), "history": self.history,
                "checkpoint": str(saved or latest_checkpoint(cfg.out_dir) or ""),
                "export": str(exported) if exported else None}

    def _tensorboard(self):
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(Path(self.cfg.out_dir) / "tensorboard"))

    def model_size(self) -> int:
        self._ensure_built()
        return sum(p.numel() for p in self.model.parameters())

    def resolved_config(self) -> dict:
        d = self.cfg.to_dict()
        d.update(dp=self.dp, attention=getattr(self, "attention", self.cfg.attention))
        return d

    # -- checkpoints -------------------------------------------------------------------------

    def _barrier(self):
        if self.mesh is not None:
            dist.barrier()

    def _clean_tmp(self):
        root = Path(self.cfg.out_dir) / "checkpoints"
        if root.is_dir():
            for p in root.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)

    def _rank_state(self) -> dict:
        state = {"dp_rank": self.dp_rank, "tp_rank": self.tp_rank, "loader": self.train_loader.state_dict(),
                 "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                 "numpy_rng": _numpy_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self) -> Path:
        """Write a checkpoint of this step under out_dir/checkpoints atomically; keep the last K."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        root = Path(self.cfg.out_dir) / "checkpoints"
        name = f"{CKPT_PREFIX}{self.step:08d}"
        tmp, final = root / (TMP_PREFIX + name), root / name
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        with _quiet_single_process():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=self.mesh is None)
        rank_file = tmp / f"rank_{self.rank:05d}.pt"
        torch.save(self._rank_state(), rank_file)
        _fsync_path(rank_file)
        self._barrier()
        if self.rank == 0:
            meta = {"step": self.step, "tokens": self.tokens_seen, "config": self.resolved_config(),
                    "model_args": dataclasses.asdict(self.args),
                    "layout": {"dp": self.dp, "tp": self.tp, "world": self.world}}
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_path(root)
            for old in list_checkpoints(self.cfg.out_dir)[:-self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def load(self, ckpt: str | Path) -> None:
        """Restore model, optimizer, step, data position and RNG states from `ckpt` (tp may differ)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        ckpt = Path(ckpt)
        meta = read_checkpoint_meta(ckpt)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(ckpt), no_dist=self.mesh is None)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        # PackedLoader's position counts samples of the global stream: the same on every rank and
        # valid for any dp, so any layout resumes from rank 0's file; RNG states need the same layout
        same_layout = (meta["layout"]["dp"], meta["layout"]["tp"]) == (self.dp, self.tp)
        rank_file = ckpt / f"rank_{self.rank if same_layout else 0:05d}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(f"{rank_file} is missing: checkpoint {ckpt} is incomplete")
        rs = torch.load(rank_file, weights_only=True)
        self.train_loader.load_state_dict(rs["loader"])
        if same_layout:
            torch.set_rng_state(rs["torch_rng"])
            random.setstate(_tuples(rs["python_rng"]))
            np.random.set_state(_numpy_rng_from(rs["numpy_rng"]))
            if "cuda_rng" in rs and self.device.type == "cuda":
                torch.cuda.set_rng_state(rs["cuda_rng"], self.device)
        self.step = meta["step"]
        self.tokens_seen = meta["tokens"]

    def export(self, out_dir: str | Path, num_shards: int = 1, dtype: torch.dtype = torch.float16) -> Path | None:
        """Gather the full weights to rank 0 and write Meta's layout there (returns None elsewhere)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from llama.checkpoint import save_meta_checkpoint

        self._ensure_built()
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(self.model, options=opts)
        path = None
        if self.rank == 0:
            path = save_meta_checkpoint(sd, self.args, out_dir, num_shards=num_shards, dtype=dtype,
                                        tokenizer_path=self.cfg.tokenizer, overwrite=True)
        self._barrier()
        return path


def _truncate_metrics(path: Path, step: int) -> None:
    if path.is_file():
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):  # a line cut off by a kill mid-write
                continue
        path.write_text("".join(line + "\n" for line in keep))


def _tokenizer_vocab(path: str | Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path)).vocab_size()


def _numpy_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_rng_from(s: dict):
    return (s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def train(config: TrainConfig | str | dict, callback: Callable[[dict], None] | None = None,
          make_loader: Callable | None = None, **overrides) -> dict:
    """Run pretraining from a `TrainConfig`, a config name/path, or a dict, with field overrides.
    Returns the summary of `Trainer.fit` (history of {step, loss, lr, val_loss, ...} records)."""
    if isinstance(config, TrainConfig):
        config = TrainConfig.from_dict(config.to_dict(), **overrides)
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config, **overrides)
    else:
        config = TrainConfig.from_name(str(config), **overrides)
    return Trainer(config, make_loader=make_loader).fit(callback)
