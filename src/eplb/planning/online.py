"""The online rebalancing decision: from the recorded load history and the placement now serving, what to
switch to, if anything.

Pure and on the CPU, so that the runtime's ``Rebalancer`` (which then moves the weights) and the simulator
(which replays recorded traffic) make the same decision from the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from eplb.cluster import require_count
from eplb.errors import EplbError
from eplb.loads import as_history
from eplb.metrics import mean_max_over_mean
from eplb.placement import Placement
from eplb.planning.planner import plan


@dataclass(frozen=True)
class OnlineConfig:
    """When and how far the online loop rebalances.

    Args:
        window: the most recent recorded windows (steps) planned from.
        max_moves: changed slots per layer per rebalance (each copies one expert's weights); None: no bound.
        min_gain: act only when the predicted time-averaged max/mean GPU load falls by at least this fraction
            (0.02: 2%), measured on the recorded windows; a smaller gain is not worth the copies.
        algorithm: the planning algorithm (``eplb.planning.names()``).
        num_groups: the router's expert groups, for the group-aware algorithms; None if it has none.
    """

    window: int = 16
    max_moves: int | None = 16
    min_gain: float = 0.02
    algorithm: str = "auto"
    num_groups: int | None = None

    def __post_init__(self) -> None:
        require_count("window", self.window, fix="pass how many recorded windows to plan from")
        if self.max_moves is not None:
            require_count("max_moves", self.max_moves, minimum=0, fix="pass changed slots per layer, or None")
        if not (isinstance(self.min_gain, (int, float)) and 0.0 <= float(self.min_gain) < 1.0):
            raise EplbError(f"min_gain must be a fraction in [0, 1), got {self.min_gain!r}; e.g. 0.02 for 2%")


@dataclass(frozen=True)
class Decision:
    """What ``decide`` found.

    Attributes:
        placement: the placement to switch to (``current`` itself when ``act`` is False).
        act: whether the predicted gain reaches ``min_gain``.
        before: predicted max/mean GPU load of ``current`` on the recent windows (averaged over steps and
            loaded layers; 1 is perfect).
        after: the same for ``placement``.
        moves: ``[L]`` int64, changed slots per layer (0 when ``act`` is False).
        plan_seconds: time spent planning.
    """

    placement: Placement
    act: bool
    before: float
    after: float
    moves: torch.Tensor
    plan_seconds: float

    @property
    def gain(self) -> float:
        """Relative drop of the predicted max/mean (0.05: 5% lower)."""
        return 1.0 - self.after / self.before


def predicted_max_over_mean(placement: Placement, history: torch.Tensor) -> float:
    """Max/mean GPU load of ``placement`` on each step of ``history [T, L, E]``, averaged over steps and
    loaded layers: a step waits for its busiest GPU, so every step is scored on its own."""
    return mean_max_over_mean(placement.gpu_load(history))  # gpu_load: [T, L, G]


def decide(history: torch.Tensor, current: Placement, config: OnlineConfig = OnlineConfig()) -> Decision:
    """Plan from the last ``config.window`` windows of ``history`` and keep the plan if it pays.

    Args:
        history: ``[T, L, E]`` logical loads per recorded window, oldest first (``[L, E]``: one window).
        current: the placement now serving (same layers and experts).
        config: see ``OnlineConfig``.

    Returns:
        A ``Decision``; the planned placement is within ``max_moves`` changed slots per layer of ``current``.
    """
    recent = as_history(history)[-config.window :]
    if recent.shape[1:] != (current.num_layers, current.num_experts):
        raise EplbError(
            f"history has {recent.shape[1]} layers x {recent.shape[2]} experts but the serving placement has "
            f"{current.num_layers} x {current.num_experts}; record the layers the placement covers"
        )
    start = time.perf_counter()
    target = plan(recent, num_gpus=current.num_gpus, num_slots=current.num_slots, num_nodes=current.num_nodes,
                  num_groups=config.num_groups, algorithm=config.algorithm, current=current,
                  max_moves=config.max_moves)
    seconds = time.perf_counter() - start
    before = predicted_max_over_mean(current, recent)
    after = predicted_max_over_mean(target, recent)
    act = after <= before * (1.0 - config.min_gain) and not torch.equal(target.phy2log, current.phy2log)
    moves = (target.phy2log != current.phy2log).sum(1) if act else torch.zeros(current.num_layers, dtype=torch.int64)
    return Decision(placement=target if act else current, act=act, before=before, after=after, moves=moves,
                    plan_seconds=seconds)
