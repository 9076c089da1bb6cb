"""LoRA (low-rank adaptation), a transform applied to a built `Transformer`, like int8 quantization.

Each targeted projection computes `y = W x + (alpha / r) B A dropout(x)` with A (r, in) initialised
like an `nn.Linear` (Kaiming-uniform, a = sqrt(5)) and B (out, r) at zero, so a fresh adapter leaves
the model's output unchanged. The base weight is frozen and keeps its dtype (e.g. bf16); the adapter
matrices have their own dtype (fp32 by default) and the adapter path runs in that dtype: the input is
cast to it, and the adapter's output is cast to the base output's dtype before the sum (as peft does).

Names: the projection module is not wrapped, its class is swapped for a LoRA subclass (e.g.
`LoRALinear(nn.Linear)`) that gains two children. So the base weight keeps Meta's key
(`layers.0.attention.wq.weight`) and the adapter adds `layers.0.attention.wq.lora_A.weight` and
`...wq.lora_B.weight`. A base state dict loads with `strict=True` before `apply_lora` (the usual
order: build, load, apply_lora) or after it with `load_base_state_dict`, which is strict about every
key except the adapters'; a full state dict (base + adapters, e.g. a training checkpoint) loads with
plain `load_state_dict(strict=True)`. Forward hooks on the module (tensor parallel's) stay in place.

Order with the other transforms (llama/parallel.py): quantize_int8 -> apply_tp -> apply_lora ->
apply_ac -> compile -> apply_fsdp. Under tensor parallelism the adapter matrices are DTensors sharded like their base
weight: a column-wise base (W sharded on dim 0: wq wk wv w1 w3 output) gets B sharded on dim 0 and A
replicated; a row-wise base (W sharded on dim 1: wo w2) gets A sharded on dim 1 and B replicated.
Then `A x` / `B (A x)` need no communication beyond the base layer's own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llama.model import LINEARS, TOP_WEIGHTS
from llama.quantize import Int8Linear

# target short name -> where it sits in a block ("attention.wq"; "layers.N." is prefixed), from the
# weights table: every projection of a block, then the output projection
_MODULE_PATHS = {path.rsplit(".", 1)[1]: path for path in LINEARS}
TARGETS = (*_MODULE_PATHS, *(name for name, w in TOP_WEIGHTS.items() if w.tp == "colwise"))  # ... "output"
ADAPTER_KEYS = (".lora_A.weight", ".lora_B.weight")


class LoRAMixin:
    """The adapter part of a LoRA projection: children `lora_A` (r -> in) and `lora_B` (out <- r)
    added to an existing projection module, whose own forward computes the frozen base."""

    lora_r: int
    lora_alpha: float
    lora_scaling: float
    lora_dropout: float

    def _add_adapter(self, r: int, alpha: float, dropout: float, dtype: torch.dtype, scaling: float | None):
        base_w = self.weight
        device = base_w.device
        self.lora_r, self.lora_alpha, self.lora_dropout = r, float(alpha), float(dropout)
        self.lora_scaling = alpha / r if scaling is None else float(scaling)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()
        _shard_like_base(self, base_w)

    @torch.no_grad()
    def reset_lora_parameters(self):
        """A like nn.Linear's default init (Kaiming-uniform, a = sqrt(5)), B zero."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.device.type == "meta":
            return
        full = torch.empty(a.shape, dtype=a.dtype, device=_local(a).device)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5))
        copy_full(a, full)
        b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # the frozen base (nn.Linear or Int8Linear)
        h = x.to(self.lora_A.weight.dtype)
        if self.lora_dropout and self.training:
            h = F.dropout(h, self.lora_dropout, training=True)
        delta = self.lora_B(self.lora_A(h)) * self.lora_scaling  # (..., out) in the adapter dtype
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A, (out, in), in the adapter dtype (a DTensor sharded like W under TP)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.lora_scaling

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, lora_r={self.lora_r}, lora_alpha={self.lora_alpha:g}, "
                f"lora_dropout={self.lora_dropout:g}")


class LoRALinear(LoRAMixin, nn.Linear):
    pass


class LoRAInt8Linear(LoRAMixin, Int8Linear):
    pass


_LORA_CLASS = {nn.Linear: LoRALinear, Int8Linear: LoRAInt8Linear}
_BASE_CLASS = {v: k for k, v in _LORA_CLASS.items()}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into `param`, a plain tensor or a DTensor (its local shard)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        # rank 0's values are the truth: every rank ends with the same full matrix
        param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements).to_local())
    else:
        param.copy_(full)


def _shard_like_base(mod: nn.Module, base_w: torch.Tensor) -> None:
    """Under tensor parallelism turn lora_A / lora_B into DTensors consistent with the base weight."""
    if not hasattr(base_w, "device_mesh"):
        return
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh, placements = base_w.device_mesh, tuple(base_w.placements)
    if any(p.is_shard(0) for p in placements):  # column-wise: output features split
        pa, pb = tuple(Replicate() for _ in placements), placements
    elif any(p.is_shard(1) for p in placements):  # row-wise: input features split
        pa, pb = placements, tuple(Replicate() for _ in placements)
    elif all(p.is_replicate() for p in placements):
        pa = pb = placements
    else:
        raise ValueError(f"LoRA cannot shard an adapter for a base weight with placements {placements}; "
                         "supported: Shard(0) (column-wise), Shard(1) (row-wise), Replicate")
    for name, pl in (("lora_A", pa), ("lora_B", pb)):
        lin = getattr(mod, name)
        # rank 0's full matrix, distributed: the replicas agree even if the ranks' RNGs do not
        lin.weight = nn.Parameter(distribute_tensor(lin.weight.data, mesh, pl))


def lora_modules(model: nn.Module) -> dict[str, LoRAMixin]:
    """{module name: module} of every LoRA projection in `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAMixin)}


def target_names(model: nn.Module, targets) -> list[str]:
    """Module names in a Transformer for target short names ("wq", ..., "output")."""
    if isinstance(targets, str):
        targets = [t for t in targets.replace(",", " ").split() if t]
    targets = list(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target(s) {unknown or targets!r}; choose from {list(TARGETS)}")
    names = []
    for i in range(len(model.layers)):
        names += [f"layers.{i}.{_MODULE_PATHS[t]}" for t in TARGETS if t in targets and t != "output"]
    if "output" in targets:
        names.append("output")
    return names


def add_lora(module: nn.Module, r: int, alpha: float, dropout: float = 0.0, dtype: torch.dtype | None = torch.float32,
             scaling: float | None = None, name: str = "module") -> LoRAMixin:
    """Turn one projection (nn.Linear or Int8Linear) into its LoRA version in place; returns it.

    `dtype` None means the base weight's dtype (float32 for an int8 base). `scaling` overrides
    alpha / r (rsLoRA uses alpha / sqrt(r)).
    """
    if isinstance(module, LoRAMixin):
        raise ValueError(f"{name} already has a LoRA adapter; merge_lora or build a fresh model first")
    cls = _LORA_CLASS.get(type(module))
    if cls is None:
        raise ValueError(f"LoRA applies to nn.Linear or Int8Linear projections; {name} is a {type(module).__name__}")
    if getattr(module, "bias", None) is not None:
        raise ValueError(f"LoRA supports bias-free projections only (LLaMA has none); {name} has a bias")
    if not (isinstance(r, int) and r >= 1):
        raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if dtype is None:
        dtype = module.weight.dtype if module.weight.is_floating_point() else torch.float32
    if not dtype.is_floating_point:
        raise ValueError(f"LoRA adapter dtype must be a floating point dtype, got {dtype}")
    module.__class__ = cls  # the same object: parameters, names and hooks are kept
    module._add_adapter(r, alpha, dropout, dtype, scaling)
    return module


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.05,
               targets=("wq", "wv"), dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Add LoRA adapters to `model` (a Transformer) in place and freeze everything else; returns it.

    targets: any of "wq wk wv wo w1 w2 w3 output" (a list or a space/comma separated string), in
    every layer. The adapters are created in `dtype` (fp32 by default, None for the base's dtype),
    on the base weights' device; under tensor parallelism (apply_tp first) they are sharded like
    their base weight. Apply before activation checkpointing, compile and FSDP.
    """
    names = target_names(model, targets)
    modules = dict(model.named_modules())
    for name in names:
        add_lora(modules[name], r, alpha, dropout, dtype, name=name)
    mark_only_lora_trainable(model)
    return model


def mark_only_lora_trainable(model: nn.Module) -> nn.Module:
    """requires_grad True for the adapter matrices, False for every other parameter."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(ADAPTER_KEYS))
        n += p.requires_grad
    if n == 0:
        raise ValueError("the model has no LoRA adapters: call apply_lora first")
    return model


def is_lora_key(key: str) -> bool:
    return key.endswith(ADAPTER_KEYS)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter matrices only: {"layers.0.attention.wq.lora_A.weight": (r, in), "...lora_B.weight":
    (out, r), ...}. DTensors stay DTensors (call .full_tensor() to gather)."""
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k)}


def lora_config(model: nn.Module) -> dict:
    """{"r", "alpha", "dropout", "targets", "scaling"} of the adapters in `model` (they must agree)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    seen = {(m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_scaling) for m in mods.values()}
    if len(seen) > 1:
        raise ValueError(f"the model's adapters differ in (r, alpha, dropout, scaling): {sorted(seen)}")
    r, alpha, dropout, scaling = seen.pop()
    short = {v: k for k, v in _MODULE_PATHS.items()}
    targets = sorted({"output" if n == "output" else short[n.split(".", 2)[2]] for n in mods}, key=TARGETS.index)
    return {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets, "scaling": scaling}


def load_base_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], assign: bool = False) -> None:
    """Load base weights into a model that already has adapters: every base key must be present and
    no key may be unknown (as strict=True), only the adapters' keys may be missing (they keep their
    values). Checkpoint-only keys such as Meta's `rope.freqs` must be dropped by the caller."""
    keys = set(model.state_dict())
    missing = sorted(k for k in keys - set(state_dict) if not is_lora_key(k))
    unexpected = sorted(set(state_dict) - keys)
    if missing or unexpected:
        raise ValueError(f"base state dict does not match the model: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    adapters = {k: v for k, v in model.state_dict(keep_vars=True).items() if is_lora_key(k) and k not in state_dict}
    model.load_state_dict({**state_dict, **adapters}, strict=True, assign=assign)  # adapters keep their values


def load_lora_state_dict(model: nn.Module, adapters: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) adapter matrices into the model's adapters (DTensors get their shard).
    Every adapter of the model must be given, nothing else, with the right shapes."""
    params = {k: v for k, v in model.named_parameters() if is_lora_key(k)}
    missing = sorted(set(params) - set(adapters))
    unexpected = sorted(set(adapters) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter weights do not match the model's adapters: missing {missing}, "
                         f"unexpected {unexpected}")
    with torch.no_grad():
        for k, p in params.items():
            v = adapters[k]
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"adapter {k} has shape {tuple(v.shape)}, the model expects {tuple(p.shape)}")
            copy_full(p, v.to(device=_local(p).device, dtype=p.dtype))


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += (alpha / r) B A, in the base dtype) and turn the
    modules back into plain nn.Linear (same names and keys as before apply_lora); returns `model`.
    The merged parameters keep the requires_grad the base had (frozen)."""
    for name, mod in lora_modules(model).items():
        if isinstance(mod, Int8Linear):
            raise ValueError(f"{name} has an int8 base: merging into it would quantize the adapter "
                             "away. Load the unquantized weights, apply the adapter to them "
                             "(load_lora_state_dict) and merge there")
        mod.weight.add_(mod.delta_weight().to(mod.weight.dtype))
        unmark(mod)
    return model


def unmark(mod: LoRAMixin) -> None:
    """Drop the adapter of one module without merging it (its class goes back to the base's)."""
    del mod.lora_A, mod.lora_B
    for attr in ("lora_r", "lora_alpha", "lora_scaling", "lora_dropout"):
        delattr(mod, attr)
    mod.__class__ = _BASE_CLASS[type(mod)]


def num_lora_params(model: nn.Module) -> int:
    return sum(p.numel() for k, p in model.named_parameters() if is_lora_key(k))


def apply_lora_weights(model: nn.Module, adapters: dict[str, torch.Tensor], alphas: dict[str, float],
                       rslora: bool = False, dropout: float = 0.0, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Add adapters with given weights to exactly the modules `adapters` holds them for, in place:
    `adapters` maps "<module>.lora_A.weight" (r, in) and "<module>.lora_B.weight" (out, r), full
    tensors in our (Meta's) row order; `alphas` maps each module name to its alpha; the rank comes
    from the tensors, the scaling is alpha / r (alpha / sqrt(r) with `rslora`). Everything but the
    adapters is frozen. Returns `model`. (llama.train.finetune.load_peft_adapter reads a PEFT folder
    into this.)"""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in adapters.items():
        if not is_lora_key(key):
            raise ValueError(f"{key!r} is not an adapter key (<module>.lora_A.weight or <module>.lora_B.weight)")
        module, kind = key.rsplit(".", 2)[:2]
        by_module.setdefault(module, {})[kind] = v
    if not by_module:
        raise ValueError("no adapter weights given")
    modules = dict(model.named_modules())
    for name, ab in by_module.items():
        if name not in modules:
            raise ValueError(f"adapter weights for {name!r}, which is not a module of this model "
                             f"({len(model.layers)} layers)")
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{name} has only {sorted(ab)} of lora_A / lora_B")
        r = ab["lora_A"].shape[0]
        if ab["lora_B"].shape[1] != r:
            raise ValueError(f"{name}: lora_A has rank {r} but lora_B has {ab['lora_B'].shape[1]}")
        alpha = alphas[name]
        add_lora(modules[name], r, alpha, dropout, dtype, scaling=alpha / (math.sqrt(r) if rslora else r), name=name)
    load_lora_state_dict(model, adapters)
    mark_only_lora_trainable(model)
    return model


@torch.no_grad()
def merged_state_dict(state_dict: dict[str, torch.Tensor], scaling: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """A base state dict (Meta's keys only) with every adapter of `state_dict` (full tensors, e.g.
    a gathered model state dict) folded in: W + scaling B A, computed in fp32 and cast back to W's
    dtype. `scaling`: one value, or one per module name. The model itself is left as it is."""
    out = {k: v for k, v in state_dict.items() if not is_lora_key(k)}
    for key in [k for k in state_dict if k.endswith(ADAPTER_KEYS[0])]:
        module = key[: -len(ADAPTER_KEYS[0])]
        a, b = state_dict[key], state_dict[module + ADAPTER_KEYS[1]]  # (r, in), (out, r)
        s = scaling[module] if isinstance(scaling, dict) else scaling
        w = out[module + ".weight"]
        out[module + ".weight"] = (w.float() + s * (b.float() @ a.float())).to(w.dtype)
    return out
