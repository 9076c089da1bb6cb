"""One-row matrix products and one-token attention for GPU decoding, as Triton kernels.

A batch-1 decoding step multiplies one activation row by every weight matrix of the model: it reads
each weight once and does two flops per weight, so the step is as fast as the weights stream from
memory. cuBLAS runs these one-row products as general matrix kernels: at a 7B model's attention
output and down projections they read at 59-83% of the copy bandwidth (H200, H100), and a profile
of an earlier step showed split-K reductions among its kernels. `gemv` here is one kernel per
product: each program streams a band of weight rows, multiplies by the row held in cache, and
writes its band of outputs, with no partial sums to combine. Triton's autotuner picks the band and
tile sizes once per weight shape and dtype. Measured (benchmarks/README.md, 2026-11-27): 74-86% of
the copy bandwidth on those two shapes, 91-97% on the larger ones; a 7B batch-1 step 12% (H200) and
6.5% (H100) faster. int8 weights (llama.quantize) are widened to fp32 by integer operations
(`INT8_BITS`): a 1B int8 step's products 7% faster than with conversion instructions, and int8
decoding 1.06x bf16's on an H200, where it was 0.79x.

`OneRowLinears` routes `F.linear(x, w)` with one row, no bias and a half-precision CUDA weight to
it; `llama.inference.decoders.CompiledDecoder` turns it on around its one-token steps on CUDA, where
torch.compile traces it into the step's graph as an opaque op. Everything else is left to
`F.linear`. Triton ships with CUDA builds of torch; without it the mode does nothing.

`decode_attention` is a decoding step's attention: one query per row over the KV cache. The
compiled step has fixed shapes, so sdpa there attends over the whole cache under a mask built in
every layer; on an H200 cuDNN's flash kernel took 8.4 us a layer of a 1B step for 384 positions,
17% of the step (benchmarks/README.md, run 9), where reading them takes under 1 us. The kernel
reads the position from the device and only keys 0..pos, split over programs that each keep a
running softmax, then combined (flash decoding); no mask. `OneTokenAttention` routes
llama.model.attention's one-token calls with tensor positions to it, around the compiled decoder's
steps. (Unmeasured on a GPU as written: benchmarks/gpu.py times it against sdpa.)
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - CPU builds of torch have none; a broken install is as good as none
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (the tests)
INT8_BITS = True  # int8 weights widened by integer ops rather than conversion instructions
MAX_SPLIT = 256  # decode_attention's most positions a program, when it sizes the splits itself


def available() -> bool:
    """Whether the kernel can run here: Triton, and a CUDA device (or Triton's interpreter)."""
    return triton is not None and (torch.cuda.is_available() or INTERPRET)


if triton is not None:

    def _configs():
        if INTERPRET:  # one config: the interpreter cannot time candidates
            return [triton.Config({"BLOCK_N": 4, "BLOCK_K": 32})]
        # (rows per program, columns per load, warps, pipeline stages): a program's rows times
        # columns is 8-32 KiB of bf16 weights in flight per stage (the last three: up to 64)
        sizes = [(4, 1024, 4, 4), (8, 512, 4, 4), (8, 1024, 8, 3), (16, 256, 4, 4), (16, 512, 8, 3),
                 (32, 256, 8, 4), (32, 512, 8, 3), (64, 128, 4, 4),
                 # wider loads: int8 weights have half the bytes of bf16 ones per column
                 (4, 2048, 4, 4), (8, 2048, 8, 3), (16, 1024, 8, 3)]
        return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in sizes]

    @triton.autotune(configs=_configs(), key=["N", "K"])
    @triton.heuristics({"EVEN": lambda a: a["N"] % a["BLOCK_N"] == 0 and a["K"] % a["BLOCK_K"] == 0})
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, stride_w, K: tl.constexpr, SCALED: tl.constexpr,
                     INT8_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
        # K is a compile-time constant: one build per weight shape, and loops Triton's CPU
        # interpreter can run
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        row_ok = rows < N
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + cols
            if EVEN:  # no masks: whole tiles only
                x = tl.load(x_ptr + k, eviction_policy="evict_last")
                w = tl.load(w_rows + k[None, :], eviction_policy="evict_first")  # read once per step
            else:
                k_ok = k < K
                x = tl.load(x_ptr + k, mask=k_ok, other=0.0, eviction_policy="evict_last")
                w = tl.load(w_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0,
                            eviction_policy="evict_first")
            if SCALED and INT8_BITS:
                # int8 -> fp32 in integer ops: q + 0x4B400000 read as fp32 is 1.5 * 2^23 + q, exactly
                # (Hopper converts integers to floats at a quarter of the rate of adds)
                wf = (w.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
            else:
                wf = w.to(tl.float32)
            acc += wf * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if SCALED:  # int8 rows times their fp scale
            y *= tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


    @triton.jit
    def _attend_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, part_ptr, stats_ptr, S,
                       sqb, sqh, skb, sks, skh, svb, svs, svh, sob, soh, scale,
                       H: tl.constexpr, N_REP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       SPLIT: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
        # program (b, h, j): query head h of row b over the cached positions j * SPLIT.. up to the
        # new token's position (the rest of the cache is never read); with one split it writes the
        # output, else its unnormalized sums and its (max, sum of exponentials) for _combine_kernel
        b, h, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        kvh = h // N_REP  # grouped-query: the kv head serving this query head
        end = tl.minimum(tl.load(pos_ptr).to(tl.int32) + 1, S)  # keys 0..pos are visible (never past the cache)
        lo = j * SPLIT
        hi = tl.minimum(lo + SPLIT, end)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + b * sqb + h * sqh + d, mask=d_ok, other=0.0).to(tl.float32) * scale
        k_row = k_ptr + b.to(tl.int64) * skb + kvh * skh
        v_row = v_ptr + b.to(tl.int64) * svb + kvh * svh
        m = tl.max(tl.full((BLOCK_S,), float("-inf"), tl.float32), 0)  # running max of the scores
        l = tl.sum(tl.zeros((BLOCK_S,), tl.float32), 0)  # running sum of exp(score - m)
        acc = tl.zeros((BLOCK_D,), tl.float32)  # running sum of exp(score - m) * value
        for s0 in range(lo, hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < hi
            ok = s_ok[:, None] & d_ok[None, :]
            k = tl.load(k_row + s.to(tl.int64)[:, None] * sks + d[None, :], mask=ok, other=0.0).to(tl.float32)
            x = tl.where(s_ok, tl.sum(k * q[None, :], 1), float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 0))  # finite: s0 < hi, so one position at least
            alpha = tl.exp(m - m_new)
            p = tl.exp(x - m_new)
            v = tl.load(v_row + s.to(tl.int64)[:, None] * svs + d[None, :], mask=ok, other=0.0).to(tl.float32)
            l = l * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m = m_new
        if SPLITS == 1:
            tl.store(o_ptr + b * sob + h * soh + d, (acc / l).to(o_ptr.dtype.element_ty), mask=d_ok)
        else:  # a split wholly after the position leaves m = -inf, l = 0: no weight in the combine
            at = (b * H + h) * SPLITS + j
            tl.store(part_ptr + at * BLOCK_D + d, acc)
            tl.store(stats_ptr + 2 * at, m)
            tl.store(stats_ptr + 2 * at + 1, l)

    @triton.jit
    def _combine_kernel(part_ptr, stats_ptr, o_ptr, sob, soh, H: tl.constexpr, D: tl.constexpr,
                        BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, CHUNK: tl.constexpr):
        # the splits of (b, h) rescaled to their common max and summed: softmax(scores) @ values.
        # CHUNK splits at a time (a tile of every split's sums at once spilled from 256 splits on)
        b, h = tl.program_id(0), tl.program_id(1)
        first = (b * H + h) * SPLITS
        mx = tl.max(tl.full((CHUNK,), float("-inf"), tl.float32), 0)
        for c in range(0, SPLITS, CHUNK):
            j = c + tl.arange(0, CHUNK)
            mx = tl.maximum(mx, tl.max(tl.load(stats_ptr + 2 * (first + j), mask=j < SPLITS, other=float("-inf")), 0))
        d = tl.arange(0, BLOCK_D)
        num = tl.zeros((BLOCK_D,), tl.float32)
        den = tl.sum(tl.zeros((CHUNK,), tl.float32), 0)
        for c in range(0, SPLITS, CHUNK):
            j = c + tl.arange(0, CHUNK)
            j_ok = j < SPLITS
            m = tl.load(stats_ptr + 2 * (first + j), mask=j_ok, other=float("-inf"))
            l = tl.load(stats_ptr + 2 * (first + j) + 1, mask=j_ok, other=0.0)
            w = tl.exp(m - mx)  # split 0 always holds position 0: mx is finite
            part = tl.load(part_ptr + (first + j)[:, None] * BLOCK_D + d[None, :], mask=j_ok[:, None], other=0.0)
            num += tl.sum(w[:, None] * part, 0)
            den += tl.sum(w * l, 0)
        tl.store(o_ptr + b * sob + h * soh + d, (num / den).to(o_ptr.dtype.element_ty), mask=d < D)


@torch.library.custom_op("llama::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T for x with one row (any leading dims of size 1): (..., K) x (N, K) -> (..., N),
    fp32 sums, the result in x's dtype. An int8 weight comes with its per-row `scales` (N,)
    (llama.quantize): then x @ (weight * scales[:, None]).T. Inference only (no gradient)."""
    _check(x, weight, scales)
    n, k = weight.shape
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _gemv_kernel[grid](x.contiguous(), weight, weight if scales is None else scales.contiguous(), out, n,
                       weight.stride(0), k, scales is not None, INT8_BITS)
    return out


@torch.library.custom_op("llama::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                     split: int = 0) -> torch.Tensor:
    """Attention of one new token per row over a KV cache: q (B, 1, H, D), k and v (B, S, Hkv, D)
    (views of the cache are fine: unit stride along D), `pos` (1,) the new token's position, which
    sees keys 0..pos; -> (B, 1, H, D) in q's dtype, fp32 inside. Only positions 0..pos are read,
    `split` positions a program (0: about two programs an SM, at most MAX_SPLIT positions each),
    their partial softmaxes combined as in flash decoding. Each query head has its own program:
    a grouped-query kv head is read once for each of its query heads (from L2 after the first).
    Inference only (no gradient)."""
    _check_attention(q, k, v, pos)
    bsz, _, n_heads, head_dim = q.shape
    seqlen, n_kv = k.size(1), k.size(2)
    block_d = triton.next_power_of_2(head_dim)
    block_s = 16 if INTERPRET else max(16, min(64, 4096 // block_d))  # 32 KiB of fp32 keys a tile
    if split <= 0:
        # about two programs an SM over the whole cache, at most MAX_SPLIT positions each: the
        # cache is sized for the longest generation, and a split wholly after pos only exits
        sms = 4 if INTERPRET else torch.cuda.get_device_properties(q.device).multi_processor_count
        split = min(MAX_SPLIT, triton.cdiv(seqlen, max(1, 2 * sms // (bsz * n_heads))))
    split = triton.cdiv(max(split, block_s), block_s) * block_s  # whole tiles
    splits = triton.cdiv(seqlen, split)
    out = torch.empty(bsz, 1, n_heads, head_dim, dtype=q.dtype, device=q.device)
    if splits > 1:
        part = torch.empty(bsz, n_heads, splits, block_d, dtype=torch.float32, device=q.device)
        stats = torch.empty(bsz, n_heads, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part = stats = out  # unused
    on_q = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with on_q:  # launched on q's GPU, not on the current one
        _attend_kernel[(bsz, n_heads, splits)](
            q, k, v, pos, out, part, stats, seqlen, q.stride(0), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(2), head_dim ** -0.5,
            H=n_heads, N_REP=n_heads // n_kv, D=head_dim, BLOCK_D=block_d, SPLIT=split, SPLITS=splits, BLOCK_S=block_s)
        if splits > 1:
            _combine_kernel[(bsz, n_heads)](part, stats, out, out.stride(0), out.stride(2), H=n_heads, D=head_dim,
                                            BLOCK_D=block_d, SPLITS=splits,
                                            CHUNK=min(32, triton.next_power_of_2(splits)))
    return out


@decode_attention.register_fake
def _(q, k, v, pos, split=0):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _check_attention(q, k, v, pos) -> None:
    """One sentence naming what `decode_attention` cannot take."""
    if q.dim() != 4 or q.size(1) != 1:
        raise ValueError(f"decode_attention takes one new token per row, q (B, 1, H, D); got q {tuple(q.shape)}")
    b, _, h, d = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.size(0) != b or k.size(3) != d or h % k.size(2):
        raise ValueError(f"decode_attention takes k and v (B, S, Hkv, D) with q's B and D and Hkv dividing H; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("decode_attention takes q, k and v with unit stride along the head dimension")
    if pos.numel() != 1 or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention takes the position as one integer tensor; got {pos.dtype} "
                         f"{tuple(pos.shape)}")
    if len({t.device for t in (q, k, v, pos)}) != 1:
        raise ValueError(f"decode_attention takes q, k, v and pos on one device; got {q.device}, {k.device}, "
                         f"{v.device}, {pos.device}")
    if not available() or not (q.device.type == "cuda" or INTERPRET):
        raise RuntimeError(f"decode_attention runs on CUDA devices with Triton installed; got a tensor on {q.device}"
                           + ("" if triton is not None else " and no Triton"))


def _check(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> None:
    """One sentence naming what `gemv` cannot take."""
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"gemv takes a 2-D weight with unit column stride; got shape {tuple(weight.shape)}, "
                         f"strides {weight.stride()}")
    n, k = weight.shape
    if x.dim() == 0 or x.size(-1) != k or x.numel() != k:
        raise ValueError(f"gemv takes one row of {k} values (the weight's columns); got x {tuple(x.shape)}")
    if weight.dtype == torch.int8:
        if scales is None or scales.shape != (n,):
            raise ValueError(f"gemv takes per-row scales of shape ({n},) with an int8 weight; got "
                             f"{None if scales is None else tuple(scales.shape)}")
    elif scales is not None or weight.dtype != x.dtype:
        raise ValueError(f"gemv takes a weight in x's dtype ({x.dtype}) without scales, or an int8 one with them; "
                         f"got {weight.dtype}{' with scales' if scales is not None else ''}")
    if len({x.device, weight.device} | ({scales.device} if scales is not None else set())) != 1:
        raise ValueError(f"gemv takes x, weight and scales on one device; got {x.device} and {weight.device}")
    if not available() or not (x.device.type == "cuda" or INTERPRET):
        raise RuntimeError(f"gemv runs on CUDA devices with Triton installed; got a tensor on {x.device}"
                           + ("" if triton is not None else " and no Triton"))


@gemv.register_fake
def _(x, weight, scales=None):
    return x.new_empty(*x.shape[:-1], weight.size(0))


_active = 0  # how many OneRowLinears are entered (read by llama.quantize's one-row int8 path)


def one_row_kernel_on(x: torch.Tensor) -> bool:
    """Whether one-row products of `x` go to `gemv` here: inside OneRowLinears, on its devices, and
    not while recording for a backward pass (the kernel has no gradient)."""
    return (_active > 0 and available() and (x.device.type == "cuda" or INTERPRET)
            and not (torch.is_grad_enabled() and x.requires_grad))


class OneRowLinears(TorchFunctionMode):
    """While active, `F.linear(x, w)` of one row x, no bias, and x, w of one half-precision dtype on
    a CUDA device (any device under Triton's interpreter) runs `gemv`, unless autograd would need
    its gradient; every other call is unchanged. Inert where `available()` is false.
    llama.quantize's int8 linears take `gemv` too while it is entered (`one_row_kernel_on`). The
    count it keeps is process-wide: enter it on one thread at a time."""

    def __enter__(self):
        global _active
        entered = super().__enter__()
        _active += 1
        return entered

    def __exit__(self, *exc):
        global _active
        _active -= 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:  # (torch._C._nn.linear is the same function)
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is None and _fits(x, w):
                return torch.ops.llama.gemv(x, w)
        return func(*args, **kwargs)


_attention_active = 0  # how many OneTokenAttention are entered (read by llama.model.attention)


class OneTokenAttention:
    """While entered, llama.model's attention of one new token per row over the whole KV cache with
    a tensor position (the compiled decoder's one-token steps) runs `decode_attention`, on a CUDA
    device (any device under Triton's interpreter) and where no gradient is recorded: it reads the
    cache only up to the position and builds no mask. Inert where `available()` is false.
    Process-wide, like OneRowLinears."""

    def __enter__(self):
        global _attention_active
        _attention_active += 1
        return self

    def __exit__(self, *exc):
        global _attention_active
        _attention_active -= 1


def one_token_attention_on(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether attention of q over k, v goes to `decode_attention` here (see OneTokenAttention)."""
    return (_attention_active > 0 and available() and (q.device.type == "cuda" or INTERPRET)
            and all(type(t) is torch.Tensor for t in (q, k, v))  # not DTensor shards
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and q.dim() == 4 and q.size(1) == 1 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)


def _fits(x, w) -> bool:
    return (type(x) is torch.Tensor and type(w) in (torch.Tensor, torch.nn.Parameter)  # not DTensor shards
            and x.dim() >= 1 and w.dim() == 2 and one_row_kernel_on(x)
            and not (torch.is_grad_enabled() and w.requires_grad)
            and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
            and w.stride(1) == 1 and x.numel() == x.size(-1) == w.size(1) and x.device == w.device)
