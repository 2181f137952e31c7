"""The load profile of the hedged plan: what each expert's load is likely to be, and how many
replicas that earns it.

From a history ``[T, L, E]`` (oldest window first): a recency-weighted mean share ``mu`` of each
expert, a ``spread`` whose outer product is the covariance of the shares over the windows, and the
replica counts that minimise the heaviest replica of ``mu + risk * sd``. Every step is vectorised
over layers, in numpy (small arrays, where torch's per-call cost would dominate).
"""

from __future__ import annotations

import numpy as np

# Principal directions of the load shift kept per layer: bounds the cost of a long history
# while keeping nearly all of its variance (window-to-window shifts are low rank).
_MAX_RANK = 16


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
    # The slots left go to the heaviest replicas with room, one per expert per round. Usually one
    # round (experts tied at t); more when the threshold cannot reach them: experts without load
    # stay at one replica for every t > 0, and a huge load range outlasts the bisection.
    for _ in range(max_replicas):
        left = num_slots - counts.sum(1, keepdims=True)  # [L, 1]
        if not left.any():
            break
        room = counts < max_replicas
        relief = np.where(room, weight / counts, -1.0)
        order = np.argsort(-relief, axis=1, kind="stable")
        extra = (np.arange(num_experts) < left) & np.take_along_axis(room, order, 1)
        np.put_along_axis(counts, order, np.take_along_axis(counts, order, 1) + extra, 1)
    return counts.astype(np.int64)


def replica_experts(counts: np.ndarray) -> np.ndarray:
    """``[L, P]`` the logical expert of each replica, an expert's ``counts`` replicas together."""
    num_layers, num_experts = counts.shape
    return np.repeat(np.tile(np.arange(num_experts), num_layers), counts.ravel()).reshape(num_layers, -1)


def replica_loads(phy2log: np.ndarray, counts: np.ndarray, mean: np.ndarray, spread: np.ndarray):
    """Mean load ``[L, P]`` and shift ``[L, P, K]`` of the replica in each slot of ``phy2log``:
    its expert's ``mean`` and ``spread`` split evenly over the expert's ``counts`` replicas."""
    c = np.take_along_axis(counts, phy2log, 1).astype(np.float64)
    dev = spread[np.arange(len(phy2log))[:, None], phy2log] / c[..., None]
    return np.take_along_axis(mean, phy2log, 1) / c, dev

