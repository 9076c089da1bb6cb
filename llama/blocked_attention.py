"""Causal attention as a few large matrix products: the "blocked" attention backend, for CPUs.

torch's CPU flash attention runs at ~18% of the bf16 matmul peak at training shapes (4 x 12 heads
x 512 positions x 64, forward and backward), ~18% of a 160M training step. Here the queries are
taken in blocks of `BLOCK` rows, a block's scores are computed against the keys it can see only,
and the probabilities are kept for the backward instead of recomputed (about B H T (T + 128) / 2
elements: bf16, 16 MB a layer at 160M). Beyond `MAX_SAVED_BYTES` of probabilities a call (long
sequences) it is flash attention again. Two implementations:

- bf16 or fp32 on a CPU with AVX-512 (head size a multiple of 32): one C++ kernel for the
  forward and one for the backward (llama/cpu_kernels.cpp, `causal_attention_forward/backward`). Per
  (batch, kv head) it packs K and V once, multiplies with fp32 sums (bf16: on the native bf16 dot
  instruction where the CPU has AVX512-BF16, else the pairs widened to fp32; fp32: FMAs), keeps scores and softmax in fp32 and writes the probabilities and their
  gradient directly in the layout the next product reads: no copies, no aten passes between the
  products, grouped-query heads read in place. At 60M's shapes, forward + backward: bf16 1.7-1.9x
  the torch-op version below (3.2-3.8x flash attention), fp32 1.3x (benchmarks/attention.py).
- Otherwise (other CPUs, GPUs, other head sizes), torch ops: each block's scores are one batched matmul (oneDNN),
  softmax and its backward one aten pass each; 1.7-2.3x faster than flash attention at 512 positions
  in bf16 (1.4x at 1024, 1.5x in fp32). The scale 1/sqrt(D) is folded into the queries (exact for
  D = 16, 64, 256; one more rounding of q in bf16 otherwise); scores are rounded to the input dtype
  before the softmax, as an eager attention in that dtype does (the C++ kernel and flash attention
  keep them in fp32); the gradients of keys and values accumulate in fp32.

Both are registered as custom ops so that torch.compile calls each as one kernel instead of tracing
it (the copies and casts around them stay outside, where inductor fuses them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llama.cpu_kernels import cpu_kernels

BLOCK = 128  # query rows per matmul: fewer masked-away scores than whole rows, large enough for oneDNN
MAX_SAVED_BYTES = 256 << 20  # probabilities kept for the backward, per call


def _blocks(start: int, seqlen: int, block: int):
    """(first query, end query, keys seen) of each block; query i sits at position start + i."""
    for i0 in range(0, seqlen, block):
        i1 = min(i0 + block, seqlen)
        yield i0, i1, start + i1


def saved_elements(q_shape, start: int, block: int) -> int:
    """Probabilities kept for the backward: B H sum over blocks of (rows x keys seen), in closed
    form so that a symbolic T (torch.compile with dynamic shapes) is not pinned to one value."""
    b, h, t, _ = q_shape
    m = t // block  # whole blocks; then r leftover rows, all seeing start + t keys
    r = t - m * block
    return b * h * (block * block * m * (m + 1) // 2 + r * t + t * start)


@torch.library.custom_op("llama::blocked_causal_attention", mutates_args=())
def _forward(q: Tensor, k: Tensor, v: Tensor, start: int, block: int) -> tuple[Tensor, Tensor]:
    """Contiguous q: (B, H, T, D) at positions start.., already scaled, k/v: (B, H, start + T, D)
    -> (output (B, H, T, D), the softmax probabilities of every block, flat)."""
    out = torch.empty_like(q)
    probs = q.new_empty(saved_elements(q.shape, start, block))
    with torch.autocast(q.device.type, enabled=False):  # in the inputs' dtype, as the buffers are
        _forward_blocks(q, k, v, start, block, out, probs)
    return out, probs


def _forward_blocks(q, k, v, start, block, out, probs):
    at = 0
    # -inf above the diagonal: added to the scores (3x faster than masked_fill_ with a broadcast mask)
    hidden = torch.full((block, block), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    for i0, i1, n in _blocks(start, q.size(2), block):
        s = torch.matmul(q[:, :, i0:i1], k[:, :, :n].transpose(-1, -2))  # (B, H, rows, n)
        rows = i1 - i0
        s[..., n - rows:] += hidden[:rows, :rows]  # query i0 + r sees keys up to start + i0 + r
        p = probs[at:at + s.numel()].view(s.shape)
        at += s.numel()
        torch.softmax(s, -1, out=p)  # (B, H, rows, n)
        torch.matmul(p, v[:, :, :n], out=out[:, :, i0:i1])  # bmm writes the strided rows, no copy


@_forward.register_fake
def _(q, k, v, start, block):
    return torch.empty_like(q), q.new_empty(saved_elements(q.shape, start, block))


@torch.library.custom_op("llama::blocked_causal_attention_backward", mutates_args=())
def _backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, probs: Tensor, start: int,
              block: int) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of `_forward`'s q, k, v (those of k and v in fp32: sums over blocks)."""
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    with torch.autocast(q.device.type, enabled=False):
        _backward_blocks(grad, q, k, v, probs, start, block, dq, dk, dv)
    return dq, dk, dv


def _backward_blocks(grad, q, k, v, probs, start, block, dq, dk, dv):
    b, h, at = q.size(0), q.size(1), 0
    for i0, i1, n in _blocks(start, q.size(2), block):
        g = grad[:, :, i0:i1]  # (B, H, rows, D)
        p = probs[at:at + b * h * (i1 - i0) * n].view(b, h, i1 - i0, n)  # as the forward left it
        at += p.numel()
        dv[:, :, :n] += torch.matmul(p.transpose(-1, -2), g)
        dp = torch.matmul(g, v[:, :, :n].transpose(-1, -2))  # (B, H, rows, n)
        ds = torch._softmax_backward_data(dp, p, -1, p.dtype)  # through the softmax: the scores' gradient
        torch.matmul(ds, k[:, :, :n], out=dq[:, :, i0:i1])
        dk[:, :, :n] += torch.matmul(ds.transpose(-1, -2), q[:, :, i0:i1])


@_backward.register_fake
def _(grad, q, k, v, probs, start, block):
    return torch.empty_like(q), k.new_empty(k.shape, dtype=torch.float32), v.new_empty(v.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, start, block = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.mark_non_differentiable(output[1])  # the probabilities are kept, not learned through
    ctx.start, ctx.block = start, block


def _autograd_backward(ctx, grad, _grad_probs):  # traced by torch.compile around the op: the copies fuse
    q, k, v, probs = ctx.saved_tensors
    dq, dk, dv = _backward(grad.contiguous(), q, k, v, probs, ctx.start, ctx.block)
    return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _kernel():
    """The C++ CPU kernels (llama/cpu_kernels.cpp) where they have the attention (the builds for
    CPUs with AVX-512), else None."""
    module = cpu_kernels()
    return module if hasattr(module, "causal_attention_forward") else None


@torch.compiler.assume_constant_result  # torch.compile asks once, while tracing, instead of tracing the build
def _kernel_available() -> bool:
    return _kernel() is not None


def kernel_saved_elements(q_shape, start: int, block: int, pairs: bool = True) -> int:
    """Probabilities the C++ forward keeps: per (batch, head) and block, its rows (rounded up to pairs
    in bf16: `pairs`) times the keys it sees rounded up to 16 (`block` a multiple of 16); closed form
    as saved_elements."""
    b, h, t, _ = q_shape
    m = t // block
    r = t - m * block
    start16 = (start + 15) // 16 * 16
    rows = (r + 1) // 2 * 2 if pairs else r
    return b * h * (block * (m * start16 + block * m * (m + 1) // 2) + rows * ((start + t + 15) // 16 * 16))


def _bthd(t: Tensor) -> Tensor:
    """(B, H, T, D) view -> (B, T, H, D) view, unit stride in D."""
    t = t.transpose(1, 2)
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("llama::cpu_causal_attention", mutates_args=())
def _cpu_forward(q: Tensor, k: Tensor, v: Tensor, start: int, block: int) -> tuple[Tensor, Tensor]:
    """bf16 or fp32 q (B, H, T, D), k, v (B, Hkv, start + T, D) -> (output (B, H, T, D), the kept
    probabilities): the C++ kernel, scale 1/sqrt(D) applied inside."""
    out, probs = _kernel().causal_attention_forward(_bthd(q), _bthd(k), _bthd(v), start, block)
    return out.transpose(1, 2), probs


@_cpu_forward.register_fake
def _(q, k, v, start, block):
    b, h, t, d = q.shape
    return (q.new_empty(b, t, h, d).transpose(1, 2),
            q.new_empty(kernel_saved_elements(q.shape, start, block, q.dtype == torch.bfloat16)))


@torch.library.custom_op("llama::cpu_causal_attention_backward", mutates_args=())
def _cpu_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, probs: Tensor, start: int,
                  block: int) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _kernel().causal_attention_backward(_bthd(grad), _bthd(q), _bthd(k), _bthd(v), probs, start, block)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


@_cpu_backward.register_fake
def _(grad, q, k, v, probs, start, block):
    return (q.new_empty(q.size(0), q.size(2), q.size(1), q.size(3)).transpose(1, 2),
            k.new_empty(k.size(0), k.size(2), k.size(1), k.size(3)).transpose(1, 2),
            v.new_empty(v.size(0), v.size(2), v.size(1), v.size(3)).transpose(1, 2))


def _cpu_setup_context(ctx, inputs, output):
    q, k, v, start, block = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.start, ctx.block = start, block


def _cpu_autograd_backward(ctx, grad, _grad_probs):
    q, k, v, probs = ctx.saved_tensors
    return (*_cpu_backward(grad, q, k, v, probs, ctx.start, ctx.block), None, None)


_cpu_forward.register_autograd(_cpu_autograd_backward, setup_context=_cpu_setup_context)


def _use_kernel(q: Tensor, block: int) -> bool:
    """The C++ path takes bf16 or fp32 on CPU, head sizes that are multiples of 32 and blocks of a
    multiple of 16."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float32) and q.size(-1) % 32 == 0
            and block % 16 == 0 and _kernel_available())


def blocked_causal_attention(q: Tensor, k: Tensor, v: Tensor, start: int = 0, block: int | None = None,
                             use_kernel: bool = True) -> Tensor:
    """Causal attention of queries q (B, H, T, D) at positions start.. over keys/values k, v
    (B, Hkv, start + T, D), as F.scaled_dot_product_attention computes it with that causal mask.
    Grouped-query k/v (Hkv dividing H; query head h reads kv head h // (H / Hkv)) are taken as they
    are: the C++ kernel reads them in place, the other paths expand them. use_kernel=False: the
    torch ops even where the C++ kernel runs (to compare the two)."""
    block = BLOCK if block is None else block
    if (q.dim() != 4 or k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[2:] != (start + q.size(2), q.size(3))
            or k.size(1) < 1 or q.size(1) % k.size(1) or v.shape != k.shape):
        raise ValueError(f"blocked attention takes q (B, H, T, D) and k, v (B, Hkv, start + T, D), Hkv dividing H, "
                         f"with start={start}; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: pass "
                         f"the start position of the first query and keys up to the last one")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"blocked attention takes q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}: cast them")
    if block < 1:
        raise ValueError(f"block must be >= 1 query rows, got {block}")
    kernel = use_kernel and _use_kernel(q, block)
    saved = (kernel_saved_elements(q.shape, start, block, q.dtype == torch.bfloat16) if kernel
             else saved_elements(q.shape, start, block))
    if kernel and saved * q.element_size() <= MAX_SAVED_BYTES:
        return _cpu_forward(q, k, v, start, block)[0]
    if k.size(1) != q.size(1):  # grouped-query heads, expanded
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    if saved * q.element_size() > MAX_SAVED_BYTES:  # long sequences
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril(start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scale = q.size(-1) ** -0.5  # folded into the queries (exact where D is a power of 4: 16, 64, 256)
    return _forward((q * scale).contiguous(), k.contiguous(), v.contiguous(), start, block)[0]
