"""What a rebalance moves, and the checks of ``eplb.plan(current=..., max_moves=...)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eplb.cluster import Cluster, require_count
from eplb.errors import EplbError
from eplb.placement import EMPTY_SLOT, Placement, check_same_shape


@dataclass(frozen=True)
class MigrationCost:
    """What a rebalance from one placement to another moves.

    Attributes:
        changed: ``[L, P]`` bool, the slots whose logical expert changes.
        moves: ``[L]`` int64, changed slots per layer.
        total_moves: changed slots over all layers.
        bytes: weight bytes copied (``bytes_per_expert`` times the changed slots that receive an
            expert; a slot left empty copies nothing), or None when no expert size was given.
    """

    changed: torch.Tensor
    moves: torch.Tensor
    total_moves: int
    bytes: int | None


def migration_cost(current: Placement, new: Placement, bytes_per_expert: int | None = None) -> MigrationCost:
    """The moves (and bytes) a rebalance from ``current`` to ``new`` costs.

    Args:
        current: the placement now serving.
        new: the placement to switch to; same layers, experts, slots, GPUs and nodes.
        bytes_per_expert: weight bytes of one expert (DeepSeek-V3 in fp8:
            ``3 * 7168 * 2048 = 44_040_192``), or None to skip the byte count.
    """
    check_same_shape(current, new)
    if bytes_per_expert is not None:
        bytes_per_expert = require_count(
            "bytes_per_expert", bytes_per_expert,
            fix="pass the weight bytes of one expert (e.g. 3 * hidden * intermediate * bytes per parameter)",
        )
    changed = current.phy2log != new.phy2log
    moves = changed.sum(dim=1)
    filled = int((changed & (new.phy2log != EMPTY_SLOT)).sum())
    return MigrationCost(
        changed=changed,
        moves=moves,
        total_moves=int(moves.sum()),
        bytes=None if bytes_per_expert is None else filled * bytes_per_expert,
    )


def check_current(current: object, cluster: Cluster, num_layers: int, num_experts: int) -> None:
    """Raise EplbError unless ``current`` is a Placement for this many layers and experts on ``cluster``."""
    if not isinstance(current, Placement):
        raise EplbError(
            f"current must be a Placement, got {type(current).__name__}; "
            "load it with Placement.from_dict() or pass the result of an earlier eplb.plan()"
        )
    expected = {
        "num_layers": (num_layers, "the load's layer count"),
        "num_experts": (num_experts, "the load's expert count"),
        "num_slots": (cluster.num_slots, "num_slots"),
        "num_gpus": (cluster.num_gpus, "num_gpus"),
        "num_nodes": (cluster.num_nodes, "num_nodes"),
    }
    for name, (want, source) in expected.items():
        have = getattr(current, name)
        if have != want:
            raise EplbError(
                f"current placement has {name}={have} but {source} is {want}; pass the placement now serving "
                "this model on this cluster, or plan without current="
            )


def check_max_moves(max_moves: object, current: object) -> int | None:
    """``max_moves`` as an int (or None), or EplbError."""
    if max_moves is None:
        return None
    if current is None:
        raise EplbError("max_moves bounds the moves away from a current placement; pass current= as well")
    return require_count("max_moves", max_moves, minimum=0, fix="pass the slots that may change per layer, or None")
