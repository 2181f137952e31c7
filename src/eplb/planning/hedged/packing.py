"""Packing replicas onto bins (GPUs, or the nodes of ``nodes.group_homes``): dealing, swap local
search, and the repair of bins that hold too many replicas of one expert.

The search state is numpy: its steps work on small arrays, where each torch call costs several
times more than the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A swap must lower a load by more than this relative amount, so float noise cannot cycle.
EPS = 1e-12


@dataclass
class Bins:
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

    def select(self, rows: np.ndarray) -> Bins:
        """A copy of ``rows``."""
        return Bins(self.expert[rows], self.mu[rows], self.dev[rows], self.bin_mu[rows], self.bin_dev[rows],
                    self.held[rows], self.limit[rows], self.slots_per_bin, self.risk,
                    None if self.fixed is None else self.fixed[rows], self.bins_per_node)


def bins_of(expert: np.ndarray, mu: np.ndarray, dev: np.ndarray, num_bins: int, num_experts: int,
            limit: np.ndarray, risk: float) -> Bins:
    """The packing that puts slot ``p`` of each row in bin ``p // (P / num_bins)``."""
    batch, num_slots = expert.shape
    slots = num_slots // num_bins
    held = np.zeros((batch, num_bins * num_experts), dtype=np.int64)
    np.add.at(held, (np.arange(batch)[:, None], np.arange(num_slots) // slots * num_experts + expert), 1)
    return Bins(expert, mu, dev, mu.reshape(batch, num_bins, slots).sum(-1),
                dev.reshape(batch, num_bins, slots, -1).sum(2), held.reshape(batch, num_bins, num_experts),
                limit, slots, risk)


def deal(expert: np.ndarray, mu: np.ndarray, dev: np.ndarray, num_bins: int, num_experts: int,
         limit: int, risk: float, fixed: np.ndarray | None = None) -> Bins:
    """Deal ``[B, K]`` replicas to ``num_bins`` bins of ``K / num_bins`` slots each.

    ``fixed`` (``[B, K]`` bool, optional) travels with the replicas (see ``Bins.fixed``); all
    bins of a row are then taken to be on one node.

    Replicas go in rounds of one per bin, the heaviest remaining to the lightest bin, so bins
    fill evenly (the cardinality-constrained form of LPT). A round never gives a bin two
    replicas of one expert; only an expert whose replicas straddle two rounds can, and
    :func:`repair` moves those.
    """
    batch, num_items = expert.shape
    slots = num_items // num_bins
    if dev.shape[-1] == 0 or risk == 0:
        risk, dev = 0.0, dev[..., :0]  # nothing to hedge: skip the norms
    rank = dev.shape[-1]
    bins = Bins(
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


def _pair_costs(bins: Bins, rows: np.ndarray, a: np.ndarray, b: np.ndarray,
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
        swapped = _Swapped.of(bins, slot_a, slot_b, col, row)
        # In place, in the order of max(A + gain + risk * sd_a, B - gain + risk * sd_b).
        excess = load_a[..., None, None] + gain
        excess += np.multiply(swapped.new_sd(bins, bin_a[:, ::s], 1.0), bins.risk, out=swapped.buffer)
        other = np.subtract(load_b[..., None, None], gain, out=gain)
        other += np.multiply(swapped.new_sd(bins, bin_b[:, ::s], -1.0), bins.risk, out=swapped.buffer)
        np.maximum(excess, other, out=excess)
        base = np.zeros_like(load_a)
    if bins.limit.max() > 1:
        # With limit 1, held already forbids exchanging two replicas of one expert.
        excess[e_a.reshape(col) == e_b.reshape(row)] = np.inf
    return base, excess


@dataclass
class _Swapped:
    """The replicas of every candidate swap of ``_pair_costs``: ``x`` leaves bin a, ``y`` leaves bin b
    (``[R, M, S, K]`` shifts), and ``square = |x - y|^2`` (``[R, M, S, S]``), shared by both bins."""

    x: np.ndarray
    y: np.ndarray
    square: np.ndarray
    col: tuple
    row: tuple
    buffer: np.ndarray  # [R, M, S, S] scratch for ``new_sd``

    @classmethod
    def of(cls, bins: Bins, slot_a: np.ndarray, slot_b: np.ndarray, col: tuple, row: tuple) -> _Swapped:
        rank = bins.dev.shape[-1]
        x = bins.dev.reshape(-1, rank).take(slot_a, axis=0).reshape(*col[:3], rank)
        y = bins.dev.reshape(-1, rank).take(slot_b, axis=0).reshape(*col[:3], rank)
        square = (x * x).sum(-1).reshape(col) + (y * y).sum(-1).reshape(row) - 2 * x @ y.swapaxes(-1, -2)
        return cls(x, y, square, col, row, np.empty_like(square))

    def new_sd(self, bins: Bins, bin_: np.ndarray, sign: float) -> np.ndarray:
        """``[R, M, S, S]`` standard deviation of bin ``bin_`` (``[R, M]`` flat) after each swap, in
        ``buffer``.

        The bin's shift becomes ``D + sign * (y - x)``; its squared norm expands into small dot
        products (batched matrix-vector products: 4x faster than summed elementwise products) and
        the shared ``square``, so no ``[R, M, S, S, K]`` array is built.
        """
        rank = bins.dev.shape[-1]
        d = bins.bin_dev.reshape(-1, rank).take(bin_, axis=0)[:, :, None]  # [R, M, 1, K]
        d_t = d.swapaxes(-1, -2)
        out = np.subtract((self.y @ d_t).reshape(self.row), (self.x @ d_t).reshape(self.col), out=self.buffer)
        out *= 2 * sign
        np.add((d * d).sum(-1)[..., None], out, out=out)
        out += self.square
        np.maximum(out, 0, out=out)
        return np.sqrt(out, out=out)


def _pair_best(base: np.ndarray, excess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[R, M]`` each pair's lowest cost and its swap ``x * S + y``, from ``_pair_costs``."""
    flat = excess.reshape(*excess.shape[:2], -1)
    k = flat.argmin(-1)
    return base + np.take_along_axis(flat, k[..., None], -1)[..., 0], k


def _best_swap(bins: Bins, rows: np.ndarray, src_bin: np.ndarray, movable: np.ndarray | None = None):
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


def _swap(bins: Bins, rows: np.ndarray, i: np.ndarray, j: np.ndarray) -> None:
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


def repair(bins: Bins, keep_peak: bool = False) -> None:
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
            movable &= cost <= bins.load(todo).max(1) * (1 + EPS)
        # A row whose first crowded bin cannot give a replica is done: the sizes (or, with
        # keep_peak, the loads) force the duplicate.
        todo, i, j = todo[movable], i[movable], j[movable]
        if len(todo) == 0:
            return
        _swap(bins, todo, i, j)


def _pair_step(bins: Bins, rows: np.ndarray) -> np.ndarray:
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
    better = best < np.take_along_axis(load, heavy, 1) * (1 - EPS)
    r, h = better.nonzero()
    if len(r):
        _swap(bins, rows[r], heavy[r, h] * s + k[r, h] // s, light[r, h] * s + k[r, h] % s)
    # Only a lower peak counts: pairs below it may keep trading without helping.
    return bins.load(rows).max(1) < peak * (1 - EPS)


def improve(bins: Bins) -> None:
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
        better = cost < load[np.arange(len(stalled)), top] * (1 - EPS)
        active = np.setdiff1d(active, stalled[~better], assume_unique=True)
        _swap(bins, stalled[better], i[better], j[better])

