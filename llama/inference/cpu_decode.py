"""The fused CPU decoding strategy: one C++ call per token (bf16 or fp32, CPUs with AVX512-BF16).

Decoding a few rows reads every weight once per token, so its speed is memory bandwidth, and the
eager model spends as long again on ~25 small ops per layer around the products (norms, RoPE,
cache writes, attention, SiLU, residual adds), each a dispatch and a thread fork/join.
`FusedCpuDecoder` runs one whole decoding step - every layer, the final norm and the output projection - in one call
into the C++ kernel in cpu_decode.cpp (package data, built on first use), with the model's rounding points (in bf16: bf16
activations, fp32 norms/RoPE/softmax/accumulation). Each layer's projections are packed into one
buffer in the order they are read (wq wk wv wo w1 w3 w2), so q/k/v and w1/w3 are each one
matrix-vector product streaming contiguous memory; the parameters become views of that buffer
(same keys, same values, no extra memory): the packing is a transform of the built model. Prefill
(many positions at once) runs the model's own forward.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from llama.env import cpu_has_native_bf16
from llama.inference.decoders import EagerDecoder
from llama.model import LINEARS

MAX_ROWS = 8  # batch rows per fused step (the kernel is templated up to 8)
SOURCE = Path(__file__).with_name("cpu_decode.cpp")
EXTENSION = "llama_cpu_decode"
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512bf16"]


_module = None


def decode_kernel():
    """The compiled C++ extension (built on first use, cached by torch in ~/.cache/torch_extensions),
    or None where this CPU or toolchain cannot provide it."""
    global _module
    if _module is None:
        _module = False
        if cpu_has_native_bf16():
            try:
                from torch.utils.cpp_extension import _get_build_directory, load

                built = Path(_get_build_directory(EXTENSION, verbose=False)) / f"{EXTENSION}.so"
                if not built.is_file():  # say why the first generation waits (torch's build cache is per version)
                    print("building the fused CPU decoding kernel (first use only, ~30 s)...", file=sys.stderr,
                          flush=True)
                _module = load(EXTENSION, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"])
            except Exception as e:  # no compiler, old toolchain...: the eager model decodes
                warnings.warn(f"fused CPU decoding kernel unavailable, decoding runs eagerly ({type(e).__name__}: {e})")
    return _module or None


class FusedCpuDecoder(EagerDecoder):
    """Runs `model(tokens, start_pos, cache)` for one new token per row (up to MAX_ROWS rows) in one
    call into the fused kernel; prefill and larger batches run eagerly. Build with
    `FusedCpuDecoder.create(model)`, which packs the layers' weights (the parameters become views
    into the packed buffers, keys and values unchanged) and returns None where the model does not
    qualify (not bf16/fp32 on CPU, sharded, Linears replaced (int8), or no kernel)."""

    name = "fused"

    def __init__(self, model, kernel):
        super().__init__(model)
        self.kernel = kernel
        self.layers: list[torch.Tensor] = []  # 6 per layer, in the kernel's order
        for block in model.layers:
            mods = [block.get_submodule(name) for name in LINEARS]  # wq wk wv wo w1 w3 w2
            sizes = [m.weight.numel() for m in mods]
            buf = torch.empty(sum(sizes), dtype=mods[0].weight.dtype)
            views, off = [], 0
            for m, n in zip(mods, sizes):
                view = buf[off:off + n].view_as(m.weight)
                view.copy_(m.weight.detach())
                m.weight.data = view  # the parameter now lives in the packed buffer
                views.append(view)
                off += n
            q, k, v, wo, w1, w3, w2 = views
            dim = q.size(1)
            qkv = buf[:q.numel() + k.numel() + v.numel()].view(-1, dim)
            w13 = buf[off - w2.numel() - w1.numel() - w3.numel():off - w2.numel()].view(-1, dim)
            self.layers += [block.attention_norm.weight, qkv, wo, block.ffn_norm.weight, w13, w2]
        self._ptrs = self._pointers()

    @staticmethod
    def create(model) -> Optional["FusedCpuDecoder"]:
        params = list(model.parameters())
        if not params or params[0].dtype not in (torch.bfloat16, torch.float32) or any(
                type(p) is not nn.Parameter or p.dtype != params[0].dtype or p.device.type != "cpu" for p in params):
            return None
        for block in model.layers:
            if any(type(block.get_submodule(n)) is not nn.Linear for n in LINEARS):
                return None
        if type(model.output) is not nn.Linear or (kernel := decode_kernel()) is None:
            return None
        with torch.inference_mode(False), torch.no_grad():  # packed weights must stay usable outside inference
            return FusedCpuDecoder(model, kernel)

    def _pointers(self) -> tuple:
        return tuple(p.data_ptr() for p in self.model.parameters())

    def valid(self) -> bool:
        """False once the model's parameters were replaced (moved, cast, quantized, reassigned)."""
        return self._pointers() == self._ptrs

    def refreshed(self) -> EagerDecoder:
        """Self while the weights are still the packed ones; else packed anew, or eager where the
        model no longer qualifies (e.g. quantized since)."""
        return self if self.valid() else (FusedCpuDecoder.create(self.model) or EagerDecoder(self.model))

    def __call__(self, tokens: torch.Tensor, start_pos: int, cache, last_only: bool = False) -> torch.Tensor:
        """(B, T) ids at positions start_pos.. -> float logits, writing the cache; one-token steps of
        up to MAX_ROWS rows run fused."""
        if tokens.size(1) != 1 or tokens.size(0) > MAX_ROWS:
            return super().__call__(tokens, start_pos, cache, last_only)
        m = self.model
        h = m.tok_embeddings(tokens[:, 0]).contiguous()  # (B, dim)
        logits = self.kernel.decode_step(h, self.layers, m.norm.weight, m.output.weight, cache.k, cache.v,
                                         start_pos, m.freqs_cis[start_pos].float(), m.args.norm_eps, m.args.n_heads,
                                         m.args.n_kv_heads)
        return logits[:, None]
