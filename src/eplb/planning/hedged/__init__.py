"""eplb's own placement algorithm, the hedged plan (registered as ``"eplb"``).

Each step is vectorised over layers (``profile``: steps 1-2, ``nodes``: step 3, ``packing``: 4-5; this
module runs them and makes the reference check):

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
   hedged one. It may keep some of its duplicates: when more heavy replicas than GPUs exist, a
   GPU must take two of them, and the lightest such pair can be two replicas of one expert; a
   duplicate stays only where removing it would raise the peak (see ``forced_duplicates``).

A GPU's planned load is ``sum mu + risk * sd`` of the replicas it holds, where ``sd`` is the
standard deviation of their summed share over the windows: correlated experts are spread,
anti-correlated ones may share a GPU. With one window (or ``risk = 0``) it is the plain load,
and the hedged plan is a tight in-sample balancer.
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
from eplb.planning.hedged.nodes import group_homes, split_nodes
from eplb.planning.hedged.packing import EPS, Bins, bins_of, deal, improve, repair
from eplb.planning.hedged.profile import load_profile, replica_counts, replica_experts, replica_loads


@dataclass(frozen=True)
class HedgedConfig:
    """Knobs of the hedged plan (algorithm ``"eplb"``); the defaults are principled, not fitted to any data set.

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
            raise EplbError(
                f"risk must be a finite number >= 0, got {self.risk!r}; use e.g. 1.0 (0 plans for the mean)"
            )
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


def forced_duplicates(num_experts: int, cluster: Cluster) -> int:
    """Replicas per layer that the slot counts force to share a GPU with their expert.

    A GPU with ``S = P / G`` slots holds at most ``E`` distinct experts, so ``S > E`` forces
    ``S - E`` duplicates on every GPU (the hedged plan may then place a few more, allowing up to
    ``ceil(S / E)`` replicas of an expert per GPU).

    The loads can force more: when more replicas heavier than half a GPU's fair load exist
    than GPUs, one GPU takes two of them, and two replicas of one expert can be the lightest
    such pair. The hedged plan keeps such a load-forced duplicate only on a layer where DeepSeek's
    plan with it, after the hedged search, has a lower peak than the duplicate-free hedged
    plan, and only where moving it would raise the peak (``HedgedConfig.allow_duplicates``
    turns this off); ``eplb.metrics.duplicates`` counts the duplicates of a placement.
    """
    return cluster.num_gpus * max(0, cluster.slots_per_gpu - num_experts)


def plan_hedged(load: torch.Tensor, cluster: Cluster, config: HedgedConfig = HedgedConfig()) -> torch.Tensor:
    """Plan replica counts and their GPUs for every layer.

    Args:
        load: ``[T, L, E]`` float64 history of expert loads, oldest window first (``T = 1``
            for a single snapshot); every layer carries some load.
        cluster: the cluster: ``G`` GPUs, ``P`` slots (a multiple of ``G``, ``>= E``), ``N`` nodes,
            and the router's groups (used for ``locality`` when they divide evenly over nodes).
        config: the knobs of the hedged plan.

    Returns:
        phy2log ``[L, P]`` int64.
    """
    _, num_layers, num_experts = load.shape
    mean, spread = load_profile(load, config.half_life)
    limit = -(-cluster.slots_per_gpu // num_experts)  # > 1 only when S > E forces duplicates
    sd = np.linalg.norm(spread, axis=-1)
    counts = replica_counts(mean + config.risk * sd, cluster.num_slots, limit * cluster.num_gpus)
    expert = replica_experts(counts)
    mu, dev = replica_loads(expert, counts, mean, spread)
    if cluster.num_nodes == 1:
        bins = deal(expert, mu, dev, cluster.num_gpus, num_experts, limit, config.risk)
        repair(bins)
        improve(bins)
        return torch.from_numpy(_at_least_reference(bins, load, cluster, mean, spread, config))
    groups = cluster.num_groups
    home = None
    if groups is not None and groups % cluster.num_nodes == 0 and num_experts % groups == 0 and config.locality > 0:
        home = group_homes(mean, groups, cluster.num_nodes)
    expert, mu, dev, fixed = split_nodes(expert, mu, dev, counts, home, cluster, config.risk, config.locality)
    # Pack each node's GPUs, then let free replicas also cross nodes to even out the nodes.
    per_node = cluster.num_slots // cluster.num_nodes
    local = deal(expert.reshape(-1, per_node), mu.reshape(-1, per_node),
                 dev.reshape(num_layers * cluster.num_nodes, per_node, -1),
                 cluster.gpus_per_node, num_experts, limit, config.risk, fixed.reshape(-1, per_node))
    repair(local)
    bins = Bins(
        expert=local.expert.reshape(num_layers, -1), mu=local.mu.reshape(num_layers, -1),
        dev=local.dev.reshape(num_layers, cluster.num_slots, -1),
        bin_mu=local.bin_mu.reshape(num_layers, -1), bin_dev=local.bin_dev.reshape(num_layers, cluster.num_gpus, -1),
        held=local.held.reshape(num_layers, cluster.num_gpus, -1), limit=np.full((num_layers, num_experts), limit),
        slots_per_bin=cluster.slots_per_gpu, risk=local.risk, fixed=local.fixed.reshape(num_layers, -1),
        bins_per_node=cluster.gpus_per_node,
    )
    improve(bins)
    # No reference check here: DeepSeek's global plan ignores nodes and groups, so it would undo
    # both the pins (locality) and the spreading of an expert's replicas over distinct nodes.
    return torch.from_numpy(bins.expert)


def _at_least_reference(bins: Bins, load: torch.Tensor, cluster: Cluster, mean: np.ndarray, spread: np.ndarray,
                        config: HedgedConfig) -> np.ndarray:
    """``bins.expert``, except on layers where DeepSeek's greedy plans a lower peak.

    Swaps from one start can stall above what LPT finds, so on the layers where the reference
    plan beats ours, it is freed of its duplicates, improved by the same search, and kept if
    it is still better. Where the reference's own plan, duplicates included, still beats both,
    its duplicates are load-forced as far as this search can tell: with
    ``config.allow_duplicates`` it is improved with them (never adding any), every duplicate
    that can move without raising the peak moves, and it is kept if still better. With plain
    loads (no spread), a layer whose peak already meets the lower bound
    ``max(mean GPU load, heaviest replica)`` is left alone.
    """
    peak = bins.load().max(1)
    rows = np.arange(len(peak))
    if bins.risk == 0:
        bound = np.maximum(mean.sum(1) / cluster.num_gpus, bins.mu.max(1))
        rows = np.flatnonzero(peak > bound * (1 + 1e-9))
        if len(rows) == 0:
            return bins.expert
    ref = deepseek.GLOBAL.fn(load[:, torch.from_numpy(rows)], cluster).numpy()
    num_experts = mean.shape[1]
    counts = np.zeros((len(rows), num_experts), dtype=np.int64)
    np.add.at(counts, (np.arange(len(rows))[:, None], ref), 1)
    mu, dev = replica_loads(ref, counts, mean[rows], spread[rows] if bins.risk else spread[rows, :, :0])
    rival = bins_of(ref, mu, dev, cluster.num_gpus, num_experts, bins.limit[rows], bins.risk)
    # Search from the reference only where its plan beats ours: elsewhere it has already lost.
    raw_peak = rival.load().max(1)
    keep = raw_peak < peak[rows] * (1 - EPS)
    rows, raw_peak, rival = rows[keep], raw_peak[keep], rival.select(np.flatnonzero(keep))
    base = rival.limit
    free = rival.select(np.arange(len(rows)))
    repair(free)
    improve(free)
    out = bins.expert.copy()
    best = np.minimum(peak[rows], free.load().max(1))
    better = free.load().max(1) < peak[rows] * (1 - EPS)
    out[rows[better]] = free.expert[better]
    forced = np.flatnonzero(raw_peak < best * (1 - EPS))
    if config.allow_duplicates and len(forced):
        dup = rival.select(forced)
        dup.limit = np.maximum(base[forced], dup.held.max(1))
        improve(dup)
        dup.limit = base[forced]
        repair(dup, keep_peak=True)
        better = dup.load().max(1) < best[forced] * (1 - EPS)
        out[rows[forced[better]]] = dup.expert[better]
    return out


HEDGED = Algorithm(
    name="eplb",
    fn=plan_hedged,
    summary="eplb's own: replica counts hedged for load shifts, node- and duplicate-aware packing, swap search",
    config_type=HedgedConfig,
)

__all__ = [
    "HEDGED",
    "HedgedConfig",
    "forced_duplicates",
    "group_homes",
    "load_profile",
    "plan_hedged",
    "replica_counts",
]
