"""Waterfill's host-side inputs, built once from recorded rank loads.

A balancer given recorded rank loads (``rank_load``) hands its kernel one of these each step,
built here on the host once per top-k width ``K`` (a step's shared load is its routed load over
``K``) and copied to the device once (``config.HostInput`` says which):

- :func:`recorded_loads` ``[W + 1]``: the recorded loads, or pseudo-counts worth ``prior_tokens``
  tokens, and their shared load;
- :func:`recorded_excess` ``[W + 1]``: the other ranks' load above the water level per token
  (``estimate="batch"``);
- :func:`fixed_rank_tables` ``[2, W]``: the rank tables themselves (``estimate="recorded"``
  alone), from :func:`excess_weights` (``move="excess"``) or the deficits (``move="all"``).

The step itself (counting, the draw, the expansion) is ``reference``'s and the kernel's.
"""

from __future__ import annotations

from typing import Any

import torch

from eplb.errors import EplbError
from eplb.runtime.waterfill.config import HostInput, Strategy
from eplb.runtime.waterfill.reference import EXCESS_BITS, WEIGHT_BITS, Rule, rank_tables, rank_weights, water_level

# Recorded loads are rescaled to integers summing to about this: fine enough for the weights
# (WEIGHT_BITS) and far from int64 overflow in the water level.
PRIOR_SCALE = 1 << 24


def scaled_rank_load(rank_load: Any, ep_size: int) -> torch.Tensor:
    """``[W]`` int64: ``rank_load`` (``[W]`` non-negative, any unit, e.g.
    ``placement.gpu_load(load)[layer]``) rescaled to sum to about ``PRIOR_SCALE``; raises EplbError
    for a wrong shape, negative or non-finite entries, or a zero sum."""
    load = torch.as_tensor(rank_load).detach().to("cpu", torch.float64)
    if load.shape != (ep_size,):
        raise EplbError(f"rank_load has shape {tuple(load.shape)}; pass one load per EP rank, shape ({ep_size},)")
    if not torch.isfinite(load).all() or (load < 0).any():
        raise EplbError("rank_load has negative, NaN or infinite entries; pass non-negative token counts")
    if load.sum() <= 0:
        raise EplbError(
            "rank_load sums to 0 (a dense layer?); pass the recorded loads of an MoE layer, or None to "
            "balance on each batch's own counts"
        )
    return torch.round(load / load.sum() * PRIOR_SCALE).to(torch.int64)


def recorded_loads(prior: torch.Tensor, k: int, prior_tokens: int | None = None) -> torch.Tensor:
    """``[W + 1]`` int64: the recorded rank loads and their shared load, or, with ``prior_tokens``,
    the same scaled to pseudo-counts of that many tokens.

    Args:
        prior: ``[W]`` from :func:`scaled_rank_load`.
        k: the top-k width ``K``.
        prior_tokens: the pseudo-counts' weight in tokens, or None.
    """
    if prior_tokens is not None:
        # prior sums to PRIOR_SCALE; as pseudo-counts it sums to prior_tokens * k entries.
        prior = torch.round(prior.double() * (prior_tokens * k / PRIOR_SCALE)).to(torch.int64)
    # Each token has k routed entries and one shared, so the shared load is the routed total / k.
    return torch.cat([prior, (prior.sum() // k).reshape(1)])


def excess_weights(loads: torch.Tensor, rank: int) -> torch.Tensor:
    """``[W]`` int64 weights that move only the excess of ``rank``'s shared tokens (``move="excess"``).

    Args:
        loads: ``[W + 1]`` int64 expected routed load per rank, then the shared load; every rank
            is assumed to hold ``1 / W`` of the shared tokens.
        rank: the sending rank.

    The balanced end state gives rank ``r`` a shared load equal to its deficit ``d_r`` below the
    water level. A rank whose own share ``s`` is at most ``d_r`` keeps all its tokens (weight on
    itself only); a rank above keeps ``d_r / s`` of them and sends the rest to the ranks with room
    ``c_j = d_j - s > 0``, in proportion to it. So only the excess moves: fewer tokens cross the
    network than when every token samples by deficit, and a rank below the level adds no
    sampling noise to its own load.
    """
    height, count = water_level(loads)
    if count == 0:  # no shared load: nothing to move
        return torch.zeros_like(height)
    d = height.clamp(min=0).double() / count.double()
    share = float(loads[-1]) / d.numel()
    room = (d - share).clamp(min=0)
    if d[rank] >= share or room.sum() <= 0:
        weight = torch.zeros_like(d)
        weight[rank] = 1.0
    else:
        # P(stay) = d_own / s, P(j) = (1 - d_own / s) * c_j / sum(c); times s * sum(c).
        weight = (share - d[rank]) * room
        weight[rank] = d[rank] * room.sum()
    return torch.floor(weight / weight.max() * ((1 << WEIGHT_BITS) - 1)).to(torch.int64)


def recorded_excess(loads: torch.Tensor, ep_size: int) -> torch.Tensor:
    """``[W + 1]`` int64: per rank, the other ranks' expected routed load above the water level,
    per token of this rank's batch, in ``2**-EXCESS_BITS`` entries; the shared load's entry is 0
    (for ``Source.BATCH_OFFSET``).

    Args:
        loads: ``[W + 1]`` int64 recorded routed load per rank, then the shared load (its tokens).
        ep_size: ``W``.

    Why: a rank's final load is the sum over the ``W`` senders of what each routes and sends to
    it, so a sender that evens out its own batch (routed counts plus its shared tokens: SGLang's
    static rule) removes its part of the step's fluctuation, which no recorded aggregate sees.
    What it cannot see is the others' part: a rank above the recorded water level stays above
    it, since the others' shared experts fill only the ranks below (their expected contribution
    is ``max(load, T)`` per token, a constant below the level). Adding the others' excess
    ``(W - 1) * max(load - T, 0)`` (per token, so it scales with the batch) to the batch's counts
    keeps the batch rule's correction of its own fluctuation on the ranks below the level and
    stops it from filling a rank that is only by chance light in this batch but hot overall.
    """
    height, count = water_level(loads)
    if count == 0 or ep_size == 1:  # no shared load, or no other rank
        return torch.zeros_like(loads)
    excess = (-height).clamp(min=0).double() / count.double()
    per_token = excess * ((ep_size - 1) / loads[-1].double())
    return torch.cat([torch.round(per_token * (1 << EXCESS_BITS)).to(torch.int64), loads.new_zeros(1)])


def fixed_rank_tables(loads: torch.Tensor, rule: Rule, move: str) -> torch.Tensor:
    """``[2, W]`` int64 ``reference.rank_tables`` of the fixed ``loads [W + 1]``: weights by
    :func:`excess_weights` (``move="excess"``) or by deficit (``move="all"``)."""
    if move == "excess":
        weights = excess_weights(loads, rule.rank)
    else:
        weights = rank_weights(loads, loads[-1], 0)
    return rank_tables(weights, loads, rule)


def host_input(strategy: Strategy, prior: torch.Tensor, k: int, rule: Rule) -> torch.Tensor:
    """The strategy's host-side input for top-k width ``k`` (on the CPU): ``[W + 1]`` loads or
    excess, or ``[2, W]`` fixed tables (``strategy.host`` must not be ``HostInput.NONE``)."""
    loads = recorded_loads(prior, k, strategy.prior_tokens)
    if strategy.host is HostInput.EXCESS:
        return recorded_excess(loads, rule.ep_size)
    if strategy.host is HostInput.TABLES:
        return fixed_rank_tables(loads, rule, strategy.move)
    return loads
