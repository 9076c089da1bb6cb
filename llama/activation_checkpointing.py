"""Activation checkpointing for `Transformer` blocks: `none`, `full` or `selective`.

`full` keeps only each block's input and recomputes the whole block in backward. `selective` is the
paper's recipe: during the recomputation the expensive results - matmul (linear) outputs, the
attention kernel's output and communication results under tensor parallelism - come from what the
forward saved, and only the cheap elementwise work (norms, RoPE, SiLU, products, casts) runs again.

The blocks are not wrapped: each block's `forward` is replaced in place by a checkpointed call of the
class's forward, so parameter names and state_dict keys stay Meta's (no
"_checkpoint_wrapped_module." prefix). Apply it after tensor parallelism and before compile and
FSDP (torchtitan's order). Under `torch.no_grad()` the blocks run plainly.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

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
