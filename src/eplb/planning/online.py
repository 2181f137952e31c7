"""The online rebalancing decision: from the recorded load history and the placement now serving, what to
switch to, if anything.

Pure and on the CPU, so that the runtime's ``Rebalancer`` (which then moves the weights) and the simulator
(which replays recorded traffic) make the same decision from the same numbers:

1. which windows: the last ``window`` recorded windows, cut at a workload shift (``same_workload``): the plan
   and its gain are measured on the current workload only, so old windows cannot outvote it;
2. whether to plan at all: not on fewer than ``min_windows`` windows of the current workload (one window
   would fit its own sampling noise), nor when the per-window lower bound on max/mean
   (``lower_bound_max_over_mean``) shows that no placement could gain ``min_gain``;
3. the plan, within ``max_moves`` changed slots per layer, kept only if it gains ``min_gain``; its layers
   land largest predicted gain first (``Decision.order``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from eplb.cluster import require_count
from eplb.errors import EplbError
from eplb.loads import as_history
from eplb.metrics import balancedness, lower_bound, mean_max_over_mean
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
        shift_noise: a window whose expert shares differ from the newest window's by more than this many times
            the usual window-to-window difference belongs to an earlier workload (see ``same_workload``); the
            plan uses the windows after the last such one. None: no shift detection, plan from all ``window``.
        min_windows: the fewest windows of the current workload to plan from (at most ``window``): a plan
            fitted to one window fits that window's sampling noise too.
    """

    window: int = 16
    max_moves: int | None = 16
    min_gain: float = 0.02
    algorithm: str = "auto"
    num_groups: int | None = None
    shift_noise: float | None = 1.5
    min_windows: int = 2

    def __post_init__(self) -> None:
        require_count("window", self.window, fix="pass how many recorded windows to plan from")
        if self.max_moves is not None:
            require_count("max_moves", self.max_moves, minimum=0, fix="pass changed slots per layer, or None")
        if not (isinstance(self.min_gain, (int, float)) and 0.0 <= float(self.min_gain) < 1.0):
            raise EplbError(f"min_gain must be a fraction in [0, 1), got {self.min_gain!r}; e.g. 0.02 for 2%")
        if self.shift_noise is not None and not (isinstance(self.shift_noise, (int, float)) and self.shift_noise > 0):
            raise EplbError(f"shift_noise must be a positive multiple of the usual window-to-window difference, "
                            f"got {self.shift_noise!r}; e.g. 1.5, or None to plan across shifts")
        require_count("min_windows", self.min_windows, fix="pass the fewest windows to plan from, e.g. 2")


@dataclass(frozen=True)
class Decision:
    """What ``decide`` found.

    Attributes:
        placement: the placement to switch to (``current`` itself when ``act`` is False).
        act: whether the predicted gain reaches ``min_gain``.
        before: predicted max/mean GPU load of ``current`` on the current workload's windows (averaged over
            steps and loaded layers; 1 is perfect).
        after: the same for ``placement``.
        moves: ``[L]`` int64, changed slots per layer (0 when ``act`` is False).
        plan_seconds: time spent planning.
        windows: the windows of the current workload it planned from (0: not made by ``decide``).
        floor: the lower bound on max/mean over those windows (``lower_bound_max_over_mean``).
        planned: False when it did not plan (too few windows, or the lower bound rules out ``min_gain``).
        gains: ``[L]`` predicted drop of each layer's max/mean (None when it does not act).
    """

    placement: Placement
    act: bool
    before: float
    after: float
    moves: torch.Tensor
    plan_seconds: float
    windows: int = 0
    floor: float = 1.0
    planned: bool = True
    gains: torch.Tensor | None = None

    @property
    def gain(self) -> float:
        """Relative drop of the predicted max/mean (0.05: 5% lower)."""
        return 1.0 - self.after / self.before

    @property
    def order(self) -> torch.Tensor:
        """The changed layers, in the order to land them: largest predicted gain first (layer order when
        ``gains`` is unknown), so the layers still waiting cost the least."""
        layers = self.moves.nonzero().flatten()
        if self.gains is None:
            return layers
        return layers[torch.argsort(self.gains[layers], descending=True, stable=True)]


def predicted_max_over_mean(placement: Placement, history: torch.Tensor) -> float:
    """Max/mean GPU load of ``placement`` on each step of ``history [T, L, E]``, averaged over steps and
    loaded layers: a step waits for its busiest GPU, so every step is scored on its own."""
    return mean_max_over_mean(placement.gpu_load(history))  # gpu_load: [T, L, G]


def lower_bound_max_over_mean(history: torch.Tensor, num_gpus: int, num_slots: int) -> float:
    """The mean over windows and loaded layers of ``eplb.metrics.lower_bound`` over the mean GPU load, for
    ``history [T, L, E]``: no placement of ``num_slots`` slots on ``num_gpus`` GPUs scores lower than this
    under ``predicted_max_over_mean`` (1.0 with no load)."""
    total = history.sum(-1)  # [T, L]
    bound = lower_bound(history.flatten(0, 1), num_gpus, num_slots).view_as(total)
    loaded = total > 0
    ratio = bound / torch.where(loaded, total / num_gpus, 1.0)
    return float(ratio[loaded].mean()) if bool(loaded.any()) else 1.0


def _mean_over_layers(tv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, tv, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)


def _distance(share: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Total variation between expert shares ``share [..., L, E]`` and ``other``, mean over the layers
    ``mask [..., L]`` marks loaded."""
    return _mean_over_layers(0.5 * (share - other).abs().sum(-1), mask)


# Rows of the window whose differences to the newest step are taken at a time: the whole window's
# difference ([window, L, E]) does not stay in the cache between its subtraction and its sum.
_ROWS_AT_ONCE = 4


def _distances(share: torch.Tensor, other: torch.Tensor, mask: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``_distance(share, other, mask)`` for a stack ``share [n, L, E]``, ``scratch.shape[0]`` rows at a time
    through ``scratch [k, L, E]`` (the same numbers: each row's sum is its own)."""
    sums = share.new_empty(share.shape[:-1])
    k = scratch.shape[0]
    for i in range(0, share.shape[0], k):
        part = share[i : i + k]
        torch.sum(torch.sub(part, other, out=scratch[: part.shape[0]]).abs_(), -1, out=sums[i : i + k])
    return _mean_over_layers(0.5 * sums, mask)


class ShiftDetector:
    """``same_workload`` over a sliding window, step by step: each step's expert shares, loaded layers and
    distance to the step before are kept as the steps arrive, so a new step costs one pass over the window
    (the distances to the newest step) instead of re-scoring it. It makes the same float64 arithmetic on the
    same values as ``same_workload`` (which runs one), so the two give the same run length.

    Args:
        bound: the most recent steps looked at (``OnlineConfig.window``).
        noise: ``OnlineConfig.shift_noise``.
    """

    def __init__(self, bound: int, noise: float) -> None:
        self.bound, self.noise = bound, noise
        self.count = 0  # steps pushed since the last reset
        self._share: torch.Tensor | None = None  # [bound, L, E] ring of shares, step k in row k % bound
        self._loaded: torch.Tensor | None = None  # [bound, L] ring of loaded layers
        self._scratch: torch.Tensor | None = None  # [_ROWS_AT_ONCE, L, E] for the distances to the newest step
        self._step = [0.0] * bound  # each row's distance to the step before it

    def push(self, steps: torch.Tensor) -> int:
        """Append ``steps [n, L, E]`` (loads, oldest first; n >= 1) and return how many of the newest
        ``bound`` steps look like one workload: ``same_workload`` of them."""
        steps = steps[-self.bound :]
        n, cap = steps.shape[0], self.bound
        total = steps.sum(-1, keepdim=True)
        share = steps / total.clamp(min=1e-300)
        loaded = total.squeeze(-1) > 0  # [n, L]
        if n == cap or self._share is None or self._share.shape[1:] != share.shape[1:] \
                or self._share.dtype != share.dtype:
            # The block fills the window: no step before it counts.
            self.count = 0
            self._share = torch.empty(cap, *share.shape[1:], dtype=share.dtype)
            self._loaded = torch.empty(cap, share.shape[1], dtype=torch.bool)
            self._scratch = torch.empty(min(cap, _ROWS_AT_ONCE), *share.shape[1:], dtype=share.dtype)
        step = _distance(share[1:], share[:-1], loaded[1:] & loaded[:-1]).tolist() if n > 1 else []
        # One new step with every layer loaded: its distance to the step before is among the distances to
        # the newest step below, the same numbers (|a - b| = |b - a|, the same layers), so it is read there.
        from_window = n == 1 and self.count > 0 and bool(loaded[0].all())
        if self.count and not from_window:
            prev = (self.count - 1) % cap
            step.insert(0, float(_distance(share[0], self._share[prev], loaded[0] & self._loaded[prev])))
        else:
            step.insert(0, 0.0)  # no step before: never read, it is the oldest in the window
        for i in range(n):
            row = (self.count + i) % cap
            self._share[row], self._loaded[row], self._step[row] = share[i], loaded[i], step[i]
        self.count += n
        rows, newest = min(self.count, cap), (self.count - 1) % cap
        distance = _distances(self._share[:rows], self._share[newest], self._loaded[:rows], self._scratch)
        distance = distance.tolist()
        if from_window:
            self._step[newest] = distance[(newest - 1) % cap]
        # Two independent samples of counts x differ by about sum_e sqrt(x_e) / (sum x) / sqrt(pi) in total
        # variation (Poisson counts, E|X - Y| = 2 sigma / sqrt(pi)).
        spread = steps[-1].sqrt().sum(-1) / total[-1, :, 0].clamp(min=1e-300) / math.sqrt(math.pi)
        scale = float(_mean_over_layers(spread, loaded[-1]))
        if rows > 2:
            # The window's step-to-step distances: every row's but the oldest's; the lower median, as torch's.
            oldest = (self.count - rows) % cap
            between = sorted(d for row, d in enumerate(self._step[:rows]) if row != oldest)
            scale = max(scale, between[(len(between) - 1) // 2])
        limit = self.noise * max(scale, 1e-12)
        ages = [(newest - row) % cap for row, d in enumerate(distance) if d > limit]  # steps after each one
        return min(ages, default=rows)


def same_workload(recent: torch.Tensor, noise: float) -> int:
    """How many of the newest windows of ``recent [T, L, E]`` look like one workload: those whose expert shares
    are within ``noise`` times the usual window-to-window difference of the newest window's (total variation,
    mean over loaded layers). The usual difference is the larger of the sampling noise and the median
    difference between consecutive windows, so that real traffic, which moves more than sampling explains,
    is not cut at every window. ``ShiftDetector`` gives the same step by step."""
    return ShiftDetector(recent.shape[0], noise).push(recent)


def current_workload(history: torch.Tensor, config: OnlineConfig) -> torch.Tensor:
    """``[n, L, E]``: the windows ``decide`` plans from: the last ``config.window`` of ``history [T, L, E]``
    (oldest first), cut at the newest workload shift (``config.shift_noise``)."""
    recent = as_history(history)[-config.window :]
    if config.shift_noise is None:
        return recent
    return recent[recent.shape[0] - same_workload(recent, config.shift_noise) :]


def layer_gains(old: Placement, new: Placement, history: torch.Tensor) -> torch.Tensor:
    """``[L]``: drop in each layer's max/mean on ``history [T, L, E]`` from ``old`` to ``new``."""
    def score(p: Placement) -> torch.Tensor:
        return (1.0 / balancedness(p.gpu_load(history))).mean(0)
    return score(old) - score(new)


def decide(history: torch.Tensor, current: Placement, config: OnlineConfig = OnlineConfig()) -> Decision:
    """Plan from the current workload's recent windows of ``history`` and keep the plan if it pays.

    Args:
        history: ``[T, L, E]`` logical loads per recorded window, oldest first (``[L, E]``: one window).
        current: the placement now serving (same layers and experts).
        config: see ``OnlineConfig``.

    Returns:
        A ``Decision``; the planned placement is within ``max_moves`` changed slots per layer of ``current``.
    """
    history = as_history(history)
    if history.shape[1:] != (current.num_layers, current.num_experts):
        raise EplbError(
            f"history has {history.shape[1]} layers x {history.shape[2]} experts but the serving placement has "
            f"{current.num_layers} x {current.num_experts}; record the layers the placement covers"
        )
    recent = current_workload(history, config)
    windows = recent.shape[0]
    before = predicted_max_over_mean(current, recent)
    floor = lower_bound_max_over_mean(recent, current.num_gpus, current.num_slots)
    stay = torch.zeros(current.num_layers, dtype=torch.int64)
    if windows < min(config.min_windows, config.window) or before * (1.0 - config.min_gain) < floor:
        return Decision(placement=current, act=False, before=before, after=before, moves=stay, plan_seconds=0.0,
                        windows=windows, floor=floor, planned=False)
    start = time.perf_counter()
    target = plan(recent, num_gpus=current.num_gpus, num_slots=current.num_slots, num_nodes=current.num_nodes,
                  num_groups=config.num_groups, algorithm=config.algorithm, current=current,
                  max_moves=config.max_moves)
    seconds = time.perf_counter() - start
    after = predicted_max_over_mean(target, recent)
    act = after <= before * (1.0 - config.min_gain) and not torch.equal(target.phy2log, current.phy2log)
    if not act:
        return Decision(placement=current, act=False, before=before, after=after, moves=stay, plan_seconds=seconds,
                        windows=windows, floor=floor)
    return Decision(placement=target, act=True, before=before, after=after,
                    moves=(target.phy2log != current.phy2log).sum(1), plan_seconds=seconds, windows=windows,
                    floor=floor, gains=layer_gains(current, target, recent))
