"""eplb's own placement engine (algorithm ``"eplb"``).

Each step is vectorised over layers:

1. **Load profile.** The history ``[T, L, E]`` becomes per-expert load shares: a
   recency-weighted mean ``mu`` and a ``spread`` ``[L, E, K]`` whose outer product is the
   covariance of the shares over the windows (``K <= 16`` principal directions).
2. **Hedged replica counts.** Water-filling on ``mu + risk * sd`` (``sd`` = an expert's
   standard deviation): each extra slot goes to the expert whose replica is heaviest, which
   minimises the heaviest replica exactly.
3. **Nodes** (``N > 1``): replicas are dealt to nodes, heaviest first, each to the lightest
   node with room that holds no replica of its expert yet (so more nodes serve every
   replicated expert locally). With router groups, the first replica of some experts is pinned
   to its group's home node (``EngineConfig.locality``), so tokens touch fewer nodes.
4. **Duplicate-free packing** of each node's replicas on its GPUs: rounds of one replica per
   GPU, heaviest replica to the lightest GPU, so every GPU gets exactly ``P / G``; a GPU never
   holds two replicas of one expert (a wasted slot) unless ``P / G > E`` forces it.
5. **Local search**: parallel pairwise swaps (heaviest GPU with lightest, and so on), then
   swaps of the heaviest GPU with any other, while the peak planned load falls.

A GPU's planned load is ``sum mu + risk * sd`` of the replicas it holds, where ``sd`` is the
standard deviation of their summed share over the windows: correlated experts are spread,
anti-correlated ones may share a GPU. With one window (or ``risk = 0``) it is the plain load,
and the engine is a tight in-sample balancer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from eplb.algorithms import deepseek
from eplb.algorithms.base import Algorithm, PlanSpec
from eplb.errors import EplbError

# Principal directions of the load shift kept per layer: bounds the cost of a long history
# while keeping nearly all of its variance (window-to-window shifts are low rank).
_MAX_RANK = 16
# A swap must lower a load by more than this relative amount, so float noise cannot cycle.
_EPS = 1e-12


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of the ``eplb`` engine; the defaults are principled, not fitted to any data set.

    Attributes:
        risk: how many standard deviations of the load shift between windows to plan for
            (``0``: plan for the weighted mean only). One standard deviation is the usual
            one-sided margin for a quantity estimated from a handful of windows. Without a
            history (one window) it has no effect.
        half_life: the age, in windows, at which a window's weight halves (recent windows
            weigh more); ``math.inf`` weighs every window equally.
        locality: with router groups (``num_groups``) and several nodes, the share of each
            node's fair load that may be pinned to the experts of the groups it hosts: their
            first replica stays on that node, so a token's picks within a group touch one
            node (see ``eplb.traffic``). ``0`` is pure balance.
    """

    risk: float = 1.0
    half_life: float = 8.0
    locality: float = 0.25

    def __post_init__(self) -> None:
        if not _is_number(self.risk) or not math.isfinite(self.risk) or self.risk < 0:
            raise EplbError(f"risk must be a finite number >= 0, got {self.risk!r}; use e.g. 1.0 (0 plans for the mean)")
        if not _is_number(self.half_life) or math.isnan(self.half_life) or self.half_life <= 0:
            raise EplbError(
                f"half_life must be a number of windows > 0 (math.inf weighs windows equally), got {self.half_life!r}"
            )
        if not _is_number(self.locality) or not 0 <= self.locality <= 1:
            raise EplbError(f"locality must be a number in [0, 1] (0 = pure balance), got {self.locality!r}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# Load profile and replica counts ------------------------------------------------------------


def load_profile(load: torch.Tensor, half_life: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Recency-weighted mean and covariance of each expert's share of its layer's load.

    Each window is normalised to shares first, so a long window does not outweigh a short one:
    every window is one sample of how the load splits over experts.

    Args:
        load: ``[T, L, E]`` non-negative loads, oldest window first.
        half_life: the age, in windows, at which a window's weight halves.

    Returns:
        ``(mean, spread)``: ``mean [L, E]`` float64, each row summing to 1 (a layer without any
        load gets a uniform mean); ``spread [L, E, K]`` with ``spread @ spread.T`` the unbiased
        weighted covariance of the shares, truncated to its ``K <= 16`` largest directions
        (``K = 0`` for a single window). Windows without load in a layer are left out there.
    """
    num_windows, num_layers, num_experts = load.shape
    total = load.sum(-1)  # [T, L]
    share = load / torch.where(total > 0, total, 1.0).unsqueeze(-1)
    age = torch.arange(num_windows - 1, -1, -1, dtype=torch.float64)
    weight = (0.5 ** (age / half_life)).unsqueeze(1) * (total > 0)  # [T, L]
    wsum = weight.sum(0)
    weight = weight / torch.where(wsum > 0, wsum, 1.0)
    mean = (weight.unsqueeze(-1) * share).sum(0)
    mean = torch.where((wsum > 0).unsqueeze(-1), mean, 1.0 / num_experts)
    if num_windows == 1:
        return mean, torch.zeros(num_layers, num_experts, 0, dtype=torch.float64)
    # Reliability weights: the unbiased variance divides by 1 - sum w^2 (T - 1 of T if equal).
    w2 = (weight**2).sum(0)
    scale = (weight / (1 - w2).clamp(min=1e-12)).sqrt() * (w2 < 1 - 1e-12)  # [T, L]
    centred = (scale.unsqueeze(-1) * (share - mean)).transpose(0, 1)  # [L, T, E]
    _, sing, vh = torch.linalg.svd(centred, full_matrices=False)
    # Directions at float-noise level are no shift (identical windows give exactly none).
    sing = torch.where(sing > 1e-12, sing, 0.0)
    rank = min(_MAX_RANK, int((sing > 0).sum(-1).max()))
    spread = (sing[:, :rank].unsqueeze(-1) * vh[:, :rank]).transpose(1, 2)  # [L, E, K]
    return mean, spread.contiguous()


def replica_counts(weight: torch.Tensor, num_slots: int, max_replicas: int) -> torch.Tensor:
    """Replicas per logical expert that minimise the heaviest replica ``max_e weight_e / c_e``.

    This is the greedy "next slot to the expert with the heaviest replica", found at once: the
    lowest threshold ``t`` whose counts ``clamp(ceil(w / t), 1, max_replicas)`` fit in the slots
    is bisected, then the few slots left (experts tied at ``t``) go to the heaviest replicas.

    Args:
        weight: ``[L, E]`` non-negative planning load of each logical expert.
        num_slots: ``P``, with ``E <= P <= E * max_replicas``.
        max_replicas: the most replicas one expert may get (``G`` keeps one per GPU).

    Returns:
        logcnt ``[L, E]`` int64, each row summing to ``P``.
    """
    num_experts = weight.shape[1]
    hi = weight.max(dim=1, keepdim=True).values.clamp(min=1e-300)
    lo = torch.zeros_like(hi)

    def fill(t: torch.Tensor) -> torch.Tensor:
        return torch.ceil(weight / t).clamp(1, max_replicas)

    for _ in range(64):  # 64 halvings pin the threshold to float precision
        mid = (lo + hi) / 2
        fits = fill(mid).sum(1, keepdim=True) <= num_slots
        hi = torch.where(fits, mid, hi)
        lo = torch.where(fits, lo, mid)
    counts = fill(hi)
    left = num_slots - counts.sum(1, keepdim=True)  # [L, 1]
    relief = torch.where(counts < max_replicas, weight / counts, -1.0)
    order = torch.sort(relief, dim=1, descending=True, stable=True).indices
    gets_one = torch.arange(num_experts).unsqueeze(0) < left
    counts.scatter_add_(1, order, gets_one.to(counts.dtype))
    return counts.to(torch.int64)


def forced_duplicates(num_experts: int, spec: PlanSpec) -> int:
    """Replicas per layer that must share a GPU with another replica of their expert.

    A GPU with ``S = P / G`` slots holds at most ``E`` distinct experts, so ``S > E`` forces
    ``S - E`` duplicates on every GPU (the engine may then place a few more, allowing up to
    ``ceil(S / E)`` replicas of an expert per GPU); otherwise the engine places none.
    """
    return spec.num_gpus * max(0, spec.slots_per_gpu - num_experts)


# Packing state ---------------------------------------------------------------------------------


@dataclass
class _Bins:
    """A batch of packings: ``B`` rows of ``G`` bins (GPUs) with ``S`` slots each.

    Slot ``p`` of a row lies in bin ``p // S``. ``limit`` is how many replicas of one expert a
    bin may hold. A replica carries its mean load ``mu`` and its shift ``dev`` (a ``K``-vector
    whose dot products give covariances); a bin's planned load is
    ``sum mu + risk * |sum dev|``.
    """

    expert: torch.Tensor  # [B, G*S] logical expert in each slot
    mu: torch.Tensor  # [B, G*S]
    dev: torch.Tensor  # [B, G*S, K]
    bin_mu: torch.Tensor  # [B, G]
    bin_dev: torch.Tensor  # [B, G, K]
    held: torch.Tensor  # [B, G, E] replicas of each expert in each bin
    slots_per_bin: int
    limit: int
    risk: float
    # With nodes: [B, G*S] bool, replicas that must stay on their node, and bins per node.
    fixed: Optional[torch.Tensor] = None
    bins_per_node: int = 1

    @property
    def num_bins(self) -> int:
        return self.bin_mu.shape[1]

    def load(self, rows: torch.Tensor) -> torch.Tensor:
        """``[R, G]`` planned load of every bin of ``rows``."""
        if self.risk == 0:
            return self.bin_mu[rows]
        return self.bin_mu[rows] + self.risk * self.bin_dev[rows].norm(dim=-1)


def _deal(expert: torch.Tensor, mu: torch.Tensor, dev: torch.Tensor, num_bins: int, num_experts: int,
          limit: int, risk: float, fixed: Optional[torch.Tensor] = None) -> _Bins:
    """Deal ``[B, K]`` replicas to ``num_bins`` bins of ``K / num_bins`` slots each.

    ``fixed`` (``[B, K]`` bool, optional) travels with the replicas (see ``_Bins.fixed``); all
    bins of a row are then taken to be on one node.

    Replicas go in rounds of one per bin, the heaviest remaining to the lightest bin, so bins
    fill evenly (the cardinality-constrained form of LPT). A round never gives a bin two
    replicas of one expert; only an expert whose replicas straddle two rounds can, and
    :func:`_repair` moves those.
    """
    batch, num_items = expert.shape
    slots = num_items // num_bins
    if dev.shape[-1] == 0 or risk == 0:
        risk, dev = 0.0, dev[..., :0]  # nothing to hedge: skip the norms
    rank = dev.shape[-1]
    bins = _Bins(
        expert=torch.empty_like(expert), mu=torch.empty_like(mu), dev=torch.empty_like(dev),
        bin_mu=torch.zeros(batch, num_bins, dtype=torch.float64),
        bin_dev=torch.zeros(batch, num_bins, rank, dtype=torch.float64),
        held=torch.zeros(batch, num_bins, num_experts, dtype=torch.int64),
        slots_per_bin=slots, limit=limit, risk=risk,
        fixed=None if fixed is None else torch.empty_like(fixed), bins_per_node=num_bins,
    )
    # Stable: the replicas of one expert stay together, so at most one expert straddles rounds.
    order = torch.sort(mu + risk * dev.norm(dim=-1), dim=1, descending=True, stable=True).indices
    expert, mu = expert.gather(1, order), mu.gather(1, order)
    dev = dev.gather(1, order.unsqueeze(-1).expand(-1, -1, rank))
    if fixed is not None:
        fixed = fixed.gather(1, order)
    base = torch.arange(num_bins) * slots
    all_rows = torch.arange(batch)
    for r in range(slots):
        cut = slice(r * num_bins, (r + 1) * num_bins)
        lightest = torch.sort(bins.load(all_rows), dim=1, stable=True).indices
        slot = base[lightest] + r
        bins.expert.scatter_(1, slot, expert[:, cut])
        bins.mu.scatter_(1, slot, mu[:, cut])
        if fixed is not None:
            bins.fixed.scatter_(1, slot, fixed[:, cut])
        bins.dev.scatter_(1, slot.unsqueeze(-1).expand(-1, -1, rank), dev[:, cut])
        bins.bin_mu.scatter_add_(1, lightest, mu[:, cut])
        bins.bin_dev.scatter_add_(1, lightest.unsqueeze(-1).expand(-1, -1, rank), dev[:, cut])
        flat = lightest * num_experts + expert[:, cut]
        bins.held.view(batch, -1).scatter_add_(1, flat, torch.ones_like(flat))
    return bins


# Swaps ---------------------------------------------------------------------------------------


def _pair_costs(bins: _Bins, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                movable: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Planned load of the heavier bin after each swap between bins ``a`` and ``b``.

    Args:
        bins: the packing.
        rows: ``[R]`` the rows to search.
        a, b: ``[R, M]`` bin pairs.
        movable: ``[R, M, S]`` bool, which slots of ``a`` may give their replica (all, if None).

    Returns:
        ``[R, M, S, S]``: entry ``(x, y)`` for swapping slot ``x`` of ``a`` with slot ``y`` of
        ``b``; ``inf`` where ``a == b`` or the swap would put more than ``limit`` replicas of
        an expert in one bin.
    """
    s = bins.slots_per_bin
    num_rows, num_pairs = a.shape
    num_bins, num_experts = bins.held.shape[1:]
    col, row = (num_rows, num_pairs, s, 1), (num_rows, num_pairs, 1, s)
    slot_a = (a.unsqueeze(2) * s + torch.arange(s)).flatten(1)  # [R, M*S]
    slot_b = (b.unsqueeze(2) * s + torch.arange(s)).flatten(1)
    expert, mu = bins.expert[rows], bins.mu[rows]
    e_a, e_b = expert.gather(1, slot_a), expert.gather(1, slot_b)
    # Can bin b take e_a, can bin a take e_b: held[row, bin, expert] from the flat table.
    held = bins.held.view(-1)
    base = (rows * (num_bins * num_experts)).unsqueeze(1)
    into_b = base + b.repeat_interleave(s, dim=1) * num_experts + e_a
    into_a = base + a.repeat_interleave(s, dim=1) * num_experts + e_b
    stuck_a = held.index_select(0, into_b.flatten()).view_as(e_a) >= bins.limit
    stuck_b = held.index_select(0, into_a.flatten()).view_as(e_b) >= bins.limit
    stuck_a |= (a == b).repeat_interleave(s, dim=1)
    if bins.fixed is not None:
        cross = (a // bins.bins_per_node != b // bins.bins_per_node).repeat_interleave(s, dim=1)
        fixed = bins.fixed[rows]
        stuck_a |= cross & fixed.gather(1, slot_a)
        stuck_b |= cross & fixed.gather(1, slot_b)
    if movable is not None:
        stuck_a |= ~movable.flatten(1)
    # A forbidden swap gets gain +inf (a source load of -inf or a target load of +inf): bin a
    # ends at inf and bin b at -inf, so the larger is inf; the big tensor is never masked.
    mu_x = mu.gather(1, slot_a).masked_fill(stuck_a, -torch.inf).view(col)
    mu_y = mu.gather(1, slot_b).masked_fill(stuck_b, torch.inf).view(row)
    gain = mu_y - mu_x  # [R, M, S, S]: what bin a gains and bin b loses
    bin_mu = bins.bin_mu[rows]
    new_a = bin_mu.gather(1, a)[..., None, None] + gain
    new_b = bin_mu.gather(1, b)[..., None, None] - gain
    if bins.risk > 0:
        new_a += bins.risk * _new_sd(bins, rows, a, slot_a, slot_b, col, row, sign=1.0)
        new_b += bins.risk * _new_sd(bins, rows, b, slot_a, slot_b, col, row, sign=-1.0)
    cost = torch.maximum(new_a, new_b)
    if bins.limit > 1:
        # Two replicas of one expert: a no-op swap (with limit 1, held already forbids it).
        cost.masked_fill_(e_a.view(col) == e_b.view(row), torch.inf)
    return cost


def _new_sd(bins: _Bins, rows, bin_, slot_a, slot_b, col, row, sign: float) -> torch.Tensor:
    """``[R, M, S, S]`` standard deviation of bin ``bin_`` after each swap.

    The bin's shift becomes ``D + sign * (y - x)``; its squared norm expands into small dot
    products and one batched matrix product ``x . y``, so no ``[R, M, S, S, K]`` tensor is built.
    """
    dev = bins.dev[rows]
    rank = dev.shape[-1]
    x = dev.gather(1, slot_a.unsqueeze(-1).expand(-1, -1, rank)).view(*col[:3], rank)
    y = dev.gather(1, slot_b.unsqueeze(-1).expand(-1, -1, rank)).view(*col[:3], rank)
    d = bins.bin_dev[rows].gather(1, bin_.unsqueeze(-1).expand(-1, -1, rank)).unsqueeze(2)  # [R, M, 1, K]
    linear = (2 * sign) * ((y * d).sum(-1).view(row) - (x * d).sum(-1).view(col))
    square = (x * x).sum(-1).view(col) + (y * y).sum(-1).view(row) - 2 * x @ y.transpose(-1, -2)
    return ((d * d).sum(-1).unsqueeze(-1) + linear + square).clamp(min=0).sqrt()


def _pair_argmin(cost: torch.Tensor):
    """``[R, M, S, S]`` -> the best ``(cost, x, y)`` per pair, each ``[R, M]``.

    Reduced in two steps (values first, then one short row): a ``min`` with indices is several
    times slower than ``amin`` on CPU.
    """
    per_x = cost.amin(dim=3)  # [R, M, S]
    best = per_x.amin(dim=2)
    x = (per_x == best.unsqueeze(2)).to(torch.uint8).argmax(dim=2)
    line = cost.gather(2, x[..., None, None].expand(-1, -1, 1, cost.shape[3])).squeeze(2)
    y = (line == best.unsqueeze(2)).to(torch.uint8).argmax(dim=2)
    return best, x, y


def _best_swap(bins: _Bins, rows: torch.Tensor, src_bin: torch.Tensor, movable: Optional[torch.Tensor] = None):
    """The best swap of a replica of bin ``src_bin`` (``[R]``) with one of any other bin.

    ``movable`` (``[R, S]`` bool) limits the slots of ``src_bin`` that may give their replica.
    Returns ``(cost [R], i [R], j [R])``: the heavier bin's planned load after swapping slots
    ``i`` and ``j``, ``inf`` where no swap is allowed.
    """
    s = bins.slots_per_bin
    a = src_bin.unsqueeze(1).expand(-1, bins.num_bins)
    b = torch.arange(bins.num_bins).expand_as(a)
    if movable is not None:
        movable = movable.unsqueeze(1).expand(-1, bins.num_bins, -1)
    best, x, y = _pair_argmin(_pair_costs(bins, rows, a, b, movable))
    top = best.argmin(dim=1, keepdim=True)
    return (best.gather(1, top).squeeze(1), src_bin * s + x.gather(1, top).squeeze(1),
            top.squeeze(1) * s + y.gather(1, top).squeeze(1))


def _swap(bins: _Bins, rows: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> None:
    """Exchange the replicas in slots ``i`` and ``j`` of ``rows`` (all ``[R]``), in place.

    A row may repeat as long as no bin appears in two of its swaps.
    """
    s = bins.slots_per_bin
    num_slots = bins.expert.shape[1]
    num_bins, num_experts = bins.held.shape[1:]
    flat_i, flat_j = rows * num_slots + i, rows * num_slots + j
    both, flipped = torch.cat([flat_i, flat_j]), torch.cat([flat_j, flat_i])
    e_i, e_j = bins.expert.view(-1)[flat_i], bins.expert.view(-1)[flat_j]
    mu, dev = bins.mu.view(-1), bins.dev.flatten(0, 1)
    d_mu, d_dev = mu[flat_j] - mu[flat_i], dev[flat_j] - dev[flat_i]  # what bin i // s gains
    for t in (bins.expert.view(-1), mu, dev) + (() if bins.fixed is None else (bins.fixed.view(-1),)):
        t[both] = t[flipped]
    ends = torch.cat([rows * num_bins + i // s, rows * num_bins + j // s])
    bins.bin_mu.view(-1).index_add_(0, ends, torch.cat([d_mu, -d_mu]))
    bins.bin_dev.flatten(0, 1).index_add_(0, ends, torch.cat([d_dev, -d_dev]))
    bin_a, bin_b = ends.chunk(2)
    moves = torch.cat([bin_a * num_experts + e_i, bin_a * num_experts + e_j,
                       bin_b * num_experts + e_j, bin_b * num_experts + e_i])
    step = torch.tensor([-1, 1, -1, 1]).repeat_interleave(len(rows))
    bins.held.view(-1).index_add_(0, moves, step)


def _repair(bins: _Bins) -> None:
    """Move replicas out of bins holding more than ``limit`` of their expert, one per row per pass."""
    s = bins.slots_per_bin
    batch, num_slots = bins.expert.shape
    num_experts = bins.held.shape[-1]
    slot_bin = torch.arange(num_slots) // s
    for _ in range(num_slots):
        count = bins.held.view(batch, -1).gather(1, slot_bin * num_experts + bins.expert)
        over = count > bins.limit
        rows = over.any(1).nonzero().squeeze(1)
        if len(rows) == 0:
            return
        src = over[rows].to(torch.uint8).argmax(1) // s
        own = over[rows].view(len(rows), -1, s).gather(1, src.view(-1, 1, 1).expand(-1, 1, s)).squeeze(1)
        cost, i, j = _best_swap(bins, rows, src, own)
        movable = torch.isfinite(cost)
        if not movable.any():
            return  # nothing can move: the sizes force the duplicate
        _swap(bins, rows[movable], i[movable], j[movable])


def _pair_step(bins: _Bins, rows: torch.Tensor) -> torch.Tensor:
    """One parallel round of pairwise exchange; returns ``[R]`` bool, whether a row's peak fell.

    Bins are paired heaviest with lightest, second heaviest with second lightest, and so on;
    each pair makes its best swap if that lowers the pair's heavier bin. Pairs share no bin,
    so all their swaps apply at once and no bin's planned load rises above the old peak.
    """
    s = bins.slots_per_bin
    half = bins.num_bins // 2
    load = bins.load(rows)
    order = torch.sort(load, dim=1, descending=True, stable=True).indices
    heavy, light = order[:, :half], order.flip(1)[:, :half]  # [R, H]
    best, x, y = _pair_argmin(_pair_costs(bins, rows, heavy, light))
    better = best < load.gather(1, heavy) * (1 - _EPS)
    r, h = better.nonzero(as_tuple=True)
    if len(r):
        _swap(bins, rows[r], heavy[r, h] * s + x[r, h], light[r, h] * s + y[r, h])
    # Only a lower peak counts: pairs below it may keep trading without helping.
    return bins.load(rows).max(dim=1).values < load.gather(1, order[:, :1]).squeeze(1) * (1 - _EPS)


def _improve(bins: _Bins) -> None:
    """Swap replicas between bins while that lowers the peak planned load.

    Parallel pairwise exchange does most of the work; when it stalls on a row, the heaviest bin
    tries every other bin, so the result is a local optimum of single swaps with the peak bin.
    """
    if bins.num_bins < 2:
        return
    active = torch.ones(bins.expert.shape[0], dtype=torch.bool)
    # Each step lowers the peak or the number of bins at the peak, so this ends; the cap only
    # bounds the time on pathological inputs.
    for _ in range(4 * bins.expert.shape[1]):
        rows = active.nonzero().squeeze(1)
        if len(rows) == 0:
            return
        stalled = rows[~_pair_step(bins, rows)]
        if len(stalled) == 0:
            continue
        peak, top = bins.load(stalled).max(dim=1)
        cost, i, j = _best_swap(bins, stalled, top)
        better = cost < peak * (1 - _EPS)
        active[stalled[~better]] = False
        _swap(bins, stalled[better], i[better], j[better])


# Nodes ----------------------------------------------------------------------------------------


def group_homes(mean: torch.Tensor, num_groups: int, num_nodes: int) -> torch.Tensor:
    """``[L, E]`` the home node of each expert: its router group's node.

    Groups are dealt to nodes like replicas to GPUs (heaviest group to the lightest node,
    ``num_groups / N`` each), so the nodes' home loads are as even as whole groups allow.

    Args:
        mean: ``[L, E]`` mean load shares; experts ``[k * E / num_groups, (k + 1) * E / num_groups)``
            form group ``k``.
        num_groups: router groups, a multiple of ``num_nodes``.
        num_nodes: ``N``.
    """
    num_layers, num_experts = mean.shape
    group_load = mean.view(num_layers, num_groups, -1).sum(-1)
    groups = torch.arange(num_groups).expand(num_layers, -1)
    packed = _deal(groups, group_load, group_load.new_zeros(num_layers, num_groups, 0), num_nodes, num_groups, 1, 0.0)
    slot_node = torch.arange(num_groups) // (num_groups // num_nodes)
    node_of_group = torch.empty_like(groups).scatter_(1, packed.expert, slot_node.expand(num_layers, -1))
    return node_of_group.repeat_interleave(num_experts // num_groups, dim=1)


def _pins(expert: torch.Tensor, mu: torch.Tensor, home: torch.Tensor, num_nodes: int, locality: float) -> torch.Tensor:
    """``[L, P]`` bool: the replicas pinned to their home node.

    One replica per expert (the first in ``expert``'s order, which must list an expert's replicas
    together), heaviest experts first, while the pinned load of a node stays within ``locality``
    times its fair share ``1 / N`` of the layer.
    """
    first = torch.ones_like(expert, dtype=torch.bool)
    first[:, 1:] = expert[:, 1:] != expert[:, :-1]
    node = home.gather(1, expert)
    order = torch.sort(torch.where(first, mu, -1.0), dim=1, descending=True, stable=True).indices
    at_node = torch.nn.functional.one_hot(node.gather(1, order), num_nodes) * torch.where(first, mu, 0.0).gather(
        1, order).unsqueeze(-1)
    used = at_node.cumsum(1).gather(2, node.gather(1, order).unsqueeze(-1)).squeeze(-1)
    pinned_sorted = first.gather(1, order) & (used <= locality / num_nodes * (1 + 1e-9))
    return torch.zeros_like(first).scatter_(1, order, pinned_sorted)


def _split_nodes(expert: torch.Tensor, mu: torch.Tensor, dev: torch.Tensor, counts: torch.Tensor,
                 home: Optional[torch.Tensor], spec: PlanSpec, config: EngineConfig):
    """Deal ``[L, P]`` replicas to nodes; returns them (expert, mu, dev, fixed) node by node.

    ``fixed`` marks the replicas that must keep their node: the pinned ones, and those of
    experts with several replicas (which the dealing spread over distinct nodes).

    Pinned replicas go to their home node first; then, heaviest first, every other replica goes
    to the node with the lowest planned load after taking it, among those with a free slot and
    the fewest replicas of its expert (LPT on top of the pinned loads).
    """
    num_layers, num_slots = expert.shape
    num_nodes, num_experts, rank = spec.num_nodes, counts.shape[1], dev.shape[-1]
    per_node = num_slots // num_nodes
    risk = config.risk if rank else 0.0
    if home is not None and config.locality > 0:
        pinned = _pins(expert, mu, home, num_nodes, config.locality)
    else:
        pinned = torch.zeros_like(expert, dtype=torch.bool)
    # Pinned replicas first, then the rest heaviest first.
    key = torch.where(pinned, torch.inf, mu + risk * dev.norm(dim=-1))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    expert, mu, pinned = expert.gather(1, order), mu.gather(1, order), pinned.gather(1, order)
    dev = dev.gather(1, order.unsqueeze(-1).expand(-1, -1, rank))
    node = torch.where(pinned, home.gather(1, expert) if home is not None else 0, -1)  # -1: not placed yet
    rows = torch.arange(num_layers)
    placed = pinned.clone()
    one_hot = torch.nn.functional.one_hot(node.clamp(min=0), num_nodes) * placed.unsqueeze(-1)  # [L, P, N]
    filled = one_hot.sum(1)
    node_mu = torch.einsum("lp,lpn->ln", mu, one_hot.to(mu.dtype))
    node_dev = torch.einsum("lpk,lpn->lnk", dev, one_hot.to(mu.dtype))
    held = torch.zeros(num_layers, num_nodes * num_experts, dtype=torch.int64)
    held.scatter_add_(1, node.clamp(min=0) * num_experts + expert, placed.long())
    node_limit = (counts + num_nodes - 1) // num_nodes  # spread each expert over distinct nodes
    node_base = torch.arange(num_nodes) * num_experts
    for k in range(int(pinned.sum(1).min()), num_slots):
        e, todo = expert[:, k], ~placed[:, k]
        load = node_mu + mu[:, k : k + 1]
        if risk:
            load = load + risk * (node_dev + dev[:, k].unsqueeze(1)).norm(dim=-1)
        crowded = held.gather(1, node_base + e.unsqueeze(1)) >= node_limit.gather(1, e.unsqueeze(1))
        # Tiers: a node with room and a replica of e to spare, then any node with room.
        tiered = load + crowded * (1.0 + load.amax(1, keepdim=True))
        choice = torch.where(filled >= per_node, torch.inf, tiered).argmin(1)
        r = rows[todo]
        n = choice[todo]
        node[r, k] = n
        filled[r, n] += 1
        node_mu[r, n] += mu[r, k]
        node_dev[r, n] += dev[r, k]
        held[r, n * num_experts + e[r]] += 1
    # Slot within the node: rank among the replicas dealt to the same node, in dealing order.
    first = torch.sort(node * num_slots + torch.arange(num_slots), dim=1).indices  # grouped by node
    dest = torch.empty_like(first).scatter_(1, first, torch.arange(num_slots).expand(num_layers, -1).contiguous())
    # Pinned replicas and those of experts spread over nodes keep their node from now on.
    fixed = pinned | (counts.gather(1, expert) > 1)
    expert, mu, fixed = (torch.empty_like(t).scatter_(1, dest, t) for t in (expert, mu, fixed))
    dev = torch.empty_like(dev).scatter_(1, dest.unsqueeze(-1).expand(-1, -1, rank), dev)
    return expert, mu, dev, fixed


# The algorithm --------------------------------------------------------------------------------


def plan_engine(load: torch.Tensor, spec: PlanSpec, config: EngineConfig = EngineConfig()) -> torch.Tensor:
    """Plan replica counts and their GPUs for every layer.

    Args:
        load: ``[T, L, E]`` float64 history of expert loads, oldest window first (``T = 1``
            for a single snapshot); every layer carries some load.
        spec: the cluster: ``G`` GPUs, ``P`` slots (a multiple of ``G``, ``>= E``), ``N`` nodes,
            and the router's groups (used for ``locality`` when they divide evenly over nodes).
        config: the engine's knobs.

    Returns:
        phy2log ``[L, P]`` int64.
    """
    _, num_layers, num_experts = load.shape
    mean, spread = load_profile(load, config.half_life)
    limit = -(-spec.slots_per_gpu // num_experts)  # > 1 only when S > E forces duplicates
    sd = spread.norm(dim=-1)
    counts = replica_counts(mean + config.risk * sd, spec.num_slots, limit * spec.num_gpus)
    expert, mu, dev = _replicas(counts, mean, spread)
    if spec.num_nodes == 1:
        bins = _deal(expert, mu, dev, spec.num_gpus, num_experts, limit, config.risk)
        _repair(bins)
        _improve(bins)
        return _at_least_reference(bins, load, spec, mean, spread)
    groups = spec.num_groups
    home = None
    if groups is not None and groups % spec.num_nodes == 0 and num_experts % groups == 0:
        home = group_homes(mean, groups, spec.num_nodes)
    expert, mu, dev, fixed = _split_nodes(expert, mu, dev, counts, home, spec, config)
    # Pack each node's GPUs, then let free replicas also cross nodes to even out the nodes.
    per_node = spec.num_slots // spec.num_nodes
    local = _deal(expert.view(-1, per_node), mu.view(-1, per_node), dev.reshape(num_layers * spec.num_nodes, per_node, -1),
                  spec.gpus_per_node, num_experts, limit, config.risk, fixed.view(-1, per_node))
    _repair(local)
    bins = _Bins(
        expert=local.expert.view(num_layers, -1), mu=local.mu.view(num_layers, -1),
        dev=local.dev.reshape(num_layers, spec.num_slots, -1),
        bin_mu=local.bin_mu.view(num_layers, -1), bin_dev=local.bin_dev.reshape(num_layers, spec.num_gpus, -1),
        held=local.held.view(num_layers, spec.num_gpus, -1), slots_per_bin=spec.slots_per_gpu,
        limit=limit, risk=local.risk, fixed=local.fixed.view(num_layers, -1),
        bins_per_node=spec.gpus_per_node,
    )
    _improve(bins)
    return bins.expert


def _at_least_reference(bins: _Bins, load: torch.Tensor, spec: PlanSpec, mean: torch.Tensor,
                        spread: torch.Tensor) -> torch.Tensor:
    """``bins.expert``, except on layers where DeepSeek's greedy plans a lower peak.

    Swaps from one start can stall above what LPT finds on small cases, so the reference plan,
    freed of its duplicates and improved by the same search, is kept where it is better.
    """
    ref = deepseek.GLOBAL.fn(load, spec)
    counts = torch.zeros_like(mean, dtype=torch.int64).scatter_add_(1, ref, torch.ones_like(ref))
    expert, mu, dev = ref, *(_replicas_at(ref, counts, mean, spread))
    s, num_experts = spec.slots_per_gpu, mean.shape[1]
    ours = bins.load(torch.arange(len(ref))).max(1).values
    rival = _Bins(expert, mu, dev, mu.view(len(ref), spec.num_gpus, s).sum(-1),
                  dev.view(len(ref), spec.num_gpus, s, -1).sum(2), bins.held.new_zeros(bins.held.shape),
                  s, bins.limit, bins.risk)
    if bins.risk == 0:
        rival.dev, rival.bin_dev = rival.dev[..., :0], rival.bin_dev[..., :0]
    theirs = rival.load(torch.arange(len(ref))).max(1).values
    rows = (theirs < ours * (1 - _EPS)).nonzero().squeeze(1)
    if len(rows) == 0:
        return bins.expert
    rival = _Bins(rival.expert[rows].clone(), rival.mu[rows].clone(), rival.dev[rows].clone(),
                  rival.bin_mu[rows].clone(), rival.bin_dev[rows].clone(), rival.held[rows], s, bins.limit, bins.risk)
    flat = (torch.arange(ref.shape[1]) // s) * num_experts + rival.expert
    rival.held.view(len(rows), -1).scatter_add_(1, flat, torch.ones_like(flat))
    _repair(rival)
    _improve(rival)
    better = rival.load(torch.arange(len(rows))).max(1).values < ours[rows]
    out = bins.expert.clone()
    out[rows[better]] = rival.expert[better]
    return out


def _replicas_at(phy2log: torch.Tensor, counts: torch.Tensor, mean: torch.Tensor, spread: torch.Tensor):
    """Mean load and shift of the replica in each slot of ``phy2log`` (``counts`` replicas each)."""
    c = counts.gather(1, phy2log).to(torch.float64)
    dev = spread.gather(1, phy2log.unsqueeze(-1).expand(-1, -1, spread.shape[-1])) / c.unsqueeze(-1)
    return mean.gather(1, phy2log) / c, dev


def _replicas(counts: torch.Tensor, mean: torch.Tensor, spread: torch.Tensor):
    """``[L, P]`` replicas, grouped by expert: expert id, mean load ``mean / c``, shift ``spread / c``."""
    num_layers = counts.shape[0]
    num_slots = int(counts[0].sum())
    ends = counts.cumsum(1)
    expert = torch.searchsorted(ends, torch.arange(num_slots).expand(num_layers, -1).contiguous(), right=True)
    c = counts.gather(1, expert).to(torch.float64)
    dev = spread.gather(1, expert.unsqueeze(-1).expand(-1, -1, spread.shape[-1])) / c.unsqueeze(-1)
    return expert, mean.gather(1, expert) / c, dev


def _plan(load: torch.Tensor, spec: PlanSpec) -> torch.Tensor:
    return plan_engine(load, spec)


ENGINE = Algorithm(
    name="eplb",
    fn=_plan,
    summary="eplb's engine: hedged replica counts, node- and duplicate-aware packing, swap local search",
    auto_candidate=True,
)
