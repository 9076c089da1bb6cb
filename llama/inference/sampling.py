"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

from typing import Optional

import torch


def check_sampling(temperature: float, top_p: float, top_k: Optional[int]) -> None:
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_p is None or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row from (B, vocab) logits: argmax at temperature 0, else softmax(logits / T)
    restricted to the top-k tokens and then to the smallest prefix (by probability) whose mass
    reaches top_p, renormalised and sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs_sorted, idx = probs.sort(dim=-1, descending=True)  # (B, V)
    if top_k is not None and top_k < probs.size(-1):
        probs_sorted, idx = probs_sorted[:, :top_k], idx[:, :top_k]
    if top_p < 1.0:
        # keep token i if the mass strictly before it is < top_p: the smallest prefix reaching top_p
        mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
        probs_sorted = probs_sorted.masked_fill(mass_before >= top_p, 0.0)
    probs_sorted = probs_sorted / probs_sorted.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sorted, 1, generator=generator)  # (B, 1) index into sorted
    return idx.gather(-1, choice).squeeze(-1)
