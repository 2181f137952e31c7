"""eplb: expert-parallel load balancing for Mixture-of-Experts inference.

The planner (``plan``, ``Placement``, the metrics and the file readers and writers) runs on any
machine; the runtime pieces (``ExpertLoadRecorder``, ``WaterfillBalancer``, ``eplb.dispatch``) use
Triton kernels on CUDA devices and plain torch elsewhere, and are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from eplb.algorithms.deepseek import rebalance_experts
from eplb.algorithms.engine import EngineConfig
from eplb.algorithms.migration import MigrationCost, migration_cost
from eplb.errors import EplbError
from eplb.metrics import BalanceReport, evaluate, lower_bound
from eplb.placement import Placement
from eplb.planner import plan

__version__ = "0.1.0"

_LAZY = {
    "ExpertLoadRecorder": "eplb.stats.recorder",
    "WaterfillBalancer": "eplb.waterfill",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eplb' has no attribute {name!r}")


__all__ = [
    "BalanceReport",
    "EngineConfig",
    "EplbError",
    "ExpertLoadRecorder",
    "MigrationCost",
    "Placement",
    "WaterfillBalancer",
    "evaluate",
    "lower_bound",
    "migration_cost",
    "plan",
    "rebalance_experts",
]
