"""Inputs and oracles of the waterfill tests (a module of its own so that the kernel check, also
run in a child process, can import it): random top-k outputs and the water level by bisection."""

from __future__ import annotations

import torch


def random_topk(
    num_tokens: int,
    k: int,
    num_slots: int,
    *,
    seed: int = 0,
    skew: float = 0.0,
    padded: int = 0,
    dtype: torch.dtype = torch.int64,
    weight_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [M, K]`` (distinct slots per token, drawn with a bias toward low slots when ``skew`` > 0,
    so low ranks are hot) and ``weights [M, K]``; the last ``padded`` tokens are all padding and one
    token has half its entries padded."""
    gen = torch.Generator().manual_seed(seed)
    bias = -skew * torch.linspace(0, 1, num_slots, dtype=torch.float64)
    keys = torch.rand(num_tokens, num_slots, generator=gen, dtype=torch.float64).log() / bias.exp()
    ids = keys.topk(k, dim=1).indices
    weights = torch.rand(num_tokens, k, generator=gen).to(weight_dtype)
    if padded:
        ids[num_tokens - padded :] = -1
    if num_tokens > padded:
        ids[0, : k // 2] = -1
    return ids.to(dtype), weights


def bisected_level(load: torch.Tensor, shared: float) -> float:
    """The water level ``T`` with ``sum(max(T - load, 0)) == shared``, by bisection (float64)."""
    lo, hi = float(load.min()), float(load.max()) + shared
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (mid - load).clamp(min=0).sum() < shared else (lo, mid)
    return (lo + hi) / 2
