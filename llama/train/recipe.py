"""The paper's training recipe as functions: learning-rate schedule, AdamW with its weight-decay
groups, gradient clipping, the loss, and the FLOPs that MFU counts.

Recipe (LLaMA paper, section 2): AdamW(beta1 0.9, beta2 0.95, eps 1e-8), weight decay 0.1 on every
weight matrix - the projections, `output` and the `tok_embeddings` table - and none on the RMSNorm
weights (the only 1-D parameters; there are no biases); linear warmup over `warmup_steps` then cosine
decay to `min_lr_ratio` (10%) of the peak at `steps`; gradients clipped to a global norm of 1.0.
The loss is the mean next-token cross-entropy in fp32; compiled, the fp32 copy of the logits is
never materialised. In training on one process the loss applies the output projection itself and
writes the logits' gradient over them (`linear_cross_entropy`). AdamW runs its fused kernel where it
can (one CPU process, CUDA).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from llama.env import synchronize
from llama.cpu_kernels import cpu_kernels
from llama.model import ModelArgs
from llama.train.config import TrainConfig


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
    inflate MFU past 100%). bf16 on a CPU: the faster of bf16 and fp32 products, since bf16 numbers
    multiply exactly in fp32 and CPUs without bf16 instructions do just that (on a Xeon without
    AVX512-BF16: 60 against 330 GFLOP/s; against the bf16 figure a bf16 run printed MFU past 100%)."""
    device = torch.device(device)
    if device.type == "cpu" and dtype == torch.bfloat16:
        return max(_matmul_flops(device, torch.bfloat16, n, seconds), _matmul_flops(device, torch.float32, n, seconds))
    return _matmul_flops(device, dtype, n, seconds)


def _matmul_flops(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """The best FLOP/s of an (n, n) @ (n, n) `dtype` product on `device` over `seconds` (at least one)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    synchronize(device)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == float("inf"):
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss in fp32: logits (B, T, vocab) in any dtype, targets (B, T) int64; the mean (or
    "sum") over the positions whose target is not -100 (prompt tokens and padding of fine-tuning data)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction=reduction)


_compiled_cross_entropy = None


def compiled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """`cross_entropy` through torch.compile: one fused kernel, no fp32 copy of the logits."""
    global _compiled_cross_entropy
    if _compiled_cross_entropy is None:
        _compiled_cross_entropy = torch.compile(cross_entropy)
    return _compiled_cross_entropy(logits, targets, reduction)


def _softmax_pass(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place, each row of logits (N, V) -> exp(row - its max); returns (the summed loss of the rows
    whose target is not -100, (N, 1) fp32: 1 / the row's sum of exponentials, 0 where there is no target)."""
    x = logits.float()  # logits itself when they are fp32: read all of it before the copy_
    valid = (targets != -100)[:, None]
    picked = x.gather(1, torch.where(valid, targets[:, None], 0))
    m = x.amax(-1, keepdim=True)
    e = torch.exp(x - m)
    s = e.sum(-1, keepdim=True)
    logits.copy_(e)
    loss = torch.where(valid, m + torch.log(s) - picked, 0.0).sum()
    return loss, torch.where(valid, 1.0 / s, 0.0)


def _gradient_pass(e: torch.Tensor, inv: torch.Tensor, targets: torch.Tensor) -> None:
    """In place, exp(logits - max) (N, V) -> softmax - one_hot(targets): the gradient of the summed loss
    with respect to the logits (rows without a target: 0)."""
    onehot = torch.arange(e.size(1), device=e.device)[None, :] == targets[:, None]
    e.copy_(e.float() * inv - torch.where(inv > 0, onehot, False).float())


_compiled_passes = None


def _cpu_kernel():
    """The C++ CPU kernels (llama/cpu_kernels.cpp, built on first use), or None."""
    return cpu_kernels()


def softmax_gradient_(logits: torch.Tensor, targets: torch.Tensor, compile: bool = False) -> torch.Tensor:
    """In place, logits (N, V) -> softmax - one_hot(targets), the gradient of the summed loss (rows
    whose target is -100: 0); returns that summed loss, fp32. On CPU one C++ pass (the row read once
    from memory, one exponential per element); elsewhere, or without a C++ compiler, two passes in
    torch (each one fused kernel with `compile`)."""
    if logits.device.type == "cpu" and (kernel := _cpu_kernel()) is not None:
        return torch.tensor(kernel.softmax_gradient(logits, targets), dtype=torch.float32)
    global _compiled_passes
    passes = (_softmax_pass, _gradient_pass)
    if compile:
        if _compiled_passes is None:
            _compiled_passes = tuple(torch.compile(f) for f in passes)
        passes = _compiled_passes
    loss, inv = passes[0](logits, targets)
    passes[1](logits, inv, targets)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits h @ w.T (in h's dtype), whose gradient is computed in the forward,
    into the logits' own memory: no second (N, V) tensor, no pass over the logits in the backward."""

    @staticmethod
    def forward(ctx, h, w, targets, compile: bool):
        ctx.w_dtype = w.dtype
        w = w.to(h.dtype)
        logits = h @ w.t()  # (N, V)
        loss = softmax_gradient_(logits, targets, compile)
        ctx.save_for_backward(h, w, logits)
        return loss

    @staticmethod
    def backward(ctx, grad):
        h, w, g = ctx.saved_tensors  # g: the logits' gradient for a loss gradient of 1
        scale = grad.to(h.dtype)  # applied to the (N, dim) operand and result, not to the (vocab, dim) ones
        dh = (g @ w).mul_(scale) if ctx.needs_input_grad[0] else None
        dw = (g.t() @ (h * scale)).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                         compile: bool = False) -> torch.Tensor:
    """`cross_entropy(F.linear(h, weight), targets, reduction)` in fp32 for training: h (B, T, dim) the
    final hidden states, weight (vocab, dim) the output projection. The logits are computed in the
    autocast dtype (or h's), and their gradient - softmax minus the target's one-hot - is written over
    them in the forward, where the loss already reads them (`softmax_gradient_`): one (B T, vocab)
    tensor instead of two (the logits and, in the backward, their gradient), and on CPU ~4x faster
    than the compiled `cross_entropy`'s forward and backward (60M, 4 x 512, bf16: 12 vs 54 ms).
    compile: where the C++ kernel does not run, its two passes through torch.compile."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    vocab = weight.size(0)
    bad = targets[(targets != -100) & ((targets < 0) | (targets >= vocab))]
    if bad.numel():
        raise ValueError(f"target token id {int(bad[0])} is outside the model's vocabulary 0..{vocab - 1} (-100 marks "
                         f"a position without a target): the data was tokenized for another vocabulary")
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    with torch.autocast(h.device.type, enabled=False):
        loss = _LinearCrossEntropy.apply(h.flatten(0, 1).to(dtype), weight, targets.flatten(), compile)
    if reduction == "mean":
        loss = loss / (targets != -100).sum().clamp(min=1)
    return loss


def adamw_kwargs(device: torch.device | str, distributed: bool = False) -> dict:
    """Implementation flags for torch.optim.AdamW: the fused kernel on one CPU or on CUDA, foreach on
    CUDA with DTensor parameters (FSDP2/TP), the default otherwise."""
    dev = torch.device(device).type
    if not distributed and dev in ("cpu", "cuda"):
        return {"fused": True}
    return {"foreach": True} if dev == "cuda" else {}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                    distributed: bool = False) -> torch.optim.AdamW:
    """AdamW with the recipe's betas, eps and decay groups, at the schedule's first learning rate."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, **adamw_kwargs(device, distributed))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """The global L2 norm of all gradients (across ranks and meshes: FSDP x TP mixes 1-D and 2-D
    meshes); scales them down to `max_norm` when it is above (max_norm 0: measure only)."""
    by_mesh: dict[Any, list] = {}
    for p in model.parameters():
        if p.grad is not None:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    total = 0.0
    for grads in by_mesh.values():
        n = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        if hasattr(n, "full_tensor"):
            n = n.full_tensor()
        total += n.double().item() ** 2
    norm = math.sqrt(total)
    coef = max_norm / (norm + 1e-6)
    if max_norm > 0 and math.isfinite(norm) and coef < 1.0:
        for grads in by_mesh.values():
            torch._foreach_mul_(grads, coef)
    return norm
