"""Causal attention alone: the `blocked` backend (llama/blocked_attention.py) against torch's
F.scaled_dot_product_attention (on CPU its flash attention: what transformers' default sdpa
attention and our `sdpa` backend call), forward + backward and forward only, one process.

    python benchmarks/attention.py      # training shapes of 60M and 160M, bf16
    python benchmarks/attention.py --shapes 1,12,512,64 --dtype fp32

On a CPU with AVX512-BF16 `blocked` is its C++ kernel (bf16 and fp32), and its torch-op version
(what other CPUs run) gets two more columns. Inputs come as the model makes them: (B, T, H, D)
projections seen as (B, H, T, D). The script refuses to time kernels whose outputs differ beyond the
dtype's rounding. Each cell is the best of `repeats` calls, the kernels taken in turns; % of peak counts the causal half of the score
matrix (4 B H T^2 D / 2 FLOPs forward, 2.5x that backward) over a (2048, 2048) matmul of the dtype
timed in the same run.
"""

from __future__ import annotations

import time

import fire
import torch
import torch.nn.functional as F

from llama import blocked_attention
from llama.blocked_attention import blocked_causal_attention
from llama.env import parse_dtype


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(shapes=("4,8,512,64", "4,12,512,64", "1,12,512,64", "1,8,1024,64"), dtype: str = "bf16", repeats: int = 8):
    dt = parse_dtype(dtype)
    if isinstance(shapes, str) or all(isinstance(x, int) for x in shapes):  # one shape (fire: 1,2,3,4 is a tuple)
        shapes = [shapes]
    shapes = [tuple(int(x) for x in (s.split(",") if isinstance(s, str) else s)) for s in shapes]
    if any(len(s) != 4 for s in shapes):
        raise ValueError(f"each shape is B,H,T,D (four numbers), got {shapes}")
    a = torch.randn(2048, 2048, dtype=dt)
    peak = max(2 * 2048 ** 3 / _best(lambda: a @ a, 5) for _ in range(2))
    kernels = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               "blocked": blocked_causal_attention}
    if blocked_attention._kernel_available():  # blocked is the C++ kernel; + its torch ops
        kernels["torch ops"] = lambda q, k, v: blocked_causal_attention(q, k, v, use_kernel=False)
    print(f"{dtype}, {torch.get_num_threads()} threads, matmul peak {peak / 1e9:.0f} GFLOP/s; blocked: "
          f"{'the C++ kernel' if 'torch ops' in kernels else 'torch ops'}")
    extra = "torch ops" in kernels
    print("| B, H, T, D | sdpa fwd+bwd ms | blocked fwd+bwd ms | ratio | sdpa fwd ms | blocked fwd ms | ratio "
          "| blocked fwd+bwd % of peak |" + (" blocked with torch ops: fwd+bwd ms | fwd ms |" if extra else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if extra else ""))
    for shape in shapes:
        b, h, t, d = shape
        x = [torch.randn(b, t, h, d, dtype=dt, requires_grad=True) for _ in range(3)]
        grad = torch.randn(b, h, t, d, dtype=dt)

        def train(kernel):
            kernel(*(y.transpose(1, 2) for y in x)).backward(grad)

        def forward(kernel):
            with torch.no_grad():
                kernel(*(y.transpose(1, 2) for y in x))

        with torch.no_grad():  # the kernels compute the same attention, or nothing is reported
            outs = [kernel(*(y.transpose(1, 2) for y in x)).double() for kernel in kernels.values()]
        for name, out in zip(list(kernels)[1:], outs[1:]):
            err = (outs[0] - out).abs().max().item()
            if err > (1e-4 if dt == torch.float32 else 5e-2):
                raise RuntimeError(f"{name} and sdpa attention differ by {err:.3g} at shape {shape}: not comparing their times")
        ms = {}
        for _ in range(2):  # in turns
            for name, kernel in kernels.items():
                for kind, run in (("train", train), ("fwd", forward)):
                    t_ = _best(lambda: run(kernel), repeats) * 1e3
                    ms[name, kind] = min(ms.get((name, kind), float("inf")), t_)
        flops = 3.5 * 4 * b * h * t * t * d / 2
        (st, bt), (sf, bf) = (ms["sdpa", "train"], ms["blocked", "train"]), (ms["sdpa", "fwd"], ms["blocked", "fwd"])
        print(f"| {b}, {h}, {t}, {d} | {st:.1f} | {bt:.1f} | {st / bt:.2f}x | {sf:.1f} | {bf:.1f} | {sf / bf:.2f}x "
              f"| {100 * flops / (bt / 1e3) / peak:.0f}% |"
              + (f" {ms['torch ops', 'train']:.1f} | {ms['torch ops', 'fwd']:.1f} |" if extra else ""))


if __name__ == "__main__":
    fire.Fire(main)
