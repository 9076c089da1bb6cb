"""What makes a training step fast, as functions the trainer and the benchmark share.

Measured on a 2-core CPU in bf16 (benchmarks/README.md): compiling each block fuses the elementwise
work around the matmuls (RMSNorm, RoPE, SiLU * w3, the autocast casts); compiling the loss fuses the
fp32 upcast, log-softmax and NLL of the (tokens, vocab) logits, so the fp32 logits never exist in
memory; AdamW's fused kernel updates all parameters in one pass per tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """torch.compile each block of `model.layers` in place (after tensor parallel and activation
    checkpointing, before FSDP: torchtitan's order). Parameter names do not change. Returns `model`."""
    for block in model.layers:
        block.compile(**compile_kwargs)
    return model


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in fp32: logits (B, T, vocab) in any dtype, targets (B, T) int64."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


_compiled_cross_entropy = None


def compiled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`cross_entropy` through torch.compile: one fused kernel, no fp32 copy of the logits."""
    global _compiled_cross_entropy
    if _compiled_cross_entropy is None:
        _compiled_cross_entropy = torch.compile(cross_entropy)
    return _compiled_cross_entropy(logits, targets)


def adamw_kwargs(device: torch.device | str, distributed: bool = False) -> dict:
    """Implementation flags for torch.optim.AdamW: the fused kernel on one CPU or on CUDA, foreach on
    CUDA with DTensor parameters (FSDP2/TP), the default otherwise."""
    dev = torch.device(device).type
    if not distributed and dev in ("cpu", "cuda"):
        return {"fused": True}
    return {"foreach": True} if dev == "cuda" else {}
