"""Decoding strategies: how `Llama` runs the model for each step of generation.

A decoder is called as `decoder(tokens, start_pos, cache, last_only)` with (B, T) ids at positions
start_pos.. and returns float logits, (B, T, vocab) or (B, 1, vocab) with `last_only`, writing the
KV cache. All of them run the one `Transformer.forward`; they differ in how:
    eager     the model's forward as it is (any device, any number of ranks)
    compiled  one-token steps through torch.compile of the same forward with tensor positions
              (fixed shapes: one graph for every position; prefill stays eager)
    fused     one-token steps in one C++ call on x86 CPUs with AVX512-BF16 or AVX2+FMA, and ARM64 with
              NEON (llama/inference/cpu_decode.py, one source built per instruction set); bf16/fp32
              weights, or int8 ones (llama.quantize)
`Llama.build` picks one once, for the machine and the model.
"""

from __future__ import annotations

import torch

from llama.model import KVCache, Transformer

DECODERS = ("auto", "eager", "compiled", "fused")


class EagerDecoder:
    name = "eager"

    def __init__(self, model: Transformer):
        self.model = model

    def __call__(self, tokens: torch.Tensor, start_pos: int, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        return self.model(tokens, start_pos, cache, last_only=last_only).float()

    def refreshed(self) -> "EagerDecoder":
        """The decoder to use from now on (checked once per generate call)."""
        return self


def _decode_step(model: Transformer, tokens: torch.Tensor, cache: KVCache, input_pos: torch.Tensor) -> torch.Tensor:
    return model(tokens, cache=cache, input_pos=input_pos)


class CompiledDecoder(EagerDecoder):
    """One-token steps compiled (torch.compile, fullgraph, static shapes); prefill eager. The first
    steps compile (seconds to a minute); every later position reuses the graph."""

    name = "compiled"

    def __init__(self, model: Transformer, **compile_options):
        super().__init__(model)
        self.step = torch.compile(_decode_step, fullgraph=True, dynamic=False, **compile_options)

    def __call__(self, tokens, start_pos, cache, last_only=False):
        if tokens.size(1) != 1:
            return super().__call__(tokens, start_pos, cache, last_only)
        pos = torch.tensor([start_pos], device=tokens.device)
        return self.step(self.model, tokens, cache, pos).float()
