"""The training loop: `Trainer(config).fit()` and `train(config) -> summary`.

The recipe (schedule, optimizer groups, clipping, loss, MFU) is llama/train/recipe.py; checkpoints
are llama/train/checkpoint.py; the records go through llama/train/metrics.py. What is left here
builds the run and reads top to bottom: a step is forward and backward over the micro-batches,
clip, AdamW step. A step whose gradient norm is not finite is skipped (no update; its batch is
consumed and the schedule moves on), and `max_bad_steps` such steps in a row stop the run.

Mixed precision: fp32 master weights and optimizer state; with a process group the compute runs in
bf16 through FSDP2's `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, in one process
under `torch.autocast(bf16)`. Weights start from `Transformer.init_weights()`. Seeds: `seed` seeds
torch, random and numpy on every rank before the model is built, and the data order.

Parallelism: torchrun starts world = dp x tp processes on a (dp, tp) mesh, tp innermost. The plain
model gets, in torchtitan's order, tensor parallel (logits gathered to every tp rank) -> activation
checkpointing -> per-block torch.compile -> FSDP2 over dp (llama/parallel.py). Without torchrun a
single process trains with no process group.

Fine-tuning (llama/train/finetune.py) is the same loop: `init_from` loads the initial weights (after
tensor parallel), `lora` adds adapters before activation checkpointing and freezes the rest (the
optimizer sees the trainable parameters only), `data_format` alpaca / chat / documents reads
examples whose prompt tokens carry target -100. The loss of a step is the sum over its targets
divided by their number in the whole global batch (all micro-batches and dp ranks), so batches with
different numbers of targets weigh every target alike, whatever the layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy

from llama.data import PackedLoader, load_mixture
from llama.data.loader import source_problem
from llama.data.instruct import IGNORE
from llama.env import (DirLock, auto_attention_backend, check_attention_device, compute_dtype, init_distributed,
                       dtype_name, launched_with_torchrun, parse_dtype, sha256_file, synchronize, torchrun_ranks)
from llama.eval import TaskSpec, evaluate_tasks
from llama.formats.gguf import load_tokenizer
from llama.formats.meta import OutOfRangeError
from llama.model import ModelArgs, Transformer
from llama.train import finetune
from llama.parallel import ParallelDims, apply_ac, apply_fsdp, apply_tp, build_mesh, check_tp_degree, compile_blocks
from llama.train.checkpoint import CheckpointManager, model_diff, read_checkpoint_meta, rng_state, set_rng_state
from llama.train.config import TrainConfig
from llama.train.metrics import Metrics
from llama.train.recipe import (build_optimizer, clip_grad_norm, compiled_cross_entropy, cross_entropy,
                                flops_per_token, linear_cross_entropy, lr_at, measure_peak_flops, set_lr)

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BUDGET_PROBE_STEPS = 4  # steps timed before a time budget sizes the schedule (the first compiles)
BUDGET_REFIT_EVERY = 10  # then every this many steps, timed afresh: a machine that slows down shortens it again


def check_data_path(data) -> None:
    """Every source of `data` (a prepared dir, a mixture JSON file or dict) exists and is not empty."""
    if not data:
        raise ValueError("no data given: set data to a directory written by scripts/prepare_data.py "
                         "(or a mixture such as llama_mixture)")
    for name, (path, _) in load_mixture(data).items():
        if not path.exists():
            raise FileNotFoundError(source_problem(data, name, path, f"data path {path} does not exist; prepare it "
                                                                      f"with scripts/prepare_data.py"))
        if path.is_dir() and not any(path.iterdir()):
            raise ValueError(source_problem(data, name, path, f"data directory {path} is empty; prepare it with "
                                                              f"scripts/prepare_data.py"))


def default_loader(cfg: TrainConfig, split: str, dp_rank: int, dp_size: int, seed: int) -> PackedLoader:
    sha = sha256_file(cfg.tokenizer) if cfg.tokenizer else None
    return PackedLoader(cfg.data, cfg.seq_len, cfg.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                        seed=seed, split=split, tokenizer_sha256=sha)


def open_val_loader(cfg: TrainConfig, make_loader: Callable):
    """The validation loader, every window in order and not split by dp (`Trainer.evaluate` splits
    the micro-batches); an error now, before any step, when the split cannot give one micro-batch."""
    try:
        loader = make_loader(cfg, "val", 0, 1, cfg.seed)
        next(iter(loader.iter_eval(1)))
    except (ValueError, StopIteration) as e:
        raise ValueError(f"eval_batches={cfg.eval_batches} needs validation data, but {e or 'the val split is empty'}; "
                         f"prepare the data with val_fraction > 0 (or more text), or set eval_batches=0") from None
    return loader


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step with a checkpoint
    (`requested` holds the signal's name); a second one interrupts at once. Under torchrun every rank
    listens, and after each step the ranks agree (`agreed`: one all-reduce of a flag), so a signal
    that reached any of them (torchrun passes the one it gets on to every worker) stops all at the
    same step with one checkpoint. Where a scheduler signals every process of the job (SLURM's
    scancel: torchrun, which passes it on, and its workers), a worker gets it twice: a repeat within
    REPEAT_S of the first is taken for that copy, not a second request. torchrun kills its workers
    30 s after its own signal (its --shutdown_timeout): a step and a save longer than that are cut
    short (the checkpoint being written is discarded, the previous one stays). Off outside the main
    thread."""

    REPEAT_S = 0.5

    def __init__(self, main: bool = True, launched: bool = False):
        self.enabled = threading.current_thread() is threading.main_thread()
        self.main, self.launched = main, launched
        self.requested: str | None = None
        self._at = 0.0
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested:
            if self.launched and time.monotonic() - self._at < self.REPEAT_S:
                return  # the launcher's copy of the same Ctrl-C
            raise KeyboardInterrupt
        self.requested, self._at = signal.Signals(signum).name, time.monotonic()
        if self.main:
            print(f"\n{self.requested}: stopping after this step with a checkpoint (again to stop at once)",
                  file=sys.stderr, flush=True)

    def agreed(self, distributed: bool, device: torch.device) -> str | None:
        """Whether to stop now: this process's request, or with `distributed` any rank's (every
        rank gets the same answer)."""
        if distributed:  # from the reduced flag alone: a signal that lands during the all-reduce waits a step
            flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if not flag.item():
                return None
            if not self.requested:
                self.requested, self._at = "a signal to another rank", time.monotonic()
        return self.requested

    def __enter__(self):
        if self.enabled:
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


class Trainer:
    """A pretraining or fine-tuning run, built in the constructor: every check on the config, the
    layout, the data and the checkpoint to resume comes first (one sentence each, before any model
    exists), then the process group, model, optimizer and the resumed state. `fit(callback)` trains to `config.steps`.

    `make_loader(config, split, dp_rank, dp_size, seed)` replaces the default
    `llama.data.PackedLoader` (e.g. for synthetic data). Public seams: `model`, `optimizer`,
    `train_loader`, `loss(inputs, targets)`, `train_step()`, `evaluate()`, `save()`, `export()`.
    """

    def __init__(self, config: TrainConfig, make_loader: Callable | None = None):
        self.cfg = cfg = config.validate()
        if cfg.init_from:
            self.cfg = cfg = dataclasses.replace(cfg, tokenizer=finetune.init_tokenizer(cfg))
        args = finetune.init_args(cfg) if cfg.init_from else cfg.model_args()
        if cfg.tokenizer:
            if not Path(cfg.tokenizer).is_file():
                raise FileNotFoundError(f"tokenizer {cfg.tokenizer} does not exist")
            n_words = load_tokenizer(cfg.tokenizer).n_words  # tokenizer.model, or a .gguf's vocabulary
            if cfg.init_from and n_words != args.vocab_size:
                raise ValueError(f"tokenizer {cfg.tokenizer} has {n_words} pieces but init_from {cfg.init_from} has "
                                 f"vocab_size {args.vocab_size}; use the tokenizer the model was trained with")
            args = dataclasses.replace(args, vocab_size=n_words)
        elif cfg.data_format != "tokens":
            raise ValueError(f"data_format {cfg.data_format} needs a tokenizer: set tokenizer (or init_from a "
                             f"folder holding tokenizer.model)")
        if cfg.lora and not cfg.init_from and cfg.init == "meta":
            raise ValueError("LoRA on a freshly initialised model needs init full (or init_from trained weights)")
        self.args = args
        if cfg.seq_len > args.max_seq_len:
            raise ValueError(f"seq_len {cfg.seq_len} is above the model's max_seq_len {args.max_seq_len}; "
                             f"lower seq_len or set model.max_seq_len")
        check_tp_degree(args, cfg.tp)
        ranks = torchrun_ranks()
        self.dims = dims = ParallelDims.resolve(cfg.dp, cfg.tp, ranks.world)
        self.dp, self.tp, self.world = dims.dp, dims.tp, dims.world
        tokens_per_micro = cfg.seq_len * cfg.micro_batch_size * dims.dp
        if cfg.global_batch_tokens % tokens_per_micro:
            raise ValueError(f"global_batch_tokens {cfg.global_batch_tokens} is not a multiple of seq_len "
                             f"{cfg.seq_len} x micro_batch_size {cfg.micro_batch_size} x dp {dims.dp} = {tokens_per_micro}")
        self.grad_accum = cfg.global_batch_tokens // tokens_per_micro
        if cfg.data_format == "tokens":
            check_data_path(cfg.data)
        self.make_loader = make_loader or (default_loader if cfg.data_format == "tokens"
                                           else finetune.InstructLoaders(cfg, cfg.tokenizer, cfg.progress))
        finetune.check_export_dirs(cfg)
        self.eval_tasks = self._checked_eval_tasks(dims)
        self.tokenizer = load_tokenizer(cfg.tokenizer) if cfg.eval_tasks else None
        self.checkpoints = CheckpointManager(cfg.out_dir, cfg.keep_last, ranks.rank, distributed=dims.world > 1,
                                             trainable_only=cfg.lora is not None)
        self.resume_from = self._checked_resume()
        self.dp_rank, self.tp_rank = dims.coords(ranks.rank)
        # opening the data checks its metadata, tokenizer and size before the model is built
        self.train_loader = self.make_loader(cfg, "train", self.dp_rank, dims.dp, cfg.seed)
        self.val_loader = open_val_loader(cfg, self.make_loader) if cfg.eval_batches else None
        # the run owns out_dir (rank 0 holds the lock): a second run on it is refused here, before
        # the model is built
        self.lock = DirLock(cfg.out_dir, "training run") if ranks.rank == 0 else None
        if self.lock is not None:
            self.lock.acquire()
        self.history: list[dict] = []

        # the run: process group, device, model, optimizer, resumed state
        self.rank = init_distributed(None if cfg.device == "auto" else cfg.device).rank
        dev_type = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        self.device = torch.device(dev_type, ranks.local_rank) if dev_type == "cuda" else torch.device(dev_type)
        self.attention = auto_attention_backend(self.device) if cfg.attention == "auto" else cfg.attention
        check_attention_device(self.attention, self.device)
        if cfg.dtype == "auto":
            self.compute_dtype, why = compute_dtype(self.device)
            if self.rank == 0:
                print(f"compute dtype {why}", flush=True)
        else:
            self.compute_dtype = COMPUTE_DTYPES[cfg.dtype]
        self.mesh = build_mesh(dims.dp, dims.tp, dev_type) if dims.world > 1 else None
        # every rank seeds alike, so a full init gives identical weights everywhere
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = self._build_model()
        # one process and a plain output projection (not sharded by TP/FSDP, no adapter): the loss applies
        # it itself and computes the logits' gradient in the forward (`linear_cross_entropy`)
        self._fused_loss = self.mesh is None and type(self.model.output) is torch.nn.Linear
        self.optimizer = build_optimizer(self.model, cfg, self.device, distributed=self.mesh is not None)
        self.step, self.tokens_seen, self.step_tokens = 0, 0, 0
        self.flops_per_token = flops_per_token(args, cfg.seq_len)
        self.peak_flops = cfg.peak_flops or measure_peak_flops(self.device, self.compute_dtype)
        self._peak_remeasured = 0  # times the measured peak was found too low (see `_mfu`)
        if self.resume_from is not None:
            self.load(self.resume_from)

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation of a step at `tokens_per_s` against the measured peak. A step faster
        than that peak means the peak was measured low (the cores were busy at start-up: a demo on a
        2-core Xeon measured 167 GFLOP/s there, 258 idle, and printed MFU up to 108%): it is then
        measured again, up to 3 times a run, keeping the highest. A peak given in the config stays."""
        mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.world)
        if mfu > 1 and not self.cfg.peak_flops and self._peak_remeasured < 3:
            self._peak_remeasured += 1
            self.peak_flops = max(self.peak_flops, measure_peak_flops(self.device, self.compute_dtype))
            mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.world)
        return mfu

    def _checked_eval_tasks(self, dims: ParallelDims) -> list:
        """The task specs to score at each evaluation, read and checked now (before any training)."""
        if not self.cfg.eval_tasks:
            return []
        if not self.cfg.tokenizer:
            raise ValueError("eval_tasks need the tokenizer: set tokenizer to the tokenizer.model of the data")
        specs = [TaskSpec.load(s) for s in self.cfg.eval_tasks]
        for spec in specs:
            if spec.type == "generate" and dims.dp > 1:
                raise ValueError(f"eval task {spec.name!r} generates text, which a model sharded by FSDP (dp "
                                 f"{dims.dp}) cannot do step by step; score it on the export with scripts/eval.py")
        return specs

    def _checked_resume(self) -> Optional[Path]:
        """The checkpoint to resume, checked against this model and batch before any work."""
        r = self.cfg.resume
        ckpt = None if r == "never" else self.checkpoints.latest() if r == "auto" else Path(r)
        if ckpt is None:
            return None
        meta = read_checkpoint_meta(ckpt)
        diff = model_diff(meta["model_args"], self.args)
        if diff:
            raise ValueError(f"checkpoint {ckpt} is for another model ({'; '.join(diff)}); "
                             f"use the same model settings, another out_dir, or resume=never")
        finetune.check_resume(meta, self.cfg, ckpt)
        old_batch = meta["config"]["global_batch_tokens"] // meta["config"]["seq_len"]
        if old_batch != self.cfg.global_batch_tokens // self.cfg.seq_len:
            raise ValueError(f"checkpoint {ckpt} was trained with global batches of {old_batch} sequences and this "
                             f"run has {self.cfg.global_batch_tokens // self.cfg.seq_len}: the step count and data "
                             f"position would not match; keep global_batch_tokens and seq_len")
        return ckpt

    def _build_model(self) -> torch.nn.Module:
        cfg, args = self.cfg, self.args
        init = cfg.init
        if init == "auto":  # the whole fp32 model per process is fine up to ~1B parameters
            init = "full" if flops_per_token(args, 0) / 6 < 1e9 else "meta"
        if cfg.init_from:
            init = "from"  # built on the meta device, then the checkpoint's weights
        with torch.device(("cpu" if self.mesh is not None else self.device) if init == "full" else "meta"):
            model = Transformer(args)  # a full init runs init_weights() under the seed set above
        model.set_attention_backend(self.attention)
        tp_mesh = self.mesh["tp"] if self.mesh is not None and self.tp > 1 else None
        if tp_mesh is not None:
            apply_tp(model, tp_mesh, output_replicated=True)
        if init == "from":  # fp32 master weights, or the LoRA base in base_dtype
            dtype = parse_dtype(cfg.base_dtype) if cfg.lora and cfg.base_dtype else torch.float32
            finetune.load_initial_weights(model, cfg.init_from, self.device, dtype, tp_mesh, self.tp_rank)
        self.lora = finetune.add_lora(model, cfg.lora, cfg.base_dtype) if cfg.lora else None
        if cfg.ac != "none":
            apply_ac(model, cfg.ac)
        if cfg.compile:
            compile_blocks(model)
        if self.mesh is not None:
            apply_fsdp(model, self.mesh["dp"], MixedPrecisionPolicy(param_dtype=self.compute_dtype,
                                                                    reduce_dtype=torch.float32))
        if init == "meta":
            model.to_empty(device=self.device)
            # On CUDA, DTensor's RNG tracker draws each shard as a slice of one full random tensor. On
            # CPU it draws from the local generator, so seed ranks apart or every shard would be equal
            # (norm weights, the only replicated parameters, are ones).
            torch.manual_seed(cfg.seed + (self.rank if self.device.type == "cpu" else 0))
            model.init_weights()
        elif init == "full":
            model.init_buffers(self.device)
        return model

    # -- one step ----------------------------------------------------------------------------

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token loss (fp32) of a (B, T) batch under the run's mixed precision: the mean (or
        "sum") over the targets (-100 marks a position without one)."""
        autocast = (torch.autocast(self.device.type, dtype=self.compute_dtype)
                    if self.mesh is None and self.compute_dtype != torch.float32 else contextlib.nullcontext())
        with autocast:
            if self._fused_loss and torch.is_grad_enabled():  # training: the logits' gradient computed with the loss
                h = self.model(inputs, hidden=True)  # (B, T, dim)
                return linear_cross_entropy(h, self.model.output.weight, targets, reduction, compile=self.cfg.compile)
            logits = self.model(inputs)  # (B, T, vocab)
        return (compiled_cross_entropy if self.cfg.compile else cross_entropy)(logits, targets, reduction)

    def _dp_sum(self, *xs: float) -> float | list[float]:
        """Sums over the dp ranks (the tp ranks of a group hold the same values), in one reduction."""
        if self.mesh is None:
            return xs[0] if len(xs) == 1 else list(xs)
        t = torch.tensor(xs, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        sums = (t * (self.dp / self.world)).tolist()
        return sums[0] if len(xs) == 1 else sums

    def train_step(self) -> dict:
        """Forward and backward over grad_accum micro-batches, clip, step (or skip when not finite).
        The loss is the sum over the global batch's targets / their number."""
        lr = lr_at(self.step, self.cfg)
        set_lr(self.optimizer, lr)
        batches = [self.train_loader.next() for _ in range(self.grad_accum)]
        # positions: what the step computed (instruction batches are cut to their longest example)
        n_targets, positions = self._dp_sum(float(sum(int((t != IGNORE).sum()) for _, t in batches)),
                                            float(sum(x.numel() for x, _ in batches)))
        loss_sum = 0.0
        for inputs, targets in batches:
            loss = self.loss(inputs.to(self.device), targets.to(self.device), "sum")
            # FSDP averages gradients over dp: * dp makes it the sum over the ranks / n_targets
            (loss * (self.dp / max(n_targets, 1.0))).backward()
            loss_sum += loss.item()
        grad_norm = clip_grad_norm(self.model, self.cfg.grad_clip)
        finite = math.isfinite(grad_norm)  # the same on every rank: the norm is global
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.step_tokens = int(positions)
        self.tokens_seen += self.step_tokens
        rec = {"step": self.step, "loss": self._dp_sum(loss_sum) / max(n_targets, 1.0), "lr": lr,
               "grad_norm": grad_norm, "skipped": not finite}
        if hasattr(self.train_loader, "padding_share"):  # instruction data: the share of padded positions
            rec["padding"] = self.train_loader.padding_share
        return rec

    @torch.no_grad()
    def evaluate(self, n_batches: int | None = None) -> dict:
        """Token-weighted mean loss, perplexity and token count over the first `n_batches` (default
        `eval_batches`) global batches' worth of validation windows: the same windows whatever the
        layout (dp, tp, micro_batch_size), every micro-batch scored by one dp rank."""
        was_training = self.model.training
        self.model.eval()  # LoRA's dropout (and any other) off: the same weights give the same score
        try:  # n_batches 0: only the eval tasks
            return self._evaluate(self.cfg.eval_batches or 1 if n_batches is None else n_batches)
        finally:
            self.model.train(was_training)

    def _evaluate(self, n_batches: int) -> dict:
        out = self._validation_loss(n_batches) if n_batches else {}
        if self.eval_tasks:  # the same numbers on every rank; FSDP: no KV cache, full sequences
            results = evaluate_tasks(self.model, self.tokenizer, self.eval_tasks, batch_size=self.cfg.micro_batch_size,
                                     progress=False, shared_context=self.dp == 1)
            for task, res in results.items():
                out.update({f"{task}/{m}": res[m] for m in ("acc", "acc_norm", "acc_answer", "exact_match",
                                                             "regex_match") if m in res})
        return out

    def _validation_loss(self, n_batches: int) -> dict:
        if self.val_loader is None:
            self.val_loader = open_val_loader(self.cfg, self.make_loader)
        # every rank reads the same stream of micro-batches (the val loader is not split by dp) and
        # scores every dp-th one; FSDP needs the same number of forwards on every rank, so a rank
        # short of a micro-batch at the end runs one more, weighted 0
        total, count, last, seen = 0.0, 0, None, 0
        n_micro = n_batches * self.grad_accum * self.dp
        for i, (inputs, targets) in enumerate(self.val_loader.iter_eval(n_micro)):
            if i % self.dp == self.dp_rank:
                total += self.loss(inputs.to(self.device), targets.to(self.device), "sum").item()
                count += int((targets != IGNORE).sum())  # instruction data: prompts and padding carry no loss
            last, seen = (inputs, targets), i + 1
        if seen % self.dp and self.dp_rank >= seen % self.dp:
            self.loss(last[0].to(self.device), last[1].to(self.device))
        if self.mesh is not None:  # tp ranks hold the same sums: the ratio is unchanged
            t = torch.tensor([total, count], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            total, count = t[0].item() / self.tp, t[1].item() / self.tp
        val_loss = total / max(count, 1)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": int(round(count))}

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, callback: Callable[[dict], None] | None = None) -> dict:
        """Train to `config.steps`; returns {"step", "train_loss", "val_loss", "val_ppl", "history",
        "checkpoint", "export"}. `callback(record)` runs on every rank after each logged step."""
        cfg, is_main = self.cfg, self.rank == 0
        if is_main:
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.out_dir) / "config.json").write_text(json.dumps(self.resolved_config(), indent=2) + "\n")
            if cfg.init_from or cfg.lora:
                print(finetune.describe(cfg, self.model))
            print(f"training {self.args.n_layers} layers, {self.model_size() / 1e6:.1f}M parameters on "
                  f"dp={self.dp} x tp={self.tp} ({self.device.type}), {cfg.steps} steps of "
                  f"{cfg.global_batch_tokens} tokens (grad_accum {self.grad_accum})"
                  + (", at most: batches are cut to their longest example" if cfg.data_format != "tokens" else "")
                  + (f", resuming from {self.resume_from} at step {self.step}" if self.resume_from else ""))
            if hasattr(self.make_loader, "describe"):
                print(self.make_loader.describe(cfg))
            mixture = load_mixture(cfg.data) if cfg.data_format == "tokens" and cfg.data else {}
            if len(mixture) > 1:
                print("data mixture, weights normalised to 1: " + ", ".join(f"{n} {w:.4g}" for n, (_, w) in mixture.items()))
            if self.step >= cfg.steps:
                print(f"the run is complete: step {self.step} of {cfg.steps} (raise steps to train on)")
            print("resolved config: " + json.dumps(self.resolved_config()))
        self.checkpoints.clean_tmp()
        metrics = Metrics(cfg.out_dir, is_main, cfg.steps, self.step, self.resume_from is not None,
                          cfg.tensorboard, cfg.progress)
        bad_in_a_row, last, last_val, saved = 0, {}, {}, None
        if self.lock is not None:
            self.lock.acquire()  # again, after an earlier fit released it
        start, first_step = time.perf_counter(), self.step
        stop = StopRequest(is_main, launched_with_torchrun())
        try:
            stop.__enter__()
            while self.step < self.cfg.steps:
                cfg = self.cfg  # fit_to_budget may shorten the schedule
                t0 = time.perf_counter()
                rec = self.train_step()
                synchronize(self.device)
                if self.step == first_step + 1:
                    after_first = time.perf_counter()  # the first step compiles: time the ones after it
                done = self.step - first_step
                if cfg.time_budget_s and not self.resume_from and done >= BUDGET_PROBE_STEPS \
                        and (done - BUDGET_PROBE_STEPS) % BUDGET_REFIT_EVERY == 0:
                    # the probe's steps after the first, then the last BUDGET_REFIT_EVERY (evaluations
                    # and checkpoints among them count: they are in the budget too)
                    now = time.perf_counter()
                    window = BUDGET_PROBE_STEPS - 1 if done == BUDGET_PROBE_STEPS else BUDGET_REFIT_EVERY
                    self.fit_to_budget((now - (after_first if done == BUDGET_PROBE_STEPS else fitted)) / window,
                                       now - start, metrics, first=done == BUDGET_PROBE_STEPS)
                    fitted, cfg = time.perf_counter(), self.cfg  # (this step may now be the last)
                bad_in_a_row = bad_in_a_row + 1 if rec["skipped"] else 0
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise FloatingPointError(
                        f"stopping at step {self.step}: {bad_in_a_row} steps in a row had a non-finite loss or "
                        f"gradient norm (each was skipped); lower lr, check the data, or resume from "
                        f"{self.checkpoints.latest() or 'an earlier checkpoint'}")
                tps = self.step_tokens / (time.perf_counter() - t0)
                rec.update(tokens=self.tokens_seen, tokens_per_s=tps, mfu=self._mfu(tps), time=time.time())
                scored = cfg.eval_batches or self.eval_tasks  # eval_batches 0: no validation loss
                if scored and ((cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps):
                    last_val = self.evaluate(None if cfg.eval_batches else 0)
                    rec.update(last_val)
                last = rec
                logged = self.step % cfg.log_every == 0 or "val_loss" in rec or self.step == cfg.steps
                if logged:
                    self.history.append(rec)
                    metrics.log(rec)
                metrics.progress(rec, last_val)
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    saved = self.save()
                if callback and logged:
                    callback(rec)
                if stop.agreed(self.mesh is not None, self.device) and self.step < cfg.steps:
                    if self.step % cfg.ckpt_every:
                        saved = self.save()
                    metrics.write(f"stopped by {stop.requested} at step {self.step} of {cfg.steps}: checkpoint "
                                  f"{saved}; run the same command to resume")
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if is_main and not stop.requested:
                latest = self.checkpoints.latest()
                print(f"interrupted at step {self.step}: " + (f"the steps after {latest} were not saved (resume "
                      f"continues from there)" if latest else "no checkpoint was saved"), file=sys.stderr)
            raise
        finally:
            stop.__exit__()
            metrics.close()
            if self.lock is not None:
                self.lock.release()
        exported = self.export(cfg.export_dir, cfg.export_shards) if cfg.export_dir else None
        return {"step": self.step, "train_loss": last.get("loss"), "val_loss": last_val.get("val_loss"),
                "val_ppl": last_val.get("val_ppl"), "history": self.history,
                "checkpoint": str(saved or self.checkpoints.latest() or ""),
                "export": str(exported) if exported else None}

    def fit_to_budget(self, per_step: float, elapsed: float, metrics: Metrics, first: bool = False) -> None:
        """Lower `steps` so that the run ends within `time_budget_s`, given the seconds a step takes
        now (measured after the first one, then over the latest steps); never raises it. The same
        decision on every rank (the slowest rank's time). Says what it decided: every cut, and on the
        `first` fit also that the whole schedule fits."""
        t = torch.tensor([per_step], dtype=torch.float64, device=self.device)
        if self.mesh is not None:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        per_step = t.item()
        left = 0.9 * self.cfg.time_budget_s - elapsed  # 10% for evaluations, checkpoints and export
        fits = self.step + max(0, int(left / per_step))
        if fits < self.cfg.steps:
            # warmup shrinks with the schedule, so a cut run still decays (a warmup longer than the cut
            # run would end it at the peak learning rate)
            warmup = round(self.cfg.warmup_steps * fits / self.cfg.steps)
            metrics.write(f"time budget {self.cfg.time_budget_s:.0f} s, {elapsed:.0f} s spent at step {self.step}: "
                          f"{per_step:.2f} s a step "
                          f"({self.step_tokens / per_step:,.0f} tokens/s), so {fits} steps instead of "
                          f"{self.cfg.steps}; the learning-rate schedule ends there (warmup "
                          f"{self.cfg.warmup_steps} -> {warmup} steps)")
            self.cfg = dataclasses.replace(self.cfg, steps=fits, warmup_steps=warmup)
            metrics.set_total(fits)
        elif first:
            metrics.write(f"time budget {self.cfg.time_budget_s:.0f} s, {elapsed:.0f} s spent at step {self.step}: "
                          f"{per_step:.2f} s a step ({self.step_tokens / per_step:,.0f} tokens/s), so all "
                          f"{self.cfg.steps} steps fit (~{(self.cfg.steps - self.step) * per_step:.0f} s more); "
                          f"timed again every {BUDGET_REFIT_EVERY} steps")

    def model_size(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def resolved_config(self) -> dict:
        return {**self.cfg.to_dict(), "dp": self.dp, "attention": self.attention,
                "dtype": {torch.bfloat16: "bf16", torch.float32: "fp32"}[self.compute_dtype]}

    # -- checkpoints -------------------------------------------------------------------------

    def save(self) -> Path:
        """Checkpoint this step (model, optimizer, data position, RNG states) atomically."""
        rank_state = {"dp_rank": self.dp_rank, "tp_rank": self.tp_rank, "loader": self.train_loader.state_dict(),
                      **rng_state(self.device)}
        meta = {"tokens": self.tokens_seen, "config": self.resolved_config(),
                "model_args": dataclasses.asdict(self.args),
                "layout": {"dp": self.dp, "tp": self.tp, "world": self.world}}
        return self.checkpoints.save(self.step, self.model, self.optimizer, rank_state, meta)

    def load(self, ckpt: str | Path) -> None:
        """Restore model, optimizer, step, data position and RNG states from `ckpt` (tp may differ)."""
        meta, rank_state, same_layout = self.checkpoints.load(ckpt, self.model, self.optimizer,
                                                              {"dp": self.dp, "tp": self.tp})
        # the loader's position counts samples of the global stream: valid for any dp; RNG states
        # only carry over to the same layout
        self.train_loader.load_state_dict(rank_state["loader"])
        if same_layout:
            set_rng_state(rank_state, self.device)
        self.step, self.tokens_seen = meta["step"], meta["tokens"]
        saved_steps = meta["config"].get("steps")
        if self.cfg.time_budget_s and saved_steps and saved_steps < self.cfg.steps:  # the schedule the budget chose
            self.cfg = dataclasses.replace(self.cfg, steps=saved_steps,
                                           warmup_steps=meta["config"].get("warmup_steps", self.cfg.warmup_steps))
        saved = {k: meta["config"].get(k) for k in ("steps", "warmup_steps", "lr", "min_lr_ratio")}
        changed = {k: (v, getattr(self.cfg, k)) for k, v in saved.items() if v is not None and v != getattr(self.cfg, k)}
        if changed and self.rank == 0:  # allowed (e.g. training longer), but the learning rate moves at once
            before = dataclasses.replace(self.cfg, **{k: a for k, (a, _) in changed.items()})
            print(f"resuming at step {self.step} with another schedule: "
                  + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                  + f"; the learning rate goes from {lr_at(self.step - 1, before):.3g} to {lr_at(self.step, self.cfg):.3g}",
                  flush=True)

    def export(self, out_dir: str | Path, num_shards: int = 1, dtype: torch.dtype = torch.float16) -> Path | None:
        """Gather the full weights to rank 0 and write Meta's layout there (returns None elsewhere);
        LoRA: the merged model, and the adapter in PEFT's format in out_dir/peft; `export_hf`: the
        transformers folder too. A weight that fp16 cannot hold makes the export bf16 (said once)."""
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        path = None
        if self.rank == 0:
            try:
                path = finetune.export_model(sd, self.args, self.cfg, out_dir, num_shards, dtype, self.lora, self.step)
            except OutOfRangeError as e:
                if e.dtype != torch.float16:
                    raise
                print(f"the export is bf16, not {dtype_name(e.dtype)}: {e.key} holds {e.value:.6g}, beyond "
                      f"{dtype_name(e.dtype)}'s {torch.finfo(e.dtype).max:.6g}", file=sys.stderr, flush=True)
                path = finetune.export_model(sd, self.args, self.cfg, out_dir, num_shards, torch.bfloat16, self.lora,
                                             self.step)
        if self.mesh is not None:
            dist.barrier()
        return path


def train(config: TrainConfig | str | dict, callback: Callable[[dict], None] | None = None,
          make_loader: Callable | None = None, **overrides) -> dict:
    """Run pretraining or fine-tuning from a `TrainConfig`, a config name/path, or a dict, with field overrides.
    Returns the summary of `Trainer.fit` (history of {step, loss, lr, val_loss, ...} records)."""
    if isinstance(config, TrainConfig):
        config = TrainConfig.from_dict(config.to_dict(), **overrides)
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config, **overrides)
    else:
        config = TrainConfig.from_name(str(config), **overrides)
    return Trainer(config, make_loader=make_loader).fit(callback)


def command_line_flags() -> list[str]:
    """Every flag a training script takes besides --config: the TrainConfig fields and model.<field>."""
    return TrainConfig.fields() + [f"model.{f.name}" for f in dataclasses.fields(ModelArgs)]


def train_from_command_line(config: str, **overrides) -> dict:
    """What scripts/pretrain.py and scripts/finetune.py run: the named config with the flags' overrides;
    rank 0 prints the summary (without the history) as JSON."""
    summary = train(TrainConfig.from_name(config, **overrides))
    if torchrun_ranks().is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return summary
