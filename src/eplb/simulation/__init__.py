"""Simulation: replay expert-load scenarios through balancing policies and estimate what each costs in step time.

- ``build`` / ``replay`` (``scenarios``): ``[T, L, E]`` per-step loads from real per-workload loads (phases,
  abrupt or gradual switches, bursts, sampled at a number of tokens per step) or a recorded series as is;
- ``simulate``: every policy (``static``, ``periodic``, ``eplb``, ``oracle``, ``step_oracle``, or a callable)
  over a scenario; per step and layer: max/mean GPU load, tokens and activated experts per GPU, MoE time;
- ``CostModel`` (``cost``): grouped-GEMM time from a table measured on a GPU (``benchmarks/bench_gemm_cost.py``),
  dispatch/combine and weight copies from bytes per link.
"""

from eplb.simulation.cost import CostModel, GemmTable
from eplb.simulation.policies import Action, Context, Online, Oracle, Periodic, Static, StepOracle
from eplb.simulation.results import PolicyRun, SimResult
from eplb.simulation.scenarios import Burst, Scenario, build, replay
from eplb.simulation.simulator import simulate

__all__ = [
    "Action",
    "Burst",
    "Context",
    "CostModel",
    "GemmTable",
    "Online",
    "Oracle",
    "Periodic",
    "PolicyRun",
    "Scenario",
    "SimResult",
    "Static",
    "StepOracle",
    "build",
    "replay",
    "simulate",
]
