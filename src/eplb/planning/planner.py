"""``eplb.plan``: validate, pick an algorithm, run it, wrap the result in a ``Placement``."""

from __future__ import annotations

from typing import Any

import torch

from eplb.cluster import Cluster, check_cluster, check_model
from eplb.errors import EplbError
from eplb.loads import as_history, dense_layers, normalized
from eplb.metrics import mean_max_over_mean
from eplb.placement import Placement
from eplb.planning import migration, registry
from eplb.planning.algorithm import Algorithm


def plan(
    load: Any,
    *,
    num_gpus: int,
    num_slots: int,
    num_nodes: int = 1,
    num_groups: int | None = None,
    algorithm: str = "auto",
    current: Placement | None = None,
    max_moves: int | None = None,
    config: Any = None,
) -> Placement:
    """Plan replication and placement of experts.

    Args:
        load: ``[L, E]`` expert loads (tokens routed to each logical expert) or a history
            ``[T, L, E]`` (recorder windows, oldest first). Layers without any load (dense layers)
            are planned as if every expert had the same load, and keep their row.
        num_gpus: ``G``, GPUs of the expert-parallel group.
        num_slots: ``P``, physical slots over all GPUs; a multiple of ``G`` and ``>= E``.
        num_nodes: ``N``, nodes; a divisor of ``G``.
        num_groups: the router's expert groups (needed by the hierarchical policies).
        algorithm: a name from ``eplb.planning.names()``, or ``"auto"``: every candidate that
            supports the cluster is run and the one with the lowest max/mean GPU load on ``load``
            wins, averaged over layers and over the steps of a history (a step waits for its
            slowest GPU, so each step is scored on its own); ties go to the earlier candidate
            in ``eplb.planning.AUTO_ORDER``.
        current: the placement now serving (same layers, experts, slots, GPUs and nodes). The
            planned placement is re-labelled (GPUs within nodes, slots within GPUs: balance is
            unchanged) to keep as many slots as possible holding the same expert. Layers without
            load keep their current row.
        max_moves: with ``current``, the most slots per layer whose expert may change (each
            copies one expert's weights): the result is the most balanced placement found within
            that budget, never worse than ``current`` on ``load``; ``0`` returns ``current``.
            None: no bound. See ``eplb.planning.migration.migration_cost`` to count moves.
        config: the knobs of an algorithm that has some (e.g. ``HedgedConfig`` of ``"eplb"``);
            with ``"auto"`` it goes to the candidate it belongs to.

    Returns:
        A ``Placement`` with ``phy2log [L, P]``; its ``algorithm`` names the algorithm used.
    """
    history = as_history(load)
    check_model(history.shape[1], history.shape[2])
    history = normalized(history)  # exact scaling: plans depend on ratios only
    cluster = Cluster(num_gpus=num_gpus, num_slots=num_slots, num_nodes=num_nodes, num_groups=num_groups)
    num_experts = history.shape[-1]
    check_cluster(cluster, num_experts)
    if current is not None:
        migration.check_current(current, cluster, num_layers=history.shape[1], num_experts=num_experts)
    max_moves = migration.check_max_moves(max_moves, current)
    filled = _fill_dense_layers(history)
    if algorithm == "auto":
        target = _plan_auto(filled, cluster, config)
    else:
        algo = registry.get(algorithm)
        algo.check(cluster, num_experts)
        if config is not None and not _takes(algo, config):
            raise EplbError(
                f"algorithm {algo.name!r} takes no {type(config).__name__}; pass config only with "
                f"the algorithm it belongs to ({_owners(config)})"
            )
        target = _run(algo, filled, cluster, config)
    if current is None:
        return target
    return migration.migrate(current, target, history, max_moves)


def _fill_dense_layers(history: torch.Tensor) -> torch.Tensor:
    dense = dense_layers(history)
    if not dense.any():
        return history
    # With no load recorded every expert is equally likely: plan for a uniform load.
    return torch.where(dense[None, :, None], 1.0, history)


def _takes(algo: Algorithm, config: Any) -> bool:
    return algo.config_type is not None and isinstance(config, algo.config_type)


def _owners(config: Any) -> str:
    owners = [a.name for a in registry.ALGORITHMS.values() if _takes(a, config)]
    return ", ".join(owners) or "none"


def _run(algo: Algorithm, history: torch.Tensor, cluster: Cluster, config: Any = None) -> Placement:
    phy2log = algo.fn(history, cluster) if config is None else algo.fn(history, cluster, config=config)
    return Placement(phy2log, num_experts=history.shape[-1], num_gpus=cluster.num_gpus,
                     num_nodes=cluster.num_nodes, algorithm=algo.name)


def auto_score(placement: Placement, history: torch.Tensor) -> float:
    """What ``algorithm="auto"`` minimises: max/mean GPU load averaged over loaded layers and steps."""
    return mean_max_over_mean(placement.gpu_load(history))  # gpu_load: [T, L, G]


def _plan_auto(history: torch.Tensor, cluster: Cluster, config: Any) -> Placement:
    if config is not None and not any(_takes(registry.get(n), config) for n in registry.AUTO_ORDER):
        raise EplbError(
            f"no candidate of algorithm='auto' takes a {type(config).__name__}; name its algorithm "
            f"({_owners(config)}) instead"
        )
    best: Placement | None = None
    best_score = float("inf")
    for name in registry.AUTO_ORDER:
        algo = registry.get(name)
        try:
            algo.check(cluster, history.shape[-1])
        except EplbError:
            continue
        candidate = _run(algo, history, cluster, config if _takes(algo, config) else None)
        score = auto_score(candidate, history)
        if best is None or score < best_score:
            best, best_score = candidate, score
    if best is None:
        raise EplbError(f"no candidate of algorithm='auto' ({', '.join(registry.AUTO_ORDER)}) supports this "
                        "cluster; name an algorithm (see eplb.planning.names())")
    return best
