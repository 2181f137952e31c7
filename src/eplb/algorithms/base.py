"""What every placement algorithm is: a pure function from loads to ``phy2log``."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable, Optional

import torch

from eplb.errors import EplbError


def is_count(value: Any, minimum: int = 1) -> bool:
    """Whether ``value`` is an integer ``>= minimum``: numpy and torch integers count, bool does not
    (``True`` would silently mean 1)."""
    return isinstance(value, Integral) and not isinstance(value, bool) and int(value) >= minimum


@dataclass(frozen=True)
class PlanSpec:
    """The cluster a placement is planned for.

    Args:
        num_gpus: ``G``, GPUs in the expert-parallel group.
        num_slots: ``P``, physical expert slots over all GPUs (``P - E`` are redundant).
        num_nodes: ``N``, nodes; GPUs of one node share a fast link (NVLink).
        num_groups: expert groups of the router (DeepSeek-V3: 8), or None.
    """

    num_gpus: int
    num_slots: int
    num_nodes: int = 1
    num_groups: Optional[int] = None

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes


# load [T, L, E] float64 (non-negative, every layer with some load) -> phy2log [L, P] int64
PlanFn = Callable[[torch.Tensor, PlanSpec], torch.Tensor]
# Raises EplbError when the algorithm cannot serve this spec for E experts.
CheckFn = Callable[[PlanSpec, int], None]


def _no_check(spec: PlanSpec, num_experts: int) -> None:
    return None


@dataclass(frozen=True)
class Algorithm:
    """A registered placement algorithm.

    Attributes:
        name: the name users pass as ``algorithm=``.
        fn: the pure planning function (see ``PlanFn``).
        summary: one line for ``eplb compare`` and the docs.
        uses_load: False for static layouts that ignore the load.
        check: extra validation of the spec beyond the common checks.
        config_type: the dataclass of the algorithm's knobs, if it has any; ``fn`` then also
            takes ``config=`` (``eplb.plan(..., config=...)`` passes it through).
    """

    name: str
    fn: PlanFn
    summary: str
    uses_load: bool = True
    check: CheckFn = _no_check
    config_type: Optional[type] = None


def require_groups(spec: PlanSpec, num_experts: int) -> int:
    """The group count of a group-aware (hierarchical) policy, validated."""
    if spec.num_groups is None:
        raise EplbError(
            "hierarchical placement needs the router's expert-group count; pass num_groups "
            "(--groups; DeepSeek-V3 uses 8) or use the global policy"
        )
    if spec.num_groups % spec.num_nodes != 0:
        raise EplbError(
            f"{spec.num_groups} expert groups cannot be split evenly over {spec.num_nodes} nodes; "
            "use a group count that is a multiple of the node count, or the global policy"
        )
    return spec.num_groups
