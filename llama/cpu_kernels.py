"""CPU kernels for decoding: bf16 matrix-vector products at memory bandwidth.

Decoding a few rows reads every weight once per token, so its speed is memory bandwidth. `use_cpu_gemv`
is a transform: it swaps a model's bf16 CPU `nn.Linear`s for `GemvLinear` (same parameters, same
state-dict keys), whose single-row products run on a small AVX512-BF16 kernel compiled on first use.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 is faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))



# Decoding a few rows reads every weight once per token, so its speed is memory bandwidth. The
# library GEMV for bf16 on CPU reaches about half of it (it is built for large products); this
# kernel streams 4 weight rows at a time with AVX512-BF16 dot products (fp32 accumulation) and
# reuses each loaded block for all M input rows. Built on first use with the C++ compiler
# (cached by torch in ~/.cache/torch_extensions); where it cannot build or run, nothing changes.
_GEMV_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>

static inline float bf2f(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; std::memcpy(&f, &u, 4); return f; }

// y (M, N) = x (M, K) @ w (N, K)^T, bf16 in and out, fp32 accumulation.
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16: bf16 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv_bf16: shapes");
  x = x.contiguous(); w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), K32 = K / 32 * 32;
  auto y = torch::empty({M, N}, torch::dtype(torch::kFloat32));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t n0 = blk * 4, rows = std::min<int64_t>(4, N - n0);
      const uint16_t* r = wp + n0 * K;
      for (int64_t m = 0; m < M; ++m) {
        const uint16_t* xr = xp + m * K;
        float s[4] = {0.f, 0.f, 0.f, 0.f};
        if (rows == 4) {
          __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          for (int64_t k = 0; k < K32; k += 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xr + k);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r + K + k), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(r + 2 * K + k), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(r + 3 * K + k), xv);
          }
          s[0] = _mm512_reduce_add_ps(a0); s[1] = _mm512_reduce_add_ps(a1);
          s[2] = _mm512_reduce_add_ps(a2); s[3] = _mm512_reduce_add_ps(a3);
          for (int j = 0; j < 4; ++j)
            for (int64_t k = K32; k < K; ++k) s[j] += bf2f(r[j * K + k]) * bf2f(xr[k]);
        } else {
          for (int j = 0; j < rows; ++j)
            for (int64_t k = 0; k < K; ++k) s[j] += bf2f(r[j * K + k]) * bf2f(xr[k]);
        }
        for (int j = 0; j < rows; ++j) yp[m * N + n0 + j] = s[j];
      }
    }
  });
  return y.to(at::kBFloat16);
}
"""
_gemv_module = None
GEMV_MAX_ROWS = 1  # measured: a win at batch 1; at batch 8 torch's bf16 GEMM is faster


def cpu_gemv_kernel():
    """The compiled bf16 GEMV extension, or None where this CPU/compiler cannot provide it."""
    global _gemv_module
    if _gemv_module is None:
        _gemv_module = False
        if cpu_has_native_bf16():
            try:
                from torch.utils.cpp_extension import load_inline

                _gemv_module = load_inline("llama_gemv_bf16", cpp_sources=_GEMV_SRC, functions=["gemv_bf16"],
                                           extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16"])
            except Exception as e:  # no compiler, old toolchain...: keep the library GEMV
                import warnings

                warnings.warn(f"bf16 GEMV kernel unavailable, decoding uses torch's ({type(e).__name__}: {e})")
    return _gemv_module or None


@torch.library.custom_op("llama::gemv_bf16", mutates_args=())
def gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(M, K) @ (N, K)^T on the CPU kernel; an opaque op to torch.compile, which fuses around it."""
    return cpu_gemv_kernel().gemv_bf16(x, w)


@gemv_bf16.register_fake
def _(x, w):
    return x.new_empty(x.size(0), w.size(0))


class GemvLinear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose products with <= GEMV_MAX_ROWS bf16 rows on
    CPU run on `cpu_gemv_kernel`; anything else goes to F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        if rows <= GEMV_MAX_ROWS and x.dtype == torch.bfloat16 and x.device.type == "cpu" and self.bias is None:
            return gemv_bf16(x.reshape(rows, -1), self.weight).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


def use_cpu_gemv(model: nn.Module, enable: bool = True) -> bool:
    """Switch every plain bf16 CPU nn.Linear of `model` to `GemvLinear` (a transform: parameters and
    keys unchanged; enable=False switches back). Returns whether the kernel is in use."""
    if enable and cpu_gemv_kernel() is None:
        return False
    for mod in model.modules():
        if enable and type(mod) is nn.Linear and type(mod.weight) is nn.Parameter and \
                mod.weight.dtype == torch.bfloat16 and mod.weight.device.type == "cpu":
            mod.__class__ = GemvLinear
        elif not enable and type(mod) is GemvLinear:
            mod.__class__ = nn.Linear
    return enable
