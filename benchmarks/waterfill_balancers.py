"""The waterfill balancers and inputs that ``bench_waterfill`` and ``ab_waterfill`` time (GPU).

A forward pass calls one balancer per MoE layer, so a timed graph cycles over ``LAYERS`` of
them (on rank 1), each warmed up by one call, which builds its device buffers and compiles the
kernel outside any graph capture.
"""

from __future__ import annotations

from typing import Any

import torch

from eplb import WaterfillBalancer, WaterfillConfig

TOKENS, TOP_K, SLOTS, EP = 4096, 8, 288, 16  # the setting: 4096 x top-8, EP16, 288 slots
LAYERS = 61
RANK = 1
DEFAULT = "static, batch + recorded excess (eplb default)"


def skewed_topk(tokens: int, slots: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[tokens, TOP_K]`` int32 ids with a few hot slots, and float32 weights."""
    gen = torch.Generator(device=device).manual_seed(seed)
    popularity = torch.rand(slots, device=device, generator=gen) ** 4 + 1e-3
    ids = torch.multinomial(popularity.expand(tokens, -1), TOP_K, generator=gen).to(torch.int32)
    return ids, torch.rand(tokens, TOP_K, device=device, generator=gen)


def layer_balancers(ep: int, slots: int, recorded: bool = False, all_reduce: Any = None,
                    **knobs: Any) -> list[WaterfillBalancer]:
    """One warmed-up balancer per layer.

    Args:
        ep, slots: the EP size and routed slots.
        recorded: give recorded rank loads (low ranks hotter), as ``from_placement`` would.
        all_reduce: dynamic mode's collective (e.g. the identity, to time the kernels alone).
        knobs: ``WaterfillConfig`` settings (``routed_scaling_factor`` 2.5, no input checks).
    """
    config = WaterfillConfig(**{"routed_scaling_factor": 2.5, "check_inputs": False, **knobs})
    rank_load = torch.linspace(2.0, 1.0, ep) if recorded else None
    balancers = [WaterfillBalancer(slots, ep, RANK, config, layer_id=layer, rank_load=rank_load, all_reduce=all_reduce)
                 for layer in range(LAYERS)]
    warm_ids, warm_w = skewed_topk(64, slots, "cuda")
    for b in balancers:
        b.expand_topk(warm_ids, warm_w)
    return balancers

