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
   to its group's home node (``HedgedConfig.locality``), so tokens touch fewer nodes.
4. **Duplicate-free packing** of each node's replicas on its GPUs: rounds of one replica per
   GPU, heaviest replica to the lightest GPU, so every GPU gets exactly ``P / G``; a GPU never
   holds two replicas of one expert (a wasted slot) unless ``P / G > E`` forces it.
5. **Local search**: parallel pairwise swaps (heaviest GPU with lightest, and so on), then
   swaps of the heaviest GPU with any other, while the peak planned load falls.
6. **Reference check** (one node): on the layers where DeepSeek's greedy plan has a lower peak
   (layers at the lower bound skip it), that plan, improved by the same search, replaces the
   engine's. It may keep some of its duplicates: when more heavy replicas than GPUs exist, a
   GPU must take two of them, and the lightest such pair can be two replicas of one expert; a
   duplicate stays only where removing it would raise the peak (see ``forced_duplicates``).

A GPU's planned load is ``sum mu + risk * sd`` of the replicas it holds, where ``sd`` is the
standard deviation of their summed share over the windows: correlated experts are spread,
anti-correlated ones may share a GPU. With one window (or ``risk = 0``) it is the plain load,
and the engine is a tight in-sample balancer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from eplb.cluster import Cluster
from eplb.errors import EplbError
from eplb.planning import deepseek
from eplb.planning.algorithm import Algorithm

# Principal directions of the load shift kept per layer: bounds the cost of a long history
# while keeping nearly all of its variance (window-to-window shifts are low rank).
_MAX_RANK = 16
# A swap must lower a load by more than this relative amount, so float noise cannot cycle.
_EPS = 1e-12


@dataclass(frozen=True)
class HedgedConfig:
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
        allow_duplicates: keep a load-forced duplicate (see ``forced_duplicates``) where it
            lowers the peak; ``False`` places only the duplicates the slot counts force.
    """

    risk: float = 1.0
    half_life: float = 8.0
    locality: float = 0.25
    allow_duplicates: bool = True

    def __post_init__(self) -> None:
        if not _is_number(self.risk) or not math.isfinite(self.risk) or self.risk < 0:
            raise EplbError(f"risk must be a finite number >= 0, got {self.risk!r}; use e.g. 1.0 (0 plans for the mean)")
        if not _is_number(self.half_life) or math.isnan(self.half_life) or self.half_life <= 0:
            raise EplbError(
                f"half_life must be a number of windows > 0 (math.inf weighs windows equally), got {self.half_life!r}"
            )
        if not _is_number(self.locality) or not 0 <= self.locality <= 1:
            raise EplbError(f"locality must be a number in [0, 1] (0 = pure balance), got {self.locality!r}")
        if not isinstance(self.allow_duplicates, bool):
            raise EplbError(f"allow_duplicates must be True or False, got {self.allow_duplicates!r}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# Load profile and replica counts ------------------------------------------------------------


def load_profile(load, half_life: float) -> tuple[np.ndarray, np.ndarray]:
    """Recency-weighted mean and covariance of each expert's share of its layer's load.

    Each window is normalised to shares first, so a long window does not outweigh a short one:
    every window is one sample of how the load splits over experts.

    Args:
        load: ``[T, L, E]`` non-negative loads (tensor or array), oldest window first.
        half_life: the age, in windows, at which a window's weight halves.

    Returns:
        ``(mean, spread)`` float64 arrays: ``mean [L, E]``, each row summing to 1 (a layer without
        any load gets a uniform mean); ``spread [L, E, K]`` with ``spread @ spread.T`` the unbiased
        weighted covariance of the shares, truncated to its ``K <= 16`` largest directions
        (``K = 0`` for a single window). Windows without load in a layer are left out there.
    """
    load = np.asarray(load, dtype=np.float64)
    num_windows, num_layers, num_experts = load.shape
    total = load.sum(-1)  # [T, L]
    share = load / np.where(total > 0, total, 1.0)[..., None]
    age = np.arange(num_windows - 1, -1, -1, dtype=np.float64)
    weight = (0.5 ** (age / half_life))[:, None] * (total > 0)  # [T, L]
    wsum = weight.sum(0)
    weight = weight / np.where(wsum > 0, wsum, 1.0)
    mean = np.where((wsum > 0)[:, None], (weight[..., None] * share).sum(0), 1.0 / num_experts)
    if num_windows == 1:
        return mean, np.zeros((num_layers, num_experts, 0))
    # Reliability weights: the unbiased variance divides by 1 - sum w^2 (T - 1 of T if equal).
    w2 = (weight**2).sum(0)
    scale = np.sqrt(weight / np.maximum(1 - w2, 1e-12)) * (w2 < 1 - 1e-12)  # [T, L]
    centred = (scale[..., None] * (share - mean)).transpose(1, 0, 2)  # [L, T, E]
    _, sing, vh = np.linalg.svd(centred, full_matrices=False)
    # Directions at float-noise level are no shift (identical windows give exactly none).
    sing = np.where(sing > 1e-12, sing, 0.0)
    rank = min(_MAX_RANK, int((sing > 0).sum(-1).max()))
    spread = (sing[:, :rank, None] * vh[:, :rank]).transpose(0, 2, 1)  # [L, E, K]
    return mean, np.ascontiguousarray(spread)


def replica_counts(weight, num_slots: int, max_replicas: int) -> np.ndarray:
    """Replicas per logical expert that minimise the heaviest replica ``max_e weight_e / c_e``.

    This is the greedy "next slot to the expert with the heaviest replica", found at once: the
    lowest threshold ``t`` whose counts ``clip(ceil(w / t), 1, max_replicas)`` fit in the slots
    is bisected, then the few slots left (experts tied at ``t``) go to the heaviest replicas.

    Args:
        weight: ``[L, E]`` non-negative planning load of each logical expert (tensor or array).
        num_slots: ``P``, with ``E <= P <= E * max_replicas``.
        max_replicas: the most replicas one expert may get (``G`` keeps one per GPU).

    Returns:
        logcnt ``[L, E]`` int64 array, each row summing to ``P``.
    """
    weight = np.asarray(weight, dtype=np.float64)
    num_experts = weight.shape[1]
    # Any threshold below total / P needs more than P slots: start the bisection there.
    hi = np.maximum(weight.max(1, keepdims=True), 1e-300)

    def fill(t: np.ndarray) -> np.ndarray:
        return np.clip(np.ceil(weight / t), 1, max_replicas)

    lo = weight.sum(1, keepdims=True) / num_slots * (1 - 1e-12)
    lo = np.where(fill(np.maximum(lo, 1e-300)).sum(1, keepdims=True) <= num_slots, 0.0, lo)

    for _ in range(64):  # 64 halvings pin the threshold to float precision
        mid = (lo + hi) / 2
        fits = fill(mid).sum(1, keepdims=True) <= num_slots
        hi = np.where(fits, mid, hi)
        lo = np.where(fits, lo, mid)
    counts = fill(hi)
    left = num_slots - counts.sum(1, keepdims=True)  # [L, 1]
    relief = np.where(counts < max_replicas, weight / counts, -1.0)
    order = np.argsort(-relief, axis=1, kind="stable")
    np.put_along_axis(counts, order, np.take_along_axis(counts, order, 1) + (np.arange(num_experts) < left), 1)
    return counts.astype(np.int64)


def forced_duplicates(num_experts: int, spec: Cluster) -> int:
    """Replicas per layer that the slot counts force to share a GPU with their expert.

    A GPU with ``S = P / G`` slots holds at most ``E`` distinct experts, so ``S > E`` forces
    ``S - E`` duplicates on every GPU (the engine may then place a few more, allowing up to
    ``ceil(S / E)`` replicas of an expert per GPU).

    The loads can force more: when more replicas heavier than half a GPU's fair load exist
    than GPUs, one GPU takes two of them, and two replicas of one expert can be the lightest
    such pair. The engine keeps such a load-forced duplicate only on a layer where DeepSeek's
    plan with it, after the engine's search, has a lower peak than the engine's duplicate-free
    plan, and only where moving it would raise the peak (``HedgedConfig.allow_duplicates``
    turns this off); ``eplb.metrics.duplicates`` counts the duplicates of a placement.
    """
    return spec.num_gpus * max(0, spec.slots_per_gpu - num_experts)


# Packing state ---------------------------------------------------------------------------------
# The search state is numpy: its steps work on small arrays, where each torch call costs several
# times more than the arithmetic.


@dataclass
class _Bins:
    """A batch of packings: ``B`` rows of ``G`` bins (GPUs) with ``S`` slots each.

    Slot ``p`` of a row lies in bin ``p // S``. ``limit[row, e]`` is how many replicas of expert
    ``e`` a bin may hold. A replica carries its mean load ``mu`` and its shift ``dev`` (a
    ``K``-vector whose dot products give covariances); a bin's planned load is
    ``sum mu + risk * |sum dev|``.
    """

    expert: np.ndarray  # [B, G*S] logical expert in each slot
    mu: np.ndarray  # [B, G*S]
    dev: np.ndarray  # [B, G*S, K]
    bin_mu: np.ndarray  # [B, G]
    bin_dev: np.ndarray  # [B, G, K]
    held: np.ndarray  # [B, G, E] replicas of each expert in each bin
    limit: np.ndarray  # [B, E]
    slots_per_bin: int
    risk: float
    # With nodes: [B, G*S] bool, replicas that must stay on their node, and bins per node.
    fixed: np.ndarray | None = None
    bins_per_node: int = 1

    @property
    def num_bins(self) -> int:
        return self.bin_mu.shape[1]

    def load(self, rows=slice(None)) -> np.ndarray:
        """``[R, G]`` planned load of every bin of ``rows``."""
        if self.risk == 0:
            return self.bin_mu[rows]
        return self.bin_mu[rows] + self.risk * np.linalg.norm(self.bin_dev[rows], axis=-1)

    def select(self, rows: np.ndarray) -> _Bins:
        """A copy of ``rows``."""
        return _Bins(self.expert[rows], self.mu[rows], self.dev[rows], self.bin_mu[rows], self.bin_dev[rows],
                     self.held[rows], self.limit[rows], self.slots_per_bin, self.risk,
                     None if self.fixed is None else self.fixed[rows], self.bins_per_node)


def _bins_of(expert: np.ndarray, mu: np.ndarray, dev: np.ndarray, num_bins: int, num_experts: int,
             limit: np.ndarray, risk: float) -> _Bins:
    """The packing that puts slot ``p`` of each row in bin ``p // (P / num_bins)``."""
    batch, num_slots = expert.shape
    slots = num_slots // num_bins
    held = np.zeros((batch, num_bins * num_experts), dtype=np.int64)
    np.add.at(held, (np.arange(batch)[:, None], np.arange(num_slots) // slots * num_experts + expert), 1)
    return _Bins(expert, mu, dev, mu.reshape(batch, num_bins, slots).sum(-1),
                 dev.reshape(batch, num_bins, slots, -1).sum(2), held.reshape(batch, num_bins, num_experts),
                 limit, slots, risk)


def _deal(expert: np.ndarray, mu: np.ndarray, dev: np.ndarray, num_bins: int, num_experts: int,
          limit: int, risk: float, fixed: np.ndarray | None = None) -> _Bins:
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
        expert=np.empty_like(expert), mu=np.empty_like(mu), dev=np.empty_like(dev),
        bin_mu=np.zeros((batch, num_bins)), bin_dev=np.zeros((batch, num_bins, rank)),
        held=np.zeros((batch, num_bins, num_experts), dtype=np.int64),
        limit=np.full((batch, num_experts), limit, dtype=np.int64), slots_per_bin=slots, risk=risk,
        fixed=None if fixed is None else np.empty_like(fixed), bins_per_node=num_bins,
    )
    # Stable: the replicas of one expert stay together, so at most one expert straddles rounds.
    key = mu + risk * np.linalg.norm(dev, axis=-1) if rank else mu
    order = np.argsort(-key, axis=1, kind="stable")
    rows = np.arange(batch)[:, None]
    expert, mu, dev = expert[rows, order], mu[rows, order], dev[rows, order]
    if fixed is not None:
        fixed = fixed[rows, order]
    for r in range(slots):
        cut = slice(r * num_bins, (r + 1) * num_bins)
        lightest = np.argsort(bins.load(), axis=1, kind="stable")
        slot = lightest * slots + r
        bins.expert[rows, slot] = expert[:, cut]
        bins.mu[rows, slot] = mu[:, cut]
        bins.bin_mu[rows, lightest] += mu[:, cut]
        if rank:
            bins.dev[rows, slot] = dev[:, cut]
            bins.bin_dev[rows, lightest] += dev[:, cut]
        if fixed is not None:
            bins.fixed[rows, slot] = fixed[:, cut]
        bins.held[rows, lightest, expert[:, cut]] += 1
    return bins


# Swaps ---------------------------------------------------------------------------------------


def _pair_costs(bins: _Bins, rows: np.ndarray, a: np.ndarray, b: np.ndarray,
                movable: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Planned load of the heavier bin after each swap between bins ``a`` and ``b``.

    Args:
        bins: the packing.
        rows: ``[R]`` the rows to search.
        a, b: ``[R, M]`` bin pairs.
        movable: ``[R, M, S]`` bool, which slots of ``a`` may give their replica (all, if None).

    Returns:
        ``(base [R, M], excess [R, M, S, S])``: the cost of swapping slot ``x`` of ``a`` with
        slot ``y`` of ``b`` is ``base + excess[..., x, y]``; ``inf`` where ``a == b``, the swap
        exchanges two replicas of one expert, or it would put more than ``limit`` replicas of an
        expert in one bin. Splitting off ``base`` lets a pair's best swap be found first.
    """
    s = bins.slots_per_bin
    num_rows, num_pairs = a.shape
    num_bins, num_experts = bins.held.shape[1:]
    col, row = (num_rows, num_pairs, s, 1), (num_rows, num_pairs, 1, s)
    # Flat indices: np.take on them is several times faster than broadcast fancy indexing.
    bin_a = (rows[:, None] * num_bins + a).repeat(s, axis=1)  # [R, M*S] flat bin of each slot
    bin_b = (rows[:, None] * num_bins + b).repeat(s, axis=1)
    within = np.tile(np.arange(s), num_pairs)
    slot_a, slot_b = bin_a * s + within, bin_b * s + within  # flat slots (a row holds G*S)
    e_a, e_b = bins.expert.take(slot_a), bins.expert.take(slot_b)
    # Can bin b take e_a, can bin a take e_b (a no-op exchange of one expert is caught below).
    stuck_a = bins.held.take(bin_b * num_experts + e_a) >= bins.limit.take(rows[:, None] * num_experts + e_a)
    stuck_a |= bin_a == bin_b
    stuck_b = bins.held.take(bin_a * num_experts + e_b) >= bins.limit.take(rows[:, None] * num_experts + e_b)
    if bins.fixed is not None:
        cross = bin_a // bins.bins_per_node != bin_b // bins.bins_per_node
        stuck_a |= cross & bins.fixed.take(slot_a)
        stuck_b |= cross & bins.fixed.take(slot_b)
    if movable is not None:
        stuck_a |= ~movable.reshape(num_rows, -1)
    # A forbidden swap gets gain +inf (a source load of -inf or a target load of +inf), so its
    # cost is inf; the big array is never masked.
    mu_x = np.where(stuck_a, -np.inf, bins.mu.take(slot_a)).reshape(col)
    mu_y = np.where(stuck_b, np.inf, bins.mu.take(slot_b)).reshape(row)
    load_a, load_b = bins.bin_mu.take(bin_a[:, ::s]).reshape(a.shape), bins.bin_mu.take(bin_b[:, ::s]).reshape(a.shape)
    if bins.risk == 0:
        # max(A + g, B - g) = (A + B) / 2 + |g - (B - A) / 2| for the gain g = y - x of bin a:
        # one full-size subtraction and an in-place abs.
        excess = mu_y - (mu_x + ((load_b - load_a) / 2)[..., None, None])
        np.abs(excess, out=excess)
        base = (load_a + load_b) / 2
    else:
        gain = mu_y - mu_x  # [R, M, S, S]: what bin a gains and bin b loses
        sd_a = _new_sd(bins, bin_a[:, ::s], slot_a, slot_b, col, row, 1.0)
        sd_b = _new_sd(bins, bin_b[:, ::s], slot_a, slot_b, col, row, -1.0)
        excess = np.maximum(load_a[..., None, None] + gain + bins.risk * sd_a,
                            load_b[..., None, None] - gain + bins.risk * sd_b)
        base = np.zeros_like(load_a)
    if bins.limit.max() > 1:
        # With limit 1, held already forbids exchanging two replicas of one expert.
        excess[e_a.reshape(col) == e_b.reshape(row)] = np.inf
    return base, excess


def _new_sd(bins: _Bins, bin_, slot_a, slot_b, col, row, sign: float) -> np.ndarray:
    """``[R, M, S, S]`` standard deviation of bin ``bin_`` (``[R, M]`` flat) after each swap
    of flat slots ``slot_a`` and ``slot_b`` (``[R, M * S]``).

    The bin's shift becomes ``D + sign * (y - x)``; its squared norm expands into small dot
    products and one batched matrix product ``x . y``, so no ``[R, M, S, S, K]`` array is built.
    """
    rank = bins.dev.shape[-1]
    x = bins.dev.reshape(-1, rank)[slot_a].reshape(*col[:3], rank)
    y = bins.dev.reshape(-1, rank)[slot_b].reshape(*col[:3], rank)
    d = bins.bin_dev.reshape(-1, rank)[bin_][:, :, None]  # [R, M, 1, K]
    linear = (2 * sign) * ((y * d).sum(-1).reshape(row) - (x * d).sum(-1).reshape(col))
    square = (x * x).sum(-1).reshape(col) + (y * y).sum(-1).reshape(row) - 2 * x @ y.swapaxes(-1, -2)
    return np.sqrt(np.maximum((d * d).sum(-1)[..., None] + linear + square, 0))


def _pair_best(base: np.ndarray, excess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[R, M]`` each pair's lowest cost and its swap ``x * S + y``, from ``_pair_costs``."""
    flat = excess.reshape(*excess.shape[:2], -1)
    k = flat.argmin(-1)
    return base + np.take_along_axis(flat, k[..., None], -1)[..., 0], k


def _best_swap(bins: _Bins, rows: np.ndarray, src_bin: np.ndarray, movable: np.ndarray | None = None):
    """The best swap of a replica of bin ``src_bin`` (``[R]``) with one of any other bin.

    ``movable`` (``[R, S]`` bool) limits the slots of ``src_bin`` that may give their replica.
    Returns ``(cost [R], i [R], j [R])``: the heavier bin's planned load after swapping slots
    ``i`` and ``j``, ``inf`` where no swap is allowed.
    """
    s, num_bins = bins.slots_per_bin, bins.num_bins
    a = np.broadcast_to(src_bin[:, None], (len(rows), num_bins))
    b = np.broadcast_to(np.arange(num_bins), a.shape)
    if movable is not None:
        movable = np.broadcast_to(movable[:, None], (len(rows), num_bins, s))
    cost, k = _pair_best(*_pair_costs(bins, rows, a, b, movable))
    top = cost.argmin(1)
    k = k[np.arange(len(rows)), top]
    return cost[np.arange(len(rows)), top], src_bin * s + k // s, top * s + k % s


def _swap(bins: _Bins, rows: np.ndarray, i: np.ndarray, j: np.ndarray) -> None:
    """Exchange the replicas in slots ``i`` and ``j`` of ``rows`` (all ``[R]``), in place.

    A row may repeat as long as no bin appears in two of its swaps.
    """
    s = bins.slots_per_bin
    e_i, e_j = bins.expert[rows, i], bins.expert[rows, j]
    bin_i, bin_j = i // s, j // s
    d_mu = bins.mu[rows, j] - bins.mu[rows, i]  # what bin i gains
    arrays = [bins.expert, bins.mu] + ([bins.dev] if bins.dev.shape[-1] else []) + (
        [] if bins.fixed is None else [bins.fixed])
    for t in arrays:
        t[rows, i], t[rows, j] = t[rows, j], t[rows, i]
    bins.bin_mu[rows, bin_i] += d_mu
    bins.bin_mu[rows, bin_j] -= d_mu
    if bins.dev.shape[-1]:
        d_dev = bins.dev[rows, i] - bins.dev[rows, j]  # after the exchange: what bin i gained
        bins.bin_dev[rows, bin_i] += d_dev
        bins.bin_dev[rows, bin_j] -= d_dev
    bins.held[rows, bin_i, e_i] -= 1
    bins.held[rows, bin_i, e_j] += 1
    bins.held[rows, bin_j, e_j] -= 1
    bins.held[rows, bin_j, e_i] += 1


def _repair(bins: _Bins, keep_peak: bool = False) -> None:
    """Move replicas out of bins holding more than their limit of an expert, one per row per pass.

    Args:
        bins: the packing, changed in place.
        keep_peak: only make moves that keep a row's peak planned load (the duplicates left are
            the ones this search cannot remove without raising it).
    """
    s = bins.slots_per_bin
    batch, num_slots = bins.expert.shape
    limit = bins.limit
    slot_bin = np.arange(num_slots) // s
    todo = np.arange(batch)
    for _ in range(num_slots):
        r = todo[:, None]
        over = bins.held[r, slot_bin, bins.expert[todo]] > limit[r, bins.expert[todo]]
        has = over.any(1)
        todo, over = todo[has], over[has]
        if len(todo) == 0:
            return
        src = over.argmax(1) // s
        own = over.reshape(len(todo), -1, s)[np.arange(len(todo)), src]
        cost, i, j = _best_swap(bins, todo, src, own)
        movable = np.isfinite(cost)
        if keep_peak:
            movable &= cost <= bins.load(todo).max(1) * (1 + _EPS)
        # A row whose first crowded bin cannot give a replica is done: the sizes (or, with
        # keep_peak, the loads) force the duplicate.
        todo, i, j = todo[movable], i[movable], j[movable]
        if len(todo) == 0:
            return
        _swap(bins, todo, i, j)


def _pair_step(bins: _Bins, rows: np.ndarray) -> np.ndarray:
    """One parallel round of pairwise exchange; returns ``[R]`` bool, whether a row's peak fell.

    Bins are paired heaviest with lightest, second heaviest with second lightest, and so on;
    each pair makes its best swap if that lowers the pair's heavier bin. Pairs share no bin,
    so all their swaps apply at once and no bin's planned load rises above the old peak.
    """
    s = bins.slots_per_bin
    half = bins.num_bins // 2
    load = bins.load(rows)
    order = np.argsort(-load, axis=1, kind="stable")
    heavy, light = order[:, :half], order[:, ::-1][:, :half]  # [R, H]
    best, k = _pair_best(*_pair_costs(bins, rows, heavy, light))
    peak = np.take_along_axis(load, order[:, :1], 1)[:, 0]
    better = best < np.take_along_axis(load, heavy, 1) * (1 - _EPS)
    r, h = better.nonzero()
    if len(r):
        _swap(bins, rows[r], heavy[r, h] * s + k[r, h] // s, light[r, h] * s + k[r, h] % s)
    # Only a lower peak counts: pairs below it may keep trading without helping.
    return bins.load(rows).max(1) < peak * (1 - _EPS)


def _improve(bins: _Bins) -> None:
    """Swap replicas between bins while that lowers the peak planned load.

    Parallel pairwise exchange does most of the work; when it stalls on a row, the heaviest bin
    tries every other bin, so the result is a local optimum of single swaps with the peak bin.
    Rows stop on their own: a converged row costs nothing in later rounds.
    """
    if bins.num_bins < 2:
        return
    active = np.arange(bins.expert.shape[0])
    # Each step lowers the peak or the number of bins at the peak, so this ends; the cap only
    # bounds the time on pathological inputs.
    for _ in range(4 * bins.expert.shape[1]):
        if len(active) == 0:
            return
        stalled = active[~_pair_step(bins, active)]
        if len(stalled) == 0:
            continue
        load = bins.load(stalled)
        top = load.argmax(1)
        cost, i, j = _best_swap(bins, stalled, top)
        better = cost < load[np.arange(len(stalled)), top] * (1 - _EPS)
        active = np.setdiff1d(active, stalled[~better], assume_unique=True)
        _swap(bins, stalled[better], i[better], j[better])


# Nodes ----------------------------------------------------------------------------------------


def group_homes(mean, num_groups: int, num_nodes: int) -> np.ndarray:
    """``[L, E]`` int64 array: the home node of each expert, its router group's node.

    Groups are dealt to nodes like replicas to GPUs (heaviest group to the lightest node,
    ``num_groups / N`` each), so the nodes' home loads are as even as whole groups allow.

    Args:
        mean: ``[L, E]`` mean load shares (tensor or array); experts
            ``[k * E / num_groups, (k + 1) * E / num_groups)`` form group ``k``.
        num_groups: router groups, a multiple of ``num_nodes``.
        num_nodes: ``N``.
    """
    mean = np.asarray(mean, dtype=np.float64)
    num_layers, num_experts = mean.shape
    group_load = mean.reshape(num_layers, num_groups, -1).sum(-1)
    groups = np.broadcast_to(np.arange(num_groups), (num_layers, num_groups))
    packed = _deal(groups, group_load, np.zeros((num_layers, num_groups, 0)), num_nodes, num_groups, 1, 0.0)
    node_of_group = np.empty_like(packed.expert)
    np.put_along_axis(node_of_group, packed.expert,
                      np.broadcast_to(np.arange(num_groups) // (num_groups // num_nodes), groups.shape), 1)
    return np.repeat(node_of_group, num_experts // num_groups, axis=1)


def _pins(expert: np.ndarray, mu: np.ndarray, home: np.ndarray, num_nodes: int, locality: float) -> np.ndarray:
    """``[L, P]`` bool: the replicas pinned to their home node.

    One replica per expert (the first in ``expert``'s order, which must list an expert's replicas
    together), heaviest experts first, while the pinned load of a node stays within ``locality``
    times its fair share ``1 / N`` of the layer.
    """
    first = np.ones_like(expert, dtype=bool)
    first[:, 1:] = expert[:, 1:] != expert[:, :-1]
    node = np.take_along_axis(home, expert, 1)
    order = np.argsort(-np.where(first, mu, -1.0), axis=1, kind="stable")
    node_sorted = np.take_along_axis(node, order, 1)
    at_node = (node_sorted[..., None] == np.arange(num_nodes)) * np.take_along_axis(np.where(first, mu, 0.0), order,
                                                                                    1)[..., None]
    used = np.take_along_axis(at_node.cumsum(1), node_sorted[..., None], 2)[..., 0]
    pinned = np.zeros_like(first)
    np.put_along_axis(pinned, order, np.take_along_axis(first, order, 1) & (used <= locality / num_nodes * (1 + 1e-9)),
                      1)
    return pinned


def _split_nodes(expert: np.ndarray, mu: np.ndarray, dev: np.ndarray, counts: np.ndarray,
                 home: np.ndarray | None, spec: Cluster, config: HedgedConfig):
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
        pinned = np.zeros_like(expert, dtype=bool)
    # Pinned replicas first, then the rest heaviest first.
    key = np.where(pinned, np.inf, mu + risk * np.linalg.norm(dev, axis=-1) if risk else mu)
    order = np.argsort(-key, axis=1, kind="stable")
    rows = np.arange(num_layers)
    expert, mu, pinned, dev = (t[rows[:, None], order] for t in (expert, mu, pinned, dev))
    node = np.where(pinned, np.take_along_axis(home, expert, 1) if home is not None else 0, -1)  # -1: not placed
    one_hot = (node[..., None] == np.arange(num_nodes)) & pinned[..., None]  # [L, P, N]
    # Contiguous, so that the flat views below write through: this loop runs once per slot,
    # and small fancy-indexing calls would dominate it. held[l, e, n]: replicas of e on node n.
    filled = np.ascontiguousarray(one_hot.sum(1))
    node_mu = np.ascontiguousarray(np.einsum("lp,lpn->ln", mu, one_hot.astype(np.float64)))
    node_dev = np.einsum("lpk,lpn->lnk", dev, one_hot.astype(np.float64))
    held = np.zeros((num_layers, num_experts, num_nodes), dtype=np.int64)
    np.add.at(held, (rows[:, None], expert, node.clip(min=0)), pinned)
    held_rows = held.reshape(-1, num_nodes)
    node_limit = np.take_along_axis(-(-counts // num_nodes), expert, 1)  # spread each expert over distinct nodes
    layer_expert, layer_node = rows * num_experts, rows * num_nodes
    expert_k, mu_k, pinned_k, limit_k = (np.ascontiguousarray(t.T) for t in (expert, mu, pinned, node_limit))
    num_pinned = pinned.sum(1)
    some_pinned = int(num_pinned.max())  # from here on every row places a free replica
    for k in range(int(num_pinned.min()), num_slots):
        e, m = expert_k[k], mu_k[k]
        load = node_mu + m[:, None]
        if risk:
            load = load + risk * np.linalg.norm(node_dev + dev[:, k, None], axis=-1)
        crowded = held_rows[layer_expert + e] >= limit_k[k][:, None]
        # Tiers: a node with room and a replica of e to spare, then any node with room.
        tiered = load + crowded * (1.0 + load.max(1, keepdims=True))
        choice = np.where(filled >= per_node, np.inf, tiered).argmin(1)
        if k < some_pinned:
            todo = ~pinned_k[k]
            choice = np.where(todo, choice, node[:, k])
            r = rows[todo]
        else:
            todo, r = 1, rows
        node[:, k] = choice
        filled.reshape(-1)[layer_node + choice] += todo
        node_mu.reshape(-1)[layer_node + choice] += m * todo
        if risk:
            node_dev[r, choice[r]] += dev[r, k]
        held.reshape(-1)[(layer_expert + e) * num_nodes + choice] += todo
    # Slot within the node: rank among the replicas dealt to the same node, in dealing order.
    grouped = np.argsort(node, axis=1, kind="stable")
    # Pinned replicas and those of experts spread over nodes keep their node from now on.
    fixed = pinned | (np.take_along_axis(counts, expert, 1) > 1)
    return tuple(t[rows[:, None], grouped] for t in (expert, mu, dev, fixed))


# The algorithm --------------------------------------------------------------------------------


def plan_hedged(load: torch.Tensor, spec: Cluster, config: HedgedConfig = HedgedConfig()) -> torch.Tensor:
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
    sd = np.linalg.norm(spread, axis=-1)
    counts = replica_counts(mean + config.risk * sd, spec.num_slots, limit * spec.num_gpus)
    expert = _replicas(counts)
    mu, dev = _replica_loads(expert, counts, mean, spread)
    if spec.num_nodes == 1:
        bins = _deal(expert, mu, dev, spec.num_gpus, num_experts, limit, config.risk)
        _repair(bins)
        _improve(bins)
        return torch.from_numpy(_at_least_reference(bins, load, spec, mean, spread, config))
    groups = spec.num_groups
    home = None
    if groups is not None and groups % spec.num_nodes == 0 and num_experts % groups == 0 and config.locality > 0:
        home = group_homes(mean, groups, spec.num_nodes)
    expert, mu, dev, fixed = _split_nodes(expert, mu, dev, counts, home, spec, config)
    # Pack each node's GPUs, then let free replicas also cross nodes to even out the nodes.
    per_node = spec.num_slots // spec.num_nodes
    local = _deal(expert.reshape(-1, per_node), mu.reshape(-1, per_node),
                  dev.reshape(num_layers * spec.num_nodes, per_node, -1),
                  spec.gpus_per_node, num_experts, limit, config.risk, fixed.reshape(-1, per_node))
    _repair(local)
    bins = _Bins(
        expert=local.expert.reshape(num_layers, -1), mu=local.mu.reshape(num_layers, -1),
        dev=local.dev.reshape(num_layers, spec.num_slots, -1),
        bin_mu=local.bin_mu.reshape(num_layers, -1), bin_dev=local.bin_dev.reshape(num_layers, spec.num_gpus, -1),
        held=local.held.reshape(num_layers, spec.num_gpus, -1), limit=np.full((num_layers, num_experts), limit),
        slots_per_bin=spec.slots_per_gpu, risk=local.risk, fixed=local.fixed.reshape(num_layers, -1),
        bins_per_node=spec.gpus_per_node,
    )
    _improve(bins)
    # No reference check here: DeepSeek's global plan ignores nodes and groups, so it would undo
    # both the pins (locality) and the spreading of an expert's replicas over distinct nodes.
    return torch.from_numpy(bins.expert)


def _at_least_reference(bins: _Bins, load: torch.Tensor, spec: Cluster, mean: np.ndarray, spread: np.ndarray,
                        config: HedgedConfig) -> np.ndarray:
    """``bins.expert``, except on layers where DeepSeek's greedy plans a lower peak.

    Swaps from one start can stall above what LPT finds, so on the layers where the reference
    plan beats ours, it is freed of its duplicates, improved by the same search, and kept if
    it is still better. Where the
    reference's own plan, duplicates included, still beats both, its duplicates are load-forced
    as far as this search can tell: with ``config.allow_duplicates`` it is improved with them
    (never adding any), every duplicate that can move without raising the peak moves, and it
    is kept if still better. With plain loads (no spread), a layer whose peak already meets the
    lower bound ``max(mean GPU load, heaviest replica)`` is left alone.
    """
    peak = bins.load().max(1)
    rows = np.arange(len(peak))
    if bins.risk == 0:
        bound = np.maximum(mean.sum(1) / spec.num_gpus, bins.mu.max(1))
        rows = np.flatnonzero(peak > bound * (1 + 1e-9))
        if len(rows) == 0:
            return bins.expert
    ref = deepseek.GLOBAL.fn(load[:, torch.from_numpy(rows)], spec).numpy()
    num_experts = mean.shape[1]
    counts = np.zeros((len(rows), num_experts), dtype=np.int64)
    np.add.at(counts, (np.arange(len(rows))[:, None], ref), 1)
    mu, dev = _replica_loads(ref, counts, mean[rows], spread[rows] if bins.risk else spread[rows, :, :0])
    rival = _bins_of(ref, mu, dev, spec.num_gpus, num_experts, bins.limit[rows], bins.risk)
    # Search from the reference only where its plan beats ours: elsewhere it has already lost.
    raw_peak = rival.load().max(1)
    keep = raw_peak < peak[rows] * (1 - _EPS)
    rows, raw_peak, rival = rows[keep], raw_peak[keep], rival.select(np.flatnonzero(keep))
    base = rival.limit
    free = rival.select(np.arange(len(rows)))
    _repair(free)
    _improve(free)
    out = bins.expert.copy()
    best = np.minimum(peak[rows], free.load().max(1))
    better = free.load().max(1) < peak[rows] * (1 - _EPS)
    out[rows[better]] = free.expert[better]
    forced = np.flatnonzero(raw_peak < best * (1 - _EPS))
    if config.allow_duplicates and len(forced):
        dup = rival.select(forced)
        dup.limit = np.maximum(base[forced], dup.held.max(1))
        _improve(dup)
        dup.limit = base[forced]
        _repair(dup, keep_peak=True)
        better = dup.load().max(1) < best[forced] * (1 - _EPS)
        out[rows[forced[better]]] = dup.expert[better]
    return out


def _replicas(counts: np.ndarray) -> np.ndarray:
    """``[L, P]`` the logical expert of each replica, an expert's ``counts`` replicas together."""
    num_layers, num_experts = counts.shape
    return np.repeat(np.tile(np.arange(num_experts), num_layers), counts.ravel()).reshape(num_layers, -1)


def _replica_loads(phy2log: np.ndarray, counts: np.ndarray, mean: np.ndarray, spread: np.ndarray):
    """Mean load ``[L, P]`` and shift ``[L, P, K]`` of the replica in each slot of ``phy2log``:
    its expert's ``mean`` and ``spread`` split evenly over the expert's ``counts`` replicas."""
    c = np.take_along_axis(counts, phy2log, 1).astype(np.float64)
    dev = spread[np.arange(len(phy2log))[:, None], phy2log] / c[..., None]
    return np.take_along_axis(mean, phy2log, 1) / c, dev


HEDGED = Algorithm(
    name="eplb",
    fn=plan_hedged,
    summary="eplb's engine: hedged replica counts, node- and duplicate-aware packing, swap local search",
    config_type=HedgedConfig,
)
