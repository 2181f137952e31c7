"""Migration-aware planning: reach a new placement while moving few expert weights.

A rebalance copies the weights of every slot whose logical expert changes (a *move*), and
serving stalls while it does. Two tools bound that cost:

- :func:`align` re-labels an ideal placement so that as many slots as possible keep their
  expert: GPUs (within nodes) and slots (within GPUs) are interchangeable for balance, so
  the target's GPUs are matched to the current GPUs (an assignment problem) and each expert
  that stays on a GPU keeps its slot;
- :func:`move_within_budget` finds a placement at most ``k`` moves per layer away from the
  current one, greedily buying the largest max-GPU-load reduction per move.

:func:`migration_cost` counts the moves (and bytes) between two placements.
"""

from __future__ import annotations

import torch

from eplb.placement import Placement, check_same_shape
from eplb.planning.migration.align import align
from eplb.planning.migration.budget import move_within_budget
from eplb.planning.migration.cost import MigrationCost, check_current, check_max_moves, migration_cost


def migrate(current: Placement, target: Placement, load: torch.Tensor, max_moves: int | None) -> Placement:
    """The placement to switch to from ``current``, given the ideal ``target``.

    Args:
        current: the placement now serving.
        target: the ideal placement for ``load`` (any algorithm); same shape as ``current``.
        load: ``[L, E]`` or ``[T, L, E]`` (summed over ``T``) expert loads, as recorded: layers
            without load keep their current row, since no move there can improve anything measured.
        max_moves: the most slots changed per layer, or None for the aligned ``target``.
    """
    check_same_shape(current, target)
    load = load.sum(0) if load.ndim == 3 else load
    aligned = align(current.phy2log, target.phy2log, current.num_gpus, current.num_nodes)
    if max_moves is None:
        out, name = aligned, target.algorithm
    else:
        out = move_within_budget(current.phy2log, aligned, load, current.num_gpus, max_moves)
        name = f"{target.algorithm} (max_moves={max_moves})"
    unloaded = load.sum(1) == 0
    out = torch.where(unloaded[:, None], current.phy2log, out)
    return Placement(out, current.num_experts, current.num_gpus, current.num_nodes, algorithm=name)


__all__ = [
    "MigrationCost",
    "align",
    "check_current",
    "check_max_moves",
    "migrate",
    "migration_cost",
    "move_within_budget",
]
