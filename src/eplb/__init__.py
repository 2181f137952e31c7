"""eplb: expert-parallel load balancing for Mixture-of-Experts inference.

The planner (``plan``, ``Placement``, the metrics and the file readers and writers) runs on any
machine; the runtime pieces (``ExpertLoadRecorder``, ``WaterfillBalancer``, ``eplb.runtime.dispatch``) use
Triton kernels on CUDA devices and plain torch elsewhere, and are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from eplb import traffic  # noqa: F401  (eplb.traffic.expected_remote_nodes works after `import eplb`)
from eplb._version import __version__ as __version__
from eplb.errors import EplbError
from eplb.metrics import BalanceReport, evaluate, lower_bound
from eplb.placement import Placement
from eplb.planning.deepseek import rebalance_experts
from eplb.planning.hedged import HedgedConfig
from eplb.planning.migration import MigrationCost, migration_cost
from eplb.planning.planner import plan

# The 0.1.0 name of HedgedConfig, kept so that code written against it still runs.
EngineConfig = HedgedConfig

_LAZY = {
    "ExpertLoadRecorder": "eplb.runtime.recorder",
    "WaterfillBalancer": "eplb.runtime.waterfill",
    "simulate": "eplb.simulation",
    "WaterfillConfig": "eplb.runtime.waterfill",
    "Rebalancer": "eplb.runtime.rebalancer",
    "RebalancerConfig": "eplb.runtime.rebalancer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eplb' has no attribute {name!r}")


__all__ = [
    "BalanceReport",
    "HedgedConfig",
    "EngineConfig",
    "EplbError",
    "ExpertLoadRecorder",
    "MigrationCost",
    "Placement",
    "Rebalancer",
    "RebalancerConfig",
    "WaterfillBalancer",
    "WaterfillConfig",
    "evaluate",
    "lower_bound",
    "migration_cost",
    "plan",
    "rebalance_experts",
    "simulate",
]
