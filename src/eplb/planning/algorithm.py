"""What every placement algorithm is: a pure function from loads to ``phy2log``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from eplb.cluster import Cluster

# load [T, L, E] float64 (non-negative, every layer with some load) -> phy2log [L, P] int64
PlanFn = Callable[[torch.Tensor, Cluster], torch.Tensor]
# Raises EplbError when the algorithm cannot serve this cluster for E experts.
CheckFn = Callable[[Cluster, int], None]


def _no_check(cluster: Cluster, num_experts: int) -> None:
    return None


@dataclass(frozen=True)
class Algorithm:
    """A registered placement algorithm.

    Attributes:
        name: the name users pass as ``algorithm=``.
        fn: the pure planning function (see ``PlanFn``).
        summary: what it is, in one line (``eplb compare`` lists it under its table).
        uses_load: False for static layouts that ignore the load (``eplb compare`` marks them).
        check: extra validation of the cluster beyond the common checks.
        config_type: the dataclass of the algorithm's knobs, if it has any; ``fn`` then also
            takes ``config=`` (``eplb.plan(..., config=...)`` passes it through).
    """

    name: str
    fn: PlanFn
    summary: str
    uses_load: bool = True
    check: CheckFn = _no_check
    config_type: type | None = None
