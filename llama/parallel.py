"""Parallelism and the other transforms of a built `Transformer`: the device mesh, tensor parallel,
FSDP2, activation checkpointing and per-block compile, applied in torchtitan's order
(TP -> activation checkpointing -> compile -> FSDP) by training and inference alike.

Tensor parallelism is Megatron's layout expressed with DTensor, read off `llama.model.WEIGHTS`:
q/k/v and w1/w3 are split by output features (each rank holds whole heads / a slice of the hidden
width), wo and w2 by input features with an all-reduce after them; the embedding is split by
vocabulary rows and the output projection by vocabulary, gathered back to full logits. Norm
weights stay replicated.

Activation checkpointing (`apply_ac`): `full` keeps only each block's input and recomputes the
whole block in backward; `selective` is the paper's recipe: the recomputation takes the expensive
results - matmul outputs, the attention kernel's output (sdpa's or the blocked op's), and
collectives under tensor parallel - from what the forward saved, and only runs the cheap
elementwise work again. The blocks are not wrapped: each block's `forward` is replaced in place,
so parameter names stay Meta's keys.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from llama.model import LAYER_WEIGHTS, TOP_WEIGHTS, ModelArgs


@dataclass(frozen=True)
class ParallelDims:
    """world = dp x tp, checked once; dp 0 means world // tp. The mesh is (dp, tp) with tp innermost
    (the ranks of one tensor-parallel group are neighbours, so they share a node)."""

    dp: int
    tp: int
    world: int

    @classmethod
    def resolve(cls, dp: int, tp: int, world: int) -> "ParallelDims":
        if tp < 1 or dp < 0:
            raise ValueError(f"tp must be >= 1 and dp >= 0 (got dp {dp}, tp {tp})")
        dp = dp or max(1, world // tp)
        if dp * tp != world:
            raise ValueError(f"dp {dp} x tp {tp} = {dp * tp} does not equal the world size {world}; launch "
                             f"{dp * tp} processes (torchrun --nproc_per_node) or change dp/tp")
        return cls(dp, tp, world)

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp rank, tp rank) of global rank `rank`."""
        return rank // self.tp, rank % self.tp


def check_tp_degree(args: ModelArgs, tp: int) -> None:
    """Raise a clear error if a model with `args` cannot be split over `tp` ranks."""
    problems = []
    if args.n_heads % tp:
        problems.append(f"n_heads={args.n_heads}")
    if args.n_kv_heads % tp:
        problems.append(f"n_kv_heads={args.n_kv_heads}")
    if args.ffn_hidden_dim % tp:
        problems.append(f"ffn hidden={args.ffn_hidden_dim}")
    if args.vocab_size % tp:
        problems.append(f"vocab_size={args.vocab_size}")
    if tp > 1 and args.tie_embeddings:
        raise ValueError(f"tensor parallel degree {tp} with tied embeddings is not supported (the embedding and the "
                         f"output would shard one tensor twice); run on one process, or with FSDP (dp) only")
    if problems:
        raise ValueError(f"tensor parallel degree {tp} does not divide {', '.join(problems)}; "
                         f"use a degree that divides the heads (e.g. one of {divisors(args.n_kv_heads)})")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_plan(model: nn.Module, output_replicated: bool = True) -> dict:
    """The DTensor plan for `parallelize_module`, from each weight's `tp` style in `llama.model`.
    With `output_replicated=False` the logits stay sharded along the vocabulary (for a
    loss-parallel cross-entropy)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    special = {  # the embedding takes replicated ids; the output's logits are gathered (or not)
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Replicate() if output_replicated else Shard(-1),
                                  use_local_output=output_replicated),
    }
    plan = {name: special.get(name) or styles[w.tp]() for name, w in TOP_WEIGHTS.items() if w.tp}
    for i in range(len(model.layers)):
        plan.update({f"layers.{i}.{name}": styles[w.tp]() for name, w in LAYER_WEIGHTS.items() if w.tp})
    return plan


def apply_tp(model: nn.Module, tp_mesh, output_replicated: bool = True) -> nn.Module:
    """Shard `model` in place over the 1-D device mesh `tp_mesh` (parameters become DTensors)."""
    from torch.distributed.tensor.parallel import parallelize_module

    check_tp_degree(model.args, tp_mesh.size())
    return parallelize_module(model, tp_mesh, tp_plan(model, output_replicated))


def build_mesh(dp: int, tp: int, device_type: str | None = None):
    """A 2-D (dp, tp) device mesh over the default process group, tp innermost (the ranks of one
    tensor-parallel group are neighbours, so they share a node)."""
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dp * tp != world:
        raise ValueError(f"dp {dp} x tp {tp} = {dp * tp} does not equal the world size {world}")
    return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))


def tp_mesh(device_type: str, world: int):
    """A 1-D tensor-parallel mesh over all `world` ranks (inference)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world,))


def assign_local_shards(model: nn.Module, local_sd: dict, mesh, device, dtype) -> None:
    """Replace each parameter of a TP-planned meta model by this rank's slice from `local_sd`
    (key -> this rank's part of the full tensor, e.g. from `llama.formats.meta.load_tp_slice`)."""
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(local_sd)), sorted(set(local_sd) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint keys do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in params.items():
        local = local_sd[name]
        want = p.to_local().shape if isinstance(p, DTensor) else p.shape
        if local.shape != want:
            raise ValueError(f"{name}: this rank's checkpoint slice has shape {tuple(local.shape)}, the "
                             f"{'sharded ' if isinstance(p, DTensor) else ''}model expects {tuple(want)}")
        value = local.to(device=device, dtype=dtype)
        if isinstance(p, DTensor):
            value = DTensor.from_local(value, mesh, p.placements, run_check=False)
        mod_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, nn.Parameter(value, requires_grad=False))


def apply_fsdp(model: nn.Module, dp_mesh, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: shard every block of `model.layers`, then the root (embeddings, norm, output), over the
    1-D mesh `dp_mesh`. `mp_policy` is a `MixedPrecisionPolicy` (e.g. bf16 params, fp32 reduce)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = mp_policy or MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # the root's parameters are needed again at the start of backward: keep them gathered
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return model


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """torch.compile each block of `model.layers` in place (after tensor parallel and activation
    checkpointing, before FSDP). Compiling a block fuses the elementwise work around its matmuls
    (RMSNorm, RoPE, SiLU * w3, casts). Parameter names do not change. Returns `model`."""
    for block in model.layers:
        block.compile(**compile_kwargs)
    return model


# ---------------------------------------------------------------------------------------------
# activation checkpointing

AC_MODES = ("none", "full", "selective")


def _ops(namespace, names):
    """The default overloads of those `names` this torch build has in `namespace`."""
    return {getattr(namespace, n).default for n in names if hasattr(namespace, n)}


# Outputs that `selective` saves: all the FLOPs of a block are in these.
_SAVE_OPS = _ops(torch.ops.aten, [
    "mm", "addmm", "bmm", "baddbmm",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
])
# the blocked attention ops (llama/blocked_attention.py, registered when llama.model is imported)
_SAVE_OPS |= _ops(torch.ops.llama, ["blocked_causal_attention", "cpu_causal_attention"])
# Tensor parallel: recomputing a block must not repeat its collectives.
_SAVE_OPS |= _ops(torch.ops._c10d_functional, ["all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor"])


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    forward = type(block).forward.__get__(block)
    if not torch.is_grad_enabled():  # inference: nothing to save, nothing to recompute
        return forward(*args, **kwargs)
    if block._ac_mode == "selective":
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_selective_context, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_ac(model: nn.Module, mode: str = "selective") -> nn.Module:
    """Checkpoint every block of `model.layers` in place: mode "none", "full" or "selective".

    Parameter names and state_dict keys do not change. Calling it again replaces the earlier mode.
    Returns `model`.
    """
    if mode not in AC_MODES:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}; choose one of {AC_MODES}")
    for block in model.layers:
        if mode == "none":
            block.__dict__.pop("forward", None)
            block.__dict__.pop("_ac_mode", None)
        else:
            block._ac_mode = mode
            block.forward = types.MethodType(_checkpointed_forward, block)
    return model


def ac_mode(model: nn.Module) -> str:
    """The activation checkpointing mode applied to `model`'s blocks ("none" if never applied)."""
    modes = {getattr(b, "_ac_mode", "none") for b in model.layers}
    return modes.pop() if len(modes) == 1 else "mixed"
