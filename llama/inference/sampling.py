"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import numbers
from typing import Optional

import numpy as np
import torch


def _number(x) -> bool:
    """A real number: Python's, numpy's or a one-element tensor; not a bool."""
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.dtype.is_complex and x.dtype != torch.bool
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check_sampling(temperature: float, top_p: float, top_k: Optional[int]) -> None:
    if not _number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    if not _number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or isinstance(top_k, (bool, np.bool_)) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row from (B, vocab) logits: argmax at temperature 0, else softmax(logits / T)
    restricted to the top-k tokens and then to the smallest prefix (by probability) whose mass
    reaches top_p, renormalised and sampled. The candidates are ordered as a stable descending sort
    orders them (equal probabilities, common with bf16 logits, by token id), so a seeded draw does
    not depend on how they were found."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    on_cpu = probs.device.type == "cpu"  # (a GPU sorts whole: nothing read back to the host)
    if top_k is not None and top_k < probs.size(-1):
        probs_sorted, idx = _largest(probs, top_k) if on_cpu else _sorted(probs, top_k)  # (B, top_k)
    elif top_p < 1.0 and on_cpu:
        probs_sorted, idx = _nucleus_prefix(probs, top_p)  # (B, V), zeros past a prefix of the sort
    else:
        probs_sorted, idx = _sorted(probs)  # (B, V)
    if top_p < 1.0:
        # keep token i if the mass strictly before it is < top_p: the smallest prefix reaching top_p
        mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
        probs_sorted = probs_sorted.masked_fill(mass_before >= top_p, 0.0)
    probs_sorted = probs_sorted / probs_sorted.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sorted, 1, generator=generator)  # (B, 1) index into sorted
    return idx.gather(-1, choice).squeeze(-1)


def _sorted(probs: torch.Tensor, k: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's probabilities (the first k) and token ids, largest first, ties by token id."""
    values, idx = probs.sort(dim=-1, descending=True, stable=True)
    return (values, idx) if k is None else (values[:, :k], idx[:, :k])


def _largest(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_sorted(probs, k)` without sorting the whole vocabulary: each row's k-th largest probability
    (topk), every token at or above it (ids ascending: all of a tie at the k-th place, whichever of
    them topk returned), those sorted stably."""
    kth = probs.topk(k, dim=-1).values[:, -1:]
    values, idx = [], []
    for row, at_least in zip(probs, kth):
        ids = (row >= at_least).nonzero().squeeze(-1)
        v, order = row[ids].sort(descending=True, stable=True)
        values.append(v[:k])
        idx.append(ids[order[:k]])
    return torch.stack(values), torch.stack(idx)


def _nucleus_prefix(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`_sorted(probs)`, exact for every token top-p keeps and zero past them, without sorting the
    whole vocabulary (2.5 of a sampled token's 4.3 ms at 32000 on a 2-core CPU): how many of the
    largest probabilities hold top_p of each row's mass is read from their mass by octave below the
    row's largest (one pass), and only those are taken (`_largest`). The tokens drawn are the full
    sort's for the same generator: the kept prefix and the arrays' lengths are the same, the rest
    zeros either way. A flat distribution, whose nucleus is a large part of the vocabulary, is
    sorted whole."""
    B, vocab = probs.shape
    bins = 64
    octave = torch.log2(probs.amax(dim=-1, keepdim=True) / probs.clamp_min(1e-30)).floor_().clamp_(0, bins - 1).long()
    flat = (octave + torch.arange(B, device=probs.device)[:, None] * bins).flatten()
    mass = torch.bincount(flat, weights=probs.flatten().double(), minlength=B * bins).view(B, bins).cumsum(-1)
    count = torch.bincount(flat, minlength=B * bins).view(B, bins).cumsum(-1)
    # the first octave at which the mass from the top passes top_p (with a margin of rounding, so the
    # full sort's cumulative sums past the prefix stay >= top_p): every token up to it
    reach = (mass < top_p + 1e-5).sum(dim=-1, keepdim=True).clamp_(max=bins - 1)
    k = int(count.gather(-1, reach).max())
    if 4 * k < vocab:
        values, idx = _largest(probs, k)
        if bool((values.sum(dim=-1) >= top_p + 1e-5).all()):
            return _padded(values, idx, vocab)
    return _sorted(probs)


def _padded(values: torch.Tensor, idx: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) values and indices as (B, vocab) ones, zeros after the first k."""
    full_values, full_idx = values.new_zeros(values.size(0), vocab), idx.new_zeros(idx.size(0), vocab)
    full_values[:, :values.size(1)] = values
    full_idx[:, :idx.size(1)] = idx
    return full_values, full_idx
