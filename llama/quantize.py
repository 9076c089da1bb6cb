"""int8 weight-only quantization, a transform applied to a loaded model.

Every `nn.Linear` becomes an `Int8Linear` and the embedding an `Int8Embedding`: weights stored as
int8 with one scale per output row (symmetric, scale = max|w_row| / 127), activations stay in the
model's dtype. Weight memory drops to about half of bf16 (a quarter of fp32); batch-1 decoding,
which reads every weight once per token, reads half the bytes. Parameter names stay Meta's keys
(`...wq.weight` is now the int8 tensor, `...wq.scales` its scales).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama.gpu_kernels import one_row_kernel_on

METHODS = ("int8",)


def quantize_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 weight, (out,) scales) with w ~ q * scales[:, None]."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scales[:, None]).T for an int8 `weight` (out, in) and its per-row `scales`."""
    # (x @ q^T) * scales == x @ (q * scales[:, None])^T; the int8 -> x.dtype cast is per call, so
    # memory stays int8 between calls
    if torch.compiler.is_compiling() and x.numel() == x.size(-1) and one_row_kernel_on(x):
        return torch.ops.llama.gemv(x, weight, scales)  # int8 read once, on a Triton kernel
    if torch.compiler.is_compiling() and x.numel() == x.size(-1):
        # one row (a decoding step under torch.compile): written as a reduction over `in`, which
        # the compiler fuses with the int8 read (one pass over the weight) instead of casting the
        # whole weight to a new tensor for a matmul
        y = (x.float().unsqueeze(-2) * weight.float()).sum(-1)  # (..., out), fp32 accumulation
        return y.to(x.dtype) * scales.to(x.dtype)
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        if lin.bias is not None:
            raise ValueError("Int8Linear supports bias-free linears only (LLaMA has no biases)")
        w = lin.weight.detach()
        m = cls(lin.in_features, lin.out_features, w.dtype, w.device)
        q, s = quantize_per_row(w)
        m.weight.copy_(q)
        m.scales.copy_(s.to(w.dtype))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=dtype, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        w = emb.weight.detach()
        m = cls(emb.num_embeddings, emb.embedding_dim, w.dtype, w.device)
        q, s = quantize_per_row(w)
        m.weight.copy_(q)
        m.scales.copy_(s.to(w.dtype))
        return m

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.weight)  # (..., dim) int8: only the rows looked up
        return rows.to(self.scales.dtype) * self.scales[tokens].unsqueeze(-1)


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear / nn.Embedding of `model` (in place) for its int8 version; returns it.

    Apply after loading and before compile. Tensor-parallel (DTensor) weights are not supported.
    """
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, (nn.Linear, nn.Embedding)) and hasattr(child.weight, "to_local"):
                raise ValueError("int8 quantization runs on a single process; it does not support "
                                 "tensor-parallel (DTensor) weights")
            if isinstance(child, nn.Linear):
                setattr(mod, child_name, Int8Linear.from_linear(child))
            elif isinstance(child, nn.Embedding):
                setattr(mod, child_name, Int8Embedding.from_embedding(child))
    return model


def quantize(model: nn.Module, method: str | None) -> nn.Module:
    """Apply quantization `method` ("int8", or None for none)."""
    if method is None or method in ("none", ""):
        return model
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; supported: {list(METHODS)} (or none)")
    return quantize_int8(model)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and persistent buffers (the weights, quantized or not)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return n + sum(b.numel() * b.element_size() for _, b in model.named_buffers() if not _.endswith("freqs_cis"))
