"""The training config: every setting of a run, with the paper's recipe as the defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llama.config import JsonConfig, coerce_fields
from llama.lora import TARGETS as LORA_TARGETS
from llama.model import ATTENTION_BACKENDS, ModelArgs
from llama.parallel import AC_MODES

DATA_FORMATS = ("tokens", "alpaca", "chat", "documents")
LORA_DEFAULTS = {"r": 8, "alpha": 16.0, "dropout": 0.05, "targets": ["wq", "wv"]}


@dataclass
class TrainConfig(JsonConfig):
    """Everything a pretraining run needs. Load with `TrainConfig.from_json(path, **overrides)`;
    `model.<field>` overrides (e.g. `model.n_layers=4`) go to the model architecture;
    `TrainConfig.from_name` reads a config of llama/configs/train ("7B", "demo", "tiny", ...)."""

    KIND, WHAT = "train", "training config"  # for JsonConfig (class attributes, not fields)

    description: str = ""
    # model: a preset of llama/configs/models (7B, 13B, 33B, 65B, 20M, tiny, ...) or a params.json path
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
    dtype: str = "auto"  # compute dtype (auto: bf16 on GPUs, the faster one measured on CPUs); master weights fp32
    ac: str = "none"  # activation checkpointing: none | full | selective
    # auto (xformers on CUDA when installed and runnable, blocked on CPU, else sdpa) | sdpa | xformers | math | blocked
    attention: str = "auto"
    compile: bool = False
    dp: int = 0  # 0: world_size // tp
    tp: int = 1
    device: str = "auto"  # auto | cpu | cuda
    init: str = "auto"  # auto | full (build the whole model per process, then shard) | meta
    seed: int = 0
    # seeing the run
    log_every: int = 1
    eval_every: int = 100  # 0: never (except at the end, when eval_batches > 0 or eval_tasks are set)
    # validation scores eval_batches global batches' worth of windows (global_batch_tokens each),
    # the same windows on any layout; 0: no validation
    eval_batches: int = 2
    # local evaluation tasks (llama.eval task spec files) scored at every evaluation, e.g. ["colors.json"]
    eval_tasks: list = field(default_factory=list)
    peak_flops: Optional[float] = None  # per device, for MFU; None: measured with a bf16 matmul
    tensorboard: bool = True
    progress: bool = True
    # seconds this run may train (0: no limit): after the first steps the schedule is sized to fit
    # (steps lowered, never raised; the cosine decay ends at the new last step), and it says so
    time_budget_s: float = 0
    max_bad_steps: int = 5  # stop after this many non-finite losses/gradients in a row
    # checkpoints
    ckpt_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # auto (latest in out_dir, if any) | never | a checkpoint directory
    export_dir: Optional[str] = None  # at the end, write Meta's layout (params.json, consolidated.NN.pth)
    export_shards: int = 1
    # fine-tuning (llama/train/finetune.py)
    # init_from: start from trained weights - a Meta checkpoint dir (any shard count), a transformers
    # folder, or a training checkpoint (or run dir); the architecture comes from it and `model` is unused
    init_from: Optional[str] = None
    data_format: str = "tokens"  # tokens (prepared shards) | alpaca | chat | documents (JSON/JSONL files)
    train_on_input: bool = False  # alpaca / chat: the prompts carry loss too
    val_fraction: float = 0.0  # alpaca / chat / documents: share of the records held out for evaluation
    lora: Optional[dict] = None  # {"r", "alpha", "dropout", "targets"} (defaults 8, 16, 0.05, wq wv): adapters only
    base_dtype: Optional[str] = None  # LoRA: hold the frozen base in bf16 (the adapters stay fp32)
    export_hf: Optional[str] = None  # at the end, also the merged model in transformers' format here

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "TrainConfig":
        """From a dict plus overrides; unknown keys are an error that lists the valid ones.
        Keys `model.<field>` (or a dict under `model_overrides`) set model fields."""
        d = dict(d)
        if isinstance(d.get("lora"), dict) and isinstance(overrides.get("lora"), dict):
            overrides = {**overrides, "lora": {**d["lora"], **overrides["lora"]}}  # --lora '{"r": 16}' keeps the rest
        d.update(overrides)
        model_overrides = dict(d.pop("model_overrides", None) or {})
        for k in [k for k in d if k.startswith("model.")]:
            model_overrides[k[len("model."):]] = d.pop(k)
        unknown = sorted(set(d) - set(cls.fields()))
        if unknown:
            raise ValueError(f"unknown training config key(s) {unknown}; valid keys are {cls.fields()} "
                             f"and model.<field> for the model's fields")
        model_overrides = coerce_fields(ModelArgs, model_overrides, "model.")
        return cls(**coerce_fields(cls, d), model_overrides=model_overrides).validate()


    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_args(self) -> ModelArgs:
        return ModelArgs.from_name(self.model, **self.model_overrides)

    def validate(self) -> "TrainConfig":
        """Raise a ValueError naming the first field whose value cannot work; returns self."""
        choices = {"dtype": ("auto", "bf16", "fp32"), "ac": AC_MODES, "attention": ("auto",) + ATTENTION_BACKENDS,
                   "device": ("auto", "cpu", "cuda"), "init": ("auto", "full", "meta")}
        for key, ok in choices.items():
            if getattr(self, key) not in ok:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {ok}")
        positive = ["steps", "seq_len", "global_batch_tokens", "micro_batch_size", "tp", "log_every",
                    "keep_last", "ckpt_every", "max_bad_steps", "export_shards"]
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        for key in ["warmup_steps", "dp", "eval_every", "eval_batches", "time_budget_s"]:
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0 (got {getattr(self, key)})")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0 (got {self.lr})")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data_format={self.data_format!r} is not one of {DATA_FORMATS}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        self.lora = check_lora(self.lora)
        if self.base_dtype is not None and (self.base_dtype not in ("bf16", "fp32") or self.lora is None):
            raise ValueError(f"base_dtype={self.base_dtype!r}: the frozen base of a LoRA run may be held in bf16 or "
                             f"fp32 (set lora, or leave base_dtype null)")
        if self.export_hf and not self.export_dir:
            raise ValueError("export_hf needs export_dir too (the merged model is written in Meta's layout there)")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise FileNotFoundError(f"checkpoint to resume {self.resume} does not exist (resume takes auto, never "
                                    f"or a checkpoint directory)")
        return self


def check_lora(lora) -> dict | None:
    """`lora` of a training config completed with LORA_DEFAULTS; a wrong key or value is one sentence."""
    if lora is None:
        return None
    if not isinstance(lora, dict):
        raise ValueError(f"lora must be null or an object with keys {sorted(LORA_DEFAULTS)}, got {lora!r}")
    unknown = sorted(set(lora) - set(LORA_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown lora key(s) {unknown}; valid keys are {sorted(LORA_DEFAULTS)}")
    out = {**LORA_DEFAULTS, **lora}
    targets = out["targets"]
    out["targets"] = targets.replace(",", " ").split() if isinstance(targets, str) else list(targets)
    bad = [t for t in out["targets"] if t not in LORA_TARGETS]
    if bad or not out["targets"]:
        raise ValueError(f"lora.targets {bad or out['targets']} must be a non-empty list of {list(LORA_TARGETS)}")
    if not (isinstance(out["r"], int) and out["r"] >= 1):
        raise ValueError(f"lora.r must be an integer >= 1, got {out['r']!r}")
    if not (isinstance(out["alpha"], (int, float)) and out["alpha"] > 0):
        raise ValueError(f"lora.alpha must be a number > 0, got {out['alpha']!r}")
    if not (isinstance(out["dropout"], (int, float)) and 0 <= out["dropout"] < 1):
        raise ValueError(f"lora.dropout must be in [0, 1), got {out['dropout']!r}")
    out["alpha"], out["dropout"] = float(out["alpha"]), float(out["dropout"])
    return out
