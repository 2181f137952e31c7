"""Replica weights that even out GPU loads: the LP behind ``WeightedDispatch``.

Per layer, with expert loads ``w_e`` and a fixed placement, choose split fractions
``p[e, x] >= 0`` (``sum_x p[e, x] = 1``) over each expert's replicas to minimise the largest
GPU load ``y_g = sum of w_e * p[e, x] over replicas x on GPU g``. It is a flow problem, so no
LP solver is needed:

1. Smooth: block coordinate descent on ``sum_g y_g**2`` from the even split. One expert at a
   time, its load is water-filled over the GPUs of its replicas given everyone else's load
   (vectorised over layers). No step raises the max GPU load, and the fixed point (every expert
   feeds only its least-loaded replicas) is the most even split, but it converges slowly along
   chains of shared experts.
2. Certify: any set ``H`` of GPUs must carry the experts with every replica in ``H``, so
   ``max_H w(inside H) / |H|`` is a lower bound on the optimum; the prefixes of the GPUs sorted
   by load give the candidate sets. A layer whose max load meets the bound is done.
3. Finish (exact, per remaining layer): cap every GPU at the bound ``T``, take the excess off the
   over-full GPUs and route it back through augmenting paths (expert -> GPU -> an expert that
   feeds that GPU -> ...). When no path is left, the reachable GPUs and experts form a set
   whose load proves a higher bound; raise ``T`` to it and go on (Dinkelbach's method on the
   max-density set). It ends at the LP optimum, changing the smoothed split only as needed.
"""

from __future__ import annotations

from typing import Any

import torch

from eplb.errors import EplbError
from eplb.loads import as_history, normalized
from eplb.placement import Placement


def solve_weights(placement: Placement, load: Any, *, sweeps: int = 4) -> torch.Tensor:
    """Per-replica dispatch weights that minimise the max GPU load for ``load``.

    Args:
        placement: the expert placement (``log2phy [L, E, X]``).
        load: ``[L, E]`` recent expert loads, or a history ``[T, L, E]`` (summed).
        sweeps: smoothing passes before the exact finish (see the module doc); more gives a more
            even split below the max, the max itself is optimal either way.

    Returns:
        ``[L, E, X]`` float64 ``probs``: the share of expert ``e``'s tokens for replica
        ``log2phy[l, e, x]`` (``0`` on padding; rows sum to 1). Experts without load, and
        layers without load, get the even split. Of several replicas on one GPU, the first
        takes that GPU's share.
    """
    if not isinstance(sweeps, int) or sweeps < 0:
        raise EplbError(f"sweeps must be a non-negative integer, got {sweeps!r}")
    w = normalized(_layer_load(placement, load))  # shares are scale-free; subnormal loads keep their precision
    log2phy = placement.log2phy
    held = log2phy >= 0
    gpu = torch.where(held, log2phy, 0) // placement.slots_per_gpu  # [L, E, X]
    # One target per GPU: a replica on a GPU that already holds the expert adds no capacity.
    same = (gpu.unsqueeze(-1) == gpu.unsqueeze(-2)) & held.unsqueeze(-1) & held.unsqueeze(-2)
    earlier = torch.ones_like(same[0, 0]).tril(-1)
    distinct = held & ~(same & earlier).any(-1)
    # Start from the even split, shares of same-GPU replicas merged.
    even = torch.where(held, (w / placement.logcnt).unsqueeze(-1), 0.0)
    z = torch.zeros_like(even).scatter_add_(-1, _first_on_gpu(same, distinct), even)
    movable = (distinct.sum(-1) > 1) & (w > 0)  # [L, E]
    _smooth(z, w, gpu, distinct, movable, placement.num_gpus, sweeps)

    y = _gpu_sum(z, gpu, placement.num_gpus)
    bound = _certified_bound(y, w, gpu, held)
    upper = y.amax(1)
    for layer in ((upper - bound) > 1e-12 * upper).nonzero().flatten().tolist():
        _finish_layer(z[layer], w[layer], gpu[layer], distinct[layer], movable[layer], y[layer], float(bound[layer]))

    probs = z / torch.where(w > 0, w, 1.0).unsqueeze(-1)
    uniform = torch.where(held, 1.0 / placement.logcnt.unsqueeze(-1), 0.0)
    return torch.where((w > 0).unsqueeze(-1), probs, uniform)


def _smooth(z, w, gpu, distinct, movable, num_gpus: int, sweeps: int) -> None:
    """Step 1 of the module doc, in place on ``z [L, E, X]`` (replica loads)."""
    y = _gpu_sum(z, gpu, num_gpus)
    order = torch.sort((~movable).to(torch.int8), dim=1, stable=True).indices  # movable first
    width = int(movable.sum(1).max())
    rows = torch.arange(z.shape[0])
    for _ in range(sweeps if width else 0):
        for j in range(width):
            e = order[:, j]
            g = gpu[rows, e]
            mask = distinct[rows, e]
            old = z[rows, e]
            new = _water_fill(y.gather(1, g) - old, mask, w[rows, e])
            new = torch.where(movable[rows, e].unsqueeze(-1) & mask, new, old)
            y.scatter_add_(1, g, new - old)
            z[rows, e] = new


def _finish_layer(z, w, gpu, distinct, movable, y, bound: float) -> None:
    """Step 3 of the module doc for one layer, in place on ``z [E, X]``; ``y [G]`` its GPU loads."""
    experts = movable.nonzero().flatten().tolist()
    sub = z[experts].tolist(), gpu[experts].tolist(), distinct[experts].tolist(), w[experts].tolist()
    slots, to_gpu, flow, weight = {}, {}, {}, {}
    for e, z_e, gpu_e, distinct_e, w_e in zip(experts, *sub, strict=False):
        slots[e] = [x for x, keep in enumerate(distinct_e) if keep]
        to_gpu[e] = [gpu_e[x] for x in slots[e]]
        flow[e] = [z_e[x] for x in slots[e]]
        weight[e] = w_e
    load = y.tolist()
    # Fixed load: experts that cannot move (one GPU) or carry nothing.
    fixed = list(load)
    for e in experts:
        for g, f in zip(to_gpu[e], flow[e], strict=False):
            fixed[g] -= f
    eps = 1e-12 * max(sum(load), 1e-300)
    target = max(bound, max(fixed))
    unrouted = dict.fromkeys(experts, 0.0)
    # Take the excess off every GPU above the target.
    for e in experts:
        for i, g in enumerate(to_gpu[e]):
            cut = min(flow[e][i], max(0.0, load[g] - target))
            flow[e][i] -= cut
            load[g] -= cut
            unrouted[e] += cut
    feeds: dict[int, list[int]] = {}
    for e in experts:
        for g in to_gpu[e]:
            feeds.setdefault(g, []).append(e)
    while True:
        sources = [e for e in experts if unrouted[e] > eps]
        if not sources:
            break
        path = _augmenting_path(sources, to_gpu, flow, feeds, load, target)
        if isinstance(path, set):
            # No path: every reachable GPU is full and only reachable experts feed them, so
            # those GPUs must carry all of those experts: a higher lower bound.
            reach_gpus = {g for e in path for g in to_gpu[e]}
            total = sum(fixed[g] for g in reach_gpus) + sum(weight[e] for e in path)
            if total / len(reach_gpus) > target:
                target = total / len(reach_gpus)
                continue
            # What is left is rounding noise: park it on the least-loaded replica.
            for e in path:
                i = min(range(len(to_gpu[e])), key=lambda k: load[to_gpu[e][k]])
                flow[e][i] += unrouted[e]
                load[to_gpu[e][i]] += unrouted[e]
                unrouted[e] = 0.0
            continue
        # Along the path each expert adds `amount` to its GPU and the next one takes it off
        # again; only the first expert's unrouted load and the last GPU's room change.
        taken = [to_gpu[nxt].index(to_gpu[e][i]) for (e, i), (nxt, _) in zip(path, path[1:], strict=False)]
        last_gpu = to_gpu[path[-1][0]][path[-1][1]]
        amount = min(
            unrouted[path[0][0]],
            target - load[last_gpu],
            *(flow[nxt][j] for (nxt, _), j in zip(path[1:], taken, strict=False)),
        )
        unrouted[path[0][0]] -= amount
        load[last_gpu] += amount
        for e, i in path:
            flow[e][i] += amount
        for (nxt, _), j in zip(path[1:], taken, strict=False):
            flow[nxt][j] -= amount
    for e in experts:
        z[e, slots[e]] = torch.tensor(flow[e], dtype=z.dtype).clamp(min=0)


def _augmenting_path(sources, to_gpu, flow, feeds, load, target):
    """BFS from the experts with unrouted load. Returns the path as ``[(expert, replica index)]``
    (each expert sends into its replica GPU, the next expert takes the same amount off that
    GPU), or the set of reachable experts when no GPU with room is reachable."""
    parent: dict[int, tuple] = {e: None for e in sources}
    queue = list(sources)
    for e in queue:
        for i, g in enumerate(to_gpu[e]):
            if load[g] < target:
                path = [(e, i)]
                while parent[path[0][0]] is not None:
                    path.insert(0, parent[path[0][0]])
                return path
            for other in feeds.get(g, ()):
                if other not in parent and flow[other][to_gpu[other].index(g)] > 0:
                    parent[other] = (e, i)
                    queue.append(other)
    return set(parent)


def split_gpu_load(placement: Placement, load: Any, probs: torch.Tensor) -> torch.Tensor:
    """``[L, G]`` GPU loads when each expert's load ``[L, E]`` is split over its replicas by
    ``probs [L, E, X]`` (``Placement.gpu_load`` is the even split)."""
    w = _layer_load(placement, load)
    held = placement.log2phy >= 0
    gpu = torch.where(held, placement.log2phy, 0) // placement.slots_per_gpu
    z = torch.where(held, w.unsqueeze(-1) * torch.as_tensor(probs, dtype=torch.float64), 0.0)
    return _gpu_sum(z, gpu, placement.num_gpus)


def _layer_load(placement: Placement, load: Any) -> torch.Tensor:
    w = as_history(load).sum(0)
    if w.shape != (placement.num_layers, placement.num_experts):
        raise EplbError(
            f"load has shape {tuple(w.shape)} but the placement is for {placement.num_layers} layers x "
            f"{placement.num_experts} experts; pass a [L, E] load that matches"
        )
    return w


def _gpu_sum(z: torch.Tensor, gpu: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``[L, G]``: replica loads ``z [L, E, X]`` summed per GPU (padding must hold 0)."""
    out = torch.zeros(z.shape[0], num_gpus, dtype=z.dtype)
    return out.scatter_add_(1, gpu.flatten(1), z.flatten(1))


def _first_on_gpu(same: torch.Tensor, distinct: torch.Tensor) -> torch.Tensor:
    """``[L, E, X]``: for each replica, the index of the expert's first replica on its GPU."""
    return (same & distinct.unsqueeze(-2)).long().argmax(-1)


def _water_fill(level: torch.Tensor, mask: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Pour ``amount [L]`` over the bins ``level [L, X]`` (where ``mask``) lowest first.

    Returns the amount per bin, ``max(0, lam - level)`` with ``lam`` the final water level:
    ``lam = min over k of (amount + sum of the k lowest levels) / k``, since for every set of
    bins ``S``, ``sum_S (lam - level) <= amount`` with equality for the filled ones.
    """
    inf = torch.finfo(level.dtype).max
    low = torch.where(mask, level, inf).sort(-1).values
    k = torch.arange(1, level.shape[-1] + 1, dtype=level.dtype)
    lam = ((amount.unsqueeze(-1) + low.cumsum(-1)) / k).nan_to_num(posinf=inf).amin(-1)
    return torch.where(mask, (lam.unsqueeze(-1) - level).clamp(min=0), 0.0)


def _certified_bound(y: torch.Tensor, w: torch.Tensor, gpu: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """``[L]``: ``max_k w(experts with every replica among the k busiest GPUs) / k``, a lower
    bound on the optimal max GPU load (any split must put those experts on those k GPUs)."""
    num_gpus = y.shape[1]
    position = torch.empty_like(y, dtype=torch.int64).scatter_(
        1, y.argsort(1, descending=True), torch.arange(num_gpus).expand_as(y).contiguous()
    )
    last = torch.where(held, position.gather(1, gpu.flatten(1)).view_as(gpu), -1).amax(-1)  # [L, E]
    inside = torch.zeros(y.shape[0], num_gpus, dtype=y.dtype).scatter_add_(1, last, w).cumsum(1)
    return (inside / torch.arange(1, num_gpus + 1, dtype=y.dtype)).amax(1)
