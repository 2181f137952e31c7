"""Waterfill in plain torch: the reference for the Triton kernel and the path on CPU.

One call does what the kernel does in one launch:

1. rank loads: ``loads [W + 1]`` int64, the routed load of each of the ``W`` EP ranks and, last,
   the shared load to spread (tokens), in one unit. ``Source`` says where they come from;
2. rank weights: each rank's deficit below the water level ``T`` (the level at which
   ``sum_r max(T - load_r, 0)`` equals the shared load), quantised to integers;
3. choose: each token samples the rank of its shared expert among its candidates (its own rank
   plus the ranks it already routes to, or every rank), in proportion to the weights, with a
   preference for its own rank; a per-token hash is the randomness;
4. expand: ``[M, K]`` routed ids and weights become ``[M, K + 1]`` in the expanded layout
   (``eplb.waterfill.layout``), the shared column last.

Only integer arithmetic decides a destination, so torch, Triton and the Triton interpreter agree
bit for bit. All ops are fixed-shape device ops without host syncs (CUDA-graph capturable).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from eplb.dispatch.hashing import UNIFORM_BITS, entry_hash
from eplb.waterfill.layout import expand_routed_ids, shared_slot

# Rank weights are quantised below 2**WEIGHT_BITS: with a local preference of at most 2**10 / 64
# and at most MAX_EP_SIZE ranks, a token's weight sum times a 24-bit uniform stays inside int64.
WEIGHT_BITS = 12
# Above every real load: marks a rank that is no fallback candidate.
NO_RANK_LOAD = 1 << 62
MAX_EP_SIZE = 1 << 16


class Source(IntEnum):
    """Where the rank loads come from."""

    BATCH = 0  # the local batch's own counts, plus fixed pseudo-counts if given (static mode)
    PRIOR = 1  # fixed loads only, e.g. from the placement and recorded statistics (static mode)
    GLOBAL = 2  # counts all-reduced over the EP group this step (dynamic mode)


@dataclass(frozen=True)
class Rule:
    """The settings that decide each token's shared-expert rank (validated by WaterfillBalancer).

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


def rank_weights(loads: torch.Tensor, tokens_this_step: torch.Tensor, min_tile_tokens: int) -> torch.Tensor:
    """``[W]`` int64 weights proportional to each rank's share of the shared load.

    Args:
        loads: ``[W + 1]`` int64 routed load per rank, then the shared load, in one unit.
        tokens_this_step: 0-d int64, the shared tokens of this step over all ranks (exact or
            estimated), which turns a share into a token count for the tile rule.
        min_tile_tokens: ranks whose share is fewer tokens than this get weight 0, except the
            largest, so their few tokens join fuller GEMM tiles elsewhere (0: off).

    Rank ``r``'s share is ``max(T - load_r, 0)`` for the water level ``T``. With the loads sorted,
    the ranks below ``T`` are those whose fill gap ``sum_{i: l_i <= l_r} (l_r - l_i)`` is less
    than the shared load, a prefix; ``T`` is the mean of their loads plus the shared load. This
    finds ``T`` with integers only and O(W**2) compares (no sort, as in the kernel).
    """
    load, shared = loads[:-1], loads[-1]
    below_or_equal = load.unsqueeze(0) <= load.unsqueeze(1)  # [j, i]: l_i <= l_j
    gap = torch.where(below_or_equal, load.unsqueeze(1) - load.unsqueeze(0), 0).sum(1)
    top_wet = torch.where(gap < shared, load, -1).max()
    wet = load <= top_wet
    # deficit * count, so that the level stays an integer: count * T = shared + sum of wet loads.
    count, level = wet.sum(), shared + torch.where(wet, load, 0).sum()
    deficit = (level - load * count).clamp(min=0)
    weight = deficit // ((deficit.max() >> WEIGHT_BITS) + 1)
    keep = (weight * tokens_this_step >= min_tile_tokens * weight.sum()) | (weight == weight.max())
    return torch.where(keep, weight, 0)


def choose_shared_rank(topk_ids: torch.Tensor, loads: torch.Tensor, weights: torch.Tensor, rule: Rule) -> torch.Tensor:
    """``[M]`` int64: the rank that runs each token's shared expert.

    Args:
        topk_ids: ``[M, K]`` routed slot ids, negative for padding.
        loads: ``[W + 1]`` int64 rank loads (the fallback compares them).
        weights: ``[W]`` int64 from :func:`rank_weights`.
        rule: the settings.

    A token draws a candidate with probability proportional to its weight (the own rank's
    weight scaled by the local preference). If all its candidates weigh 0 (all at or above the
    water level), it takes the least-loaded other candidate when that one is lower than the own
    rank's load by the local preference, else its own rank.
    """
    m, w, rank = topk_ids.shape[0], rule.ep_size, rule.rank
    device = topk_ids.device
    ranks = torch.arange(w, device=device)
    if rule.all_ranks:
        cand = torch.ones(m, w, dtype=torch.bool, device=device)
    else:
        routed = torch.where(topk_ids >= 0, torch.div(topk_ids, rule.slots_per_rank, rounding_mode="floor"), w).long()
        cand = torch.zeros(m, w + 1, dtype=torch.bool, device=device).scatter_(1, routed, True)[:, :w]
        cand[:, rank] = True
    pref = torch.where(ranks == rank, rule.local_weight, rule.remote_weight)
    w_tok = torch.where(cand, weights * pref, 0)
    total = w_tok.sum(1)
    u = (entry_hash(m, rule.key, device) >> (32 - UNIFORM_BITS)) * total >> UNIFORM_BITS
    drawn = (w_tok.cumsum(1) <= u.unsqueeze(1)).sum(1)

    load = loads[:-1]
    other = torch.where(cand & (ranks != rank), load, NO_RANK_LOAD)
    least = other.argmin(1)
    least_load = other.gather(1, least.unsqueeze(1)).squeeze(1)
    lower = (least_load < NO_RANK_LOAD) & (
        torch.where(least_load < NO_RANK_LOAD, least_load, 0) * rule.local_weight < load[rank] * rule.remote_weight
    )
    fallback = torch.where(lower, least, rank)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count, choose and expand (see the module docstring).

    Args:
        topk_ids, topk_weights: ``[M, K]``.
        loads: ``[W + 1]`` int64 rank loads on the ids' device. ``BATCH`` adds them to the batch's
            own counts (pseudo-counts of a prior; ``None``: the batch alone).
        source: where the loads come from; ``GLOBAL`` loads also give the exact step token count,
            the others estimate it as the local tokens times ``W``.
        rule: the settings.
    """
    counts = local_counts(topk_ids, rule.slots_per_rank, rule.ep_size)
    if source == Source.BATCH:
        loads = counts if loads is None else counts + loads
    tokens = loads[-1] if source == Source.GLOBAL else counts[-1] * rule.ep_size
    weights = rank_weights(loads, tokens, rule.min_tile_tokens)
    dest = choose_shared_rank(topk_ids, loads, weights, rule)
    return expand(topk_ids, topk_weights, dest, rule)
