"""Waterfill in plain torch: the twin of the Triton kernel (its reference, and the path on CPU).

One call (:func:`waterfill_torch`) does what the kernel does in one launch:

1. rank loads: ``loads [W + 1]`` int64, the routed load of each of the ``W`` EP ranks and, last,
   the shared load to spread (tokens), in one unit. ``Source`` says where they come from;
2. rank tables (:func:`rank_tables`): each rank's weight, its share of this rank's shared
   tokens (:func:`rank_weights`) times the local preference, and its fallback key; fixed
   recorded loads give fixed tables instead, built once on the host (``tables``);
3. choose: each token draws the rank of its shared expert among its candidates (its own rank
   plus the ranks it already routes to, or every rank) in proportion to the weights; a per-entry
   hash is the randomness; a token whose candidates all weigh 0 takes the fallback;
4. expand: ``[M, K]`` routed ids and weights become ``[M, K + 1]`` in the expanded layout
   (``eplb.runtime.waterfill.layout``), the shared column last.

Only integer arithmetic decides a destination, so torch, Triton and the Triton interpreter agree
bit for bit. All ops are fixed-shape device ops without host syncs (CUDA-graph capturable).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from eplb.runtime.hashing import UNIFORM_BITS, entry_hash
from eplb.runtime.waterfill.layout import expand_routed_ids, shared_slot

# Rank weights are quantised below 2**WEIGHT_BITS: with a local preference of at most 2**10 / 64
# and at most MAX_EP_SIZE ranks, a token's weight sum times a 24-bit uniform stays inside int64.
WEIGHT_BITS = 12
MAX_EP_SIZE = 1 << 12
# The fallback key of a rank that is no fallback: above every load.
NO_FALLBACK = torch.iinfo(torch.int64).max
# Fixed-point fraction bits of the recorded excess per token (Source.BATCH_OFFSET): it is at most
# K * (W - 1) * 2**EXCESS_BITS, so times a batch's token count it stays far inside int64.
EXCESS_BITS = 16


class Source(IntEnum):
    """Where the rank loads come from."""

    BATCH = 0  # the local batch's own counts, plus fixed pseudo-counts if given (static mode)
    PRIOR = 1  # fixed loads only, e.g. from the placement and recorded statistics (static mode)
    GLOBAL = 2  # counts all-reduced over the EP group this step (dynamic mode)
    BATCH_OFFSET = 3  # the batch's own counts plus the other ranks' recorded excess (static mode)


@dataclass(frozen=True)
class Rule:
    """The settings that decide each token's shared-expert rank (built by ``WaterfillConfig.rule``).

    Attributes:
        ep_size: ``W``, the EP ranks.
        slots_per_rank: ``epr``, routed slots per rank.
        rank: this rank.
        shared_weight: the weight of the shared column, ``1 / routed_scaling_factor``.
        key: the 32-bit hash key of this layer and rank.
        all_ranks: every rank is a candidate (else only the own and the routed-to ranks).
        local_weight, remote_weight: the local preference ``local_weight / remote_weight``.
        min_tile_tokens: a rank expected to get fewer shared tokens than this gets none (0: off).
    """

    ep_size: int
    slots_per_rank: int
    rank: int
    shared_weight: float
    key: int
    all_ranks: bool
    local_weight: int
    remote_weight: int
    min_tile_tokens: int


def local_counts(topk_ids: torch.Tensor, slots_per_rank: int, ep_size: int) -> torch.Tensor:
    """``[W + 1]`` int64: routed entries of this batch per rank, then its tokens with any routed entry.

    Args:
        topk_ids: ``[M, K]`` routed slot ids in ``[0, P)``, negative for padding.
        slots_per_rank: ``epr``.
        ep_size: ``W``.

    A shared token is counted once, in the last entry (not also in a rank's count): all-reduced,
    the vector is the dynamic mode's global loads.
    """
    valid = topk_ids >= 0
    ranks = torch.where(valid, torch.div(topk_ids, slots_per_rank, rounding_mode="floor"), ep_size)
    # scatter_add rather than bincount, which reads the largest id back to the host.
    per_rank = torch.zeros(ep_size + 1, dtype=torch.int64, device=topk_ids.device)
    ones = torch.ones(ranks.numel(), dtype=torch.int64, device=topk_ids.device)
    per_rank.scatter_add_(0, ranks.reshape(-1).long(), ones)
    per_rank = per_rank[:ep_size]
    tokens = valid.any(dim=1).sum().reshape(1)
    return torch.cat([per_rank, tokens])


def water_level(loads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(height [W], count)`` of ``loads [W + 1]`` (routed load per rank, then the shared load):
    ``height = count * (T - load)`` for the water level ``T`` (the level at which
    ``sum_r max(T - load_r, 0)`` equals the shared load ``loads[-1]``); positive below the level
    (a deficit), negative above it (an excess).

    With the loads sorted, the ranks below ``T`` are those whose fill gap
    ``sum_{i: l_i <= l_r} (l_r - l_i)`` is less than the shared load, a prefix; ``count`` of them,
    and ``count * T`` is the shared load plus their loads. In sorted order the gap of position
    ``p`` is ``(p + 1) * l_p`` minus the prefix sum (tied loads get the same gap). Integers only;
    the height is scaled by ``count`` so that it stays an integer.
    """
    load, shared = loads[:-1], loads[-1]
    ordered = load.sort().values
    gap = torch.arange(1, load.numel() + 1, device=load.device) * ordered - ordered.cumsum(0)
    top_wet = torch.where(gap < shared, ordered, -1).max()
    wet = load <= top_wet
    count, level = wet.sum(), shared + torch.where(wet, load, 0).sum()
    return level - load * count, count


def rank_weights(loads: torch.Tensor, tokens_this_step: torch.Tensor, min_tile_tokens: int) -> torch.Tensor:
    """``[W]`` int64 weights proportional to each rank's deficit below the water level (SGLang's
    rule: every token samples its rank in proportion to them).

    Args:
        loads: ``[W + 1]`` int64 routed load per rank, then the shared load, in one unit.
        tokens_this_step: 0-d int64, the shared tokens of this step over all ranks (exact or
            estimated), which turns a share into a token count for the tile rule.
        min_tile_tokens: ranks whose share is fewer tokens than this get weight 0, except the
            largest, so their few tokens join fuller GEMM tiles elsewhere (0: off).
    """
    deficit = water_level(loads)[0].clamp(min=0)
    weight = deficit // ((deficit.max() >> WEIGHT_BITS) + 1)
    keep = (weight * tokens_this_step >= min_tile_tokens * weight.sum()) | (weight == weight.max())
    return torch.where(keep, weight, 0)


def rank_tables(weights: torch.Tensor, loads: torch.Tensor, rule: Rule) -> torch.Tensor:
    """``[2, W]`` int64: per rank, the draw weight and the fallback key.

    Args:
        weights: ``[W]`` int64 from :func:`rank_weights` or ``tables.excess_weights``.
        loads: ``[W + 1]`` int64 rank loads (the fallback compares them).
        rule: the settings.

    Row 0 is the weight times the local preference (``local_weight`` for the own rank,
    ``remote_weight`` for the others). Row 1 ranks the fallbacks of a token whose candidates all
    weigh 0: an other rank whose load is below the own rank's by the local preference has its
    load as key (the least-loaded such candidate wins, ties by rank), every other rank
    ``NO_FALLBACK``.
    """
    load = loads[:-1]
    own = torch.arange(rule.ep_size, device=load.device) == rule.rank
    drawn = weights * torch.where(own, rule.local_weight, rule.remote_weight)
    lower = ~own & (load * rule.local_weight < load[rule.rank] * rule.remote_weight)
    return torch.stack([drawn, torch.where(lower, load, NO_FALLBACK)])


def choose_shared_rank(topk_ids: torch.Tensor, tables: torch.Tensor, rule: Rule) -> torch.Tensor:
    """``[M]`` int64: the rank that runs each token's shared expert.

    Args:
        topk_ids: ``[M, K]`` routed slot ids, negative for padding.
        tables: ``[2, W]`` int64 from :func:`rank_tables`.
        rule: the settings.

    ``candidates="routed"``: the candidates are the own rank, then the ranks of the token's
    routed entries in top-k order, each counted once. A weighted reservoir draw (Chao's) walks
    them in that order: candidate ``k`` replaces the current choice when the 24-bit hash of entry
    ``(m, k)`` is below ``w_k / (w_own + ... + w_k)``, which picks each with probability ``w_k /
    total``; the last candidate that replaces wins, so the draw is a prefix sum over ``K``
    columns, whatever ``W``.
    ``candidates="all"``: the 24-bit hash of entry ``(m, 0)`` picks a rank by inverse CDF over
    all ranks in rank order. A token whose candidates all weigh 0 takes the other candidate with
    the smallest fallback key (ties: the lowest rank), or stays on its own rank when none has one.
    """
    m, k = topk_ids.shape
    weight, fallback_key = tables
    uniform = entry_hash(m * k, rule.key, topk_ids.device).view(m, k) >> (32 - UNIFORM_BITS)
    if rule.all_ranks:
        cumulative = weight.cumsum(0)
        total = cumulative[-1].expand(m)
        drawn = (cumulative <= (uniform[:, :1] * total.unsqueeze(1) >> UNIFORM_BITS)).sum(1)
        least = fallback_key.min()
        fallback_rank = torch.where(fallback_key == least, torch.arange(rule.ep_size, device=weight.device),
                                    rule.ep_size).min().expand(m)
        least = least.expand(m)
    else:
        ranks = torch.where(topk_ids >= 0, torch.div(topk_ids, rule.slots_per_rank, rounding_mode="floor"), -1).long()
        repeated = (ranks.unsqueeze(2) == ranks.unsqueeze(1)).tril(-1).any(2)  # equals an earlier column
        new = (ranks >= 0) & (ranks != rule.rank) & ~repeated
        safe = ranks.clamp(min=0)
        w_k = torch.where(new, weight[safe], 0)
        prefix = weight[rule.rank] + w_k.cumsum(1)
        replaces = uniform * prefix < (w_k << UNIFORM_BITS)
        last = torch.where(replaces, torch.arange(k, device=ranks.device), -1).max(1).values
        drawn = torch.where(last >= 0, ranks.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1), rule.rank)
        total = prefix[:, -1]
        key = torch.where(new, fallback_key[safe], NO_FALLBACK)
        least = key.min(1, keepdim=True).values
        fallback_rank = torch.where(key == least, ranks, rule.ep_size).min(1).values
        least = least.squeeze(1)
    fallback = torch.where(least < NO_FALLBACK, fallback_rank, rule.rank)
    return torch.where(total > 0, drawn, fallback)


def expand(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, dest: torch.Tensor | int, rule: Rule
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the expanded top-k.

    Args:
        topk_ids: ``[M, K]`` routed slot ids, negative for padding.
        topk_weights: ``[M, K]`` floating routed weights.
        dest: ``[M]`` shared-expert rank per token, or one rank for all.
        rule: the settings.

    Returns:
        ``ids [M, K + 1]`` (dtype of ``topk_ids``) and ``weights [M, K + 1]`` (dtype of
        ``topk_weights``). Routed ids move to ``p + p // epr``; a padded entry keeps its id and gets
        weight 0. The last column is the chosen rank's shared slot with weight ``shared_weight``,
        or ``-1`` with weight 0 for a token without any routed entry.
    """
    valid = topk_ids >= 0
    has_valid = valid.any(dim=1, keepdim=True)
    if isinstance(dest, int):  # a fill, not a host-to-device copy: allowed in CUDA-graph capture
        dest = torch.full((1,), dest, dtype=torch.int64, device=topk_ids.device)
    shared = torch.where(has_valid, shared_slot(dest, rule.slots_per_rank).reshape(-1, 1), -1)
    ids = torch.cat([expand_routed_ids(topk_ids, rule.slots_per_rank), shared.to(topk_ids.dtype)], dim=1)
    routed_w = torch.where(valid, topk_weights, 0)
    # masked_fill rounds the Python float straight to the weights' dtype, as the kernel's store does.
    shared_w = torch.zeros_like(topk_weights[:, :1]).masked_fill(has_valid, rule.shared_weight)
    return ids, torch.cat([routed_w, shared_w], dim=1)


def waterfill_torch(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    loads: torch.Tensor | None,
    source: Source,
    rule: Rule,
    tables: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count, choose and expand (see the module docstring).

    Args:
        topk_ids, topk_weights: ``[M, K]``.
        loads: ``[W + 1]`` int64 rank loads on the ids' device. ``BATCH`` adds them to the batch's
            own counts (pseudo-counts of a prior; ``None``: the batch alone); ``BATCH_OFFSET``
            adds them times the batch's token count, shifted right by ``EXCESS_BITS``
            (``tables.recorded_excess``).
        source: where the loads come from; ``GLOBAL`` loads also give the exact step token count,
            the others estimate it as the local tokens times ``W``.
        rule: the settings.
        tables: ``[2, W]`` fixed :func:`rank_tables` (then ``loads`` is unused), or ``None`` to
            build them from this step's loads with :func:`rank_weights`.
    """
    if tables is None:
        counts = local_counts(topk_ids, rule.slots_per_rank, rule.ep_size)
        if source == Source.BATCH:
            loads = counts if loads is None else counts + loads
        elif source == Source.BATCH_OFFSET:
            loads = counts + ((loads * counts[-1]) >> EXCESS_BITS)
        tokens = loads[-1] if source == Source.GLOBAL else counts[-1] * rule.ep_size
        tables = rank_tables(rank_weights(loads, tokens, rule.min_tile_tokens), loads, rule)
    dest = choose_shared_rank(topk_ids, tables, rule)
    return expand(topk_ids, topk_weights, dest, rule)
