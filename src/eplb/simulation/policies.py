"""Balancing policies the simulator replays: when to re-plan, from what, and how the move lands.

A policy is called before each step with the step number and a ``Context`` (the loads observed so far,
the placement serving, the cluster) and returns None or an ``Action``: a target placement and how it lands:

- ``"free"``: serving at once, no copy time (the oracles: a bar, not a policy one could run);
- ``"sync"``: serving at once, the step stalls while every moved expert is copied (the engines' rule);
- ``"async"``: after ``latency_steps`` (planning on a CPU thread), ``layers_per_step`` layers commit per
  step, the layers with the largest predicted gain first; copies run under the step's compute, and the part
  that does not fit stalls the step. ``layers_per_step="auto"`` lands as many layers per step as the links
  can copy under the step's GEMMs (``LAYERS_AUTO``).

While an async move is in flight the policy is not called. Any callable ``(step, ctx) -> Action |
Placement | None`` is a policy too (a bare Placement lands ``"sync"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import eplb
from eplb.cluster import Cluster, require_choice, require_count
from eplb.errors import EplbError
from eplb.metrics import mean_max_over_mean
from eplb.placement import Placement
from eplb.planning.online import OnlineConfig, ShiftDetector, decide
from eplb.simulation.scenarios import Scenario

MODES = ("free", "sync", "async")
LAYERS_AUTO = "auto"


@dataclass(frozen=True)
class Action:
    """A move to ``target``.

    Attributes:
        target: the placement to reach (same shape as the one serving).
        mode: ``"free"``, ``"sync"`` or ``"async"`` (see the module doc).
        latency_steps: async: steps between the decision and the first commit.
        layers_per_step: async: layers committed per step, or ``"auto"``: in commit order, as many layers
            per step as the time model says their copies take no longer than the step's GEMMs, estimated as
            the target placement's GEMM time on the last observed step (the balanced placement computes the
            least, so the estimate errs towards fewer layers); at least one layer a step. Without a time
            model copies cost nothing, and every changed layer lands in one step.
        order: async: ``[L]`` priority of each layer (higher first); default: layer order.
    """

    target: Placement
    mode: str = "sync"
    latency_steps: int = 0
    layers_per_step: int | str = 1
    order: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.target, Placement):
            raise EplbError(f"an action's target must be a Placement, got {type(self.target).__name__}")
        require_choice("action mode", self.mode, MODES)
        require_count("latency_steps", self.latency_steps, minimum=0, fix="pass steps before the first commit")
        if self.layers_per_step != LAYERS_AUTO:
            require_count("layers_per_step", self.layers_per_step,
                          fix=f"pass layers committed per step, or {LAYERS_AUTO!r} to fit them under the compute")


class History:
    """The loads observed so far, the last ``capacity`` steps kept (a ring buffer).

    Args:
        capacity: steps kept (the longest window any policy plans from).
        num_layers, num_experts: ``L``, ``E``.
    """

    def __init__(self, capacity: int, num_layers: int, num_experts: int) -> None:
        self._ring = torch.zeros(max(capacity, 1), num_layers, num_experts, dtype=torch.float64)
        self.count = 0

    def push(self, loads: torch.Tensor) -> None:
        """Append ``[n, L, E]`` steps."""
        cap = self._ring.shape[0]
        for row in loads[-cap:]:
            self._ring[self.count % cap] = row
            self.count += 1

    def recent(self, steps: int) -> torch.Tensor:
        """``[min(steps, seen), L, E]``: the last ``steps`` observed steps, oldest first. A view of the ring
        when they lie in one piece of it (no copy): valid until the next ``push``."""
        n = min(steps, self.count, self._ring.shape[0])
        return _ring_rows(self._ring, self.count - n, n)


def _ring_rows(ring: torch.Tensor, first: int, n: int) -> torch.Tensor:
    """Rows ``first, ..., first + n - 1`` (mod the length) of ``ring``, oldest first: a view when they lie in
    one piece of it, else a copy."""
    start = first % ring.shape[0]
    if start + n <= ring.shape[0]:
        return ring[start : start + n]
    return torch.cat([ring[start:], ring[: start + n - ring.shape[0]]])


class _GpuLoads:
    """One placement's GPU loads on the newest recorded steps, each step computed once: the policy scores the
    serving placement on its window every few steps, and only the steps recorded since the last time are new
    (``Placement.gpu_load`` is the same arithmetic on each step whether it gets one step or many).

    Args:
        placement: the placement scored.
        capacity: the most steps asked for at once.
    """

    def __init__(self, placement: Placement, capacity: int) -> None:
        self.placement = placement
        self._ring = torch.empty(capacity, placement.num_layers, placement.num_gpus, dtype=torch.float64)
        self._held = [-1] * capacity  # the step (0: the first recorded) whose loads each row holds

    def last(self, history: History, steps: int) -> torch.Tensor:
        """``[steps, L, G]``: the GPU loads of the last ``steps`` steps of ``history`` (at most ``capacity``);
        a view of the kept loads when they lie in one piece (valid until the next call)."""
        cap, first = len(self._held), history.count - steps
        todo = [s for s in range(first, history.count) if self._held[s % cap] != s]
        if todo:
            loads = history.recent(history.count - todo[0])
            if len(todo) < loads.shape[0]:  # kept steps between them (the run grew back over kept steps)
                loads = loads[torch.tensor(todo) - todo[0]]
            for s, gpu in zip(todo, self.placement.gpu_load(loads), strict=True):
                self._ring[s % cap], self._held[s % cap] = gpu, s
        return _ring_rows(self._ring, first, steps)


@dataclass
class Context:
    """What a policy sees before step ``t``.

    Attributes:
        scenario: the scenario (the oracles read its expected loads; a real policy must not).
        cluster: GPUs, slots, nodes, router groups.
        history: the loads of the steps before ``t``.
        serving: the placement serving now.
        load_now: ``[L, E]`` the load of step ``t`` itself (only the step oracle may look).
        algorithm: the default planning algorithm.
    """

    scenario: Scenario
    cluster: Cluster
    history: History
    serving: Placement
    load_now: torch.Tensor
    algorithm: str = "deepseek"
    plan_calls: int = 0

    def plan(self, load: torch.Tensor, algorithm: str | None = None, **kwargs: Any) -> Placement:
        """``eplb.plan`` on this cluster."""
        self.plan_calls += 1
        c = self.cluster
        return eplb.plan(load, num_gpus=c.num_gpus, num_slots=c.num_slots, num_nodes=c.num_nodes,
                         num_groups=c.num_groups, algorithm=algorithm or self.algorithm, **kwargs)


Policy = Callable[[int, Context], "Action | Placement | None"]


@dataclass
class Static:
    """Plan once (the initial placement), never move."""

    name: str = "static"

    def __call__(self, t: int, ctx: Context) -> Action | None:
        return None


@dataclass
class Periodic:
    """The engines' rule: every ``interval`` steps re-plan from the last ``window`` steps and move every slot
    the new plan changes, serving stalled while it copies (vLLM's defaults: window 1000, interval 3000).

    Args:
        interval: steps between re-plans.
        window: steps planned from.
        algorithm: planning algorithm (None: the simulation's).
        align: re-label the plan to keep slots (eplb's ``current=`` without a budget); the engines do not.
        mode: ``"sync"`` (the engines' default) or ``"async"``.
    """

    interval: int = 3000
    window: int = 1000
    algorithm: str | None = None
    align: bool = False
    mode: str = "sync"
    name: str = "periodic"

    def __call__(self, t: int, ctx: Context) -> Action | None:
        if t == 0 or t % self.interval or ctx.history.count == 0:
            return None
        recent = ctx.history.recent(self.window)
        target = ctx.plan(recent, self.algorithm, current=ctx.serving if self.align else None)
        return Action(target, mode=self.mode, layers_per_step=ctx.serving.num_layers)


@dataclass
class Online:
    """eplb's online rebalancer: ``eplb.planning.online.decide``, the runtime ``Rebalancer``'s decision (the
    current workload's recent steps, the shift detector, the lower-bound skip, moves bounded by
    ``config.max_moves`` per layer, acting only on a predicted gain of ``config.min_gain``), committed async
    after ``latency_steps``, largest gain first, ``layers_per_step`` layers per step.

    This policy only chooses when to call ``decide``: planning is the expensive part, so it runs only when the
    answer can have changed: when the current workload's run of steps (``current_workload``, followed step by
    step with a ``ShiftDetector``) restarts (a shift), when it has doubled in length since the last decision
    (more steps: a less noisy plan), after each move has landed, and, once settled on a full window, when the
    serving placement's max/mean on it has drifted up by ``min_gain / 2`` since the last decision (checked
    every ``window / 4`` steps).

    Args:
        config: window, max_moves, min_gain, algorithm, num_groups, shift_noise, min_windows (``OnlineConfig``;
            one window is one step here).
        latency_steps: steps from a decision to the first commit (the plan runs on a CPU thread meanwhile).
        layers_per_step: layers committed per step, or ``"auto"``: as many as the links can copy under one
            step's GEMMs (see ``Action``).
    """

    config: OnlineConfig = field(default_factory=lambda: OnlineConfig(window=16, max_moves=32, min_gain=0.02,
                                                                      algorithm="deepseek"))
    latency_steps: int = 1
    layers_per_step: int | str = "auto"
    name: str = "eplb"
    _run: int = field(default=0, init=False, repr=False)
    _decided_at: int = field(default=0, init=False, repr=False)
    _moved: bool = field(default=False, init=False, repr=False)
    _checked: int = field(default=0, init=False, repr=False)
    _before: float = field(default=float("inf"), init=False, repr=False)
    _detector: ShiftDetector | None = field(default=None, init=False, repr=False)
    _history: History | None = field(default=None, init=False, repr=False)
    _seen: int = field(default=0, init=False, repr=False)
    _serving: _GpuLoads | None = field(default=None, init=False, repr=False)

    def _workload_run(self, history: History) -> int:
        """The current workload's run of steps among the last ``window``: the steps ``current_workload`` keeps."""
        window, noise = self.config.window, self.config.shift_noise
        if history is not self._history or history.count < self._seen:  # a new simulation
            self._history, self._seen, self._serving = history, 0, None
            self._detector = None if noise is None else ShiftDetector(window, noise)
        new, self._seen = history.count - self._seen, history.count
        if self._detector is None:
            return min(history.count, window)
        # The simulator records every step, also those the policy is not called on (its ring holds a window).
        return self._detector.push(history.recent(min(new, window))) if new else self._run

    def __call__(self, t: int, ctx: Context) -> Action | None:
        if ctx.history.count == 0:
            return None
        run = self._workload_run(ctx.history)
        if run < self._run:  # a shift: the new workload's steps start over
            self._decided_at = 0
        self._run = run
        grown = run >= min(2 * self._decided_at, self.config.window) and run > self._decided_at
        # Settled on a full window: look for drift now and then (scoring the serving placement is cheap).
        drift_check = run >= self.config.window and t - self._checked >= max(1, self.config.window // 4)
        if not (self._moved or grown or drift_check):
            return None
        if self._serving is None or self._serving.placement is not ctx.serving:
            self._serving = _GpuLoads(ctx.serving, self.config.window)
        # predicted_max_over_mean of the serving placement on the run, its steps' GPU loads computed once.
        before = mean_max_over_mean(self._serving.last(ctx.history, run))
        self._checked = t
        if not (self._moved or grown) and before <= self._before * (1 + self.config.min_gain / 2):
            return None
        self._decided_at, self._moved, self._before = run, False, before
        decision = decide(ctx.history.recent(self.config.window), ctx.serving, self.config)
        ctx.plan_calls += int(decision.planned)
        if not decision.act:
            return None
        self._moved = True
        return Action(decision.placement, mode="async", latency_steps=self.latency_steps,
                      layers_per_step=self.layers_per_step, order=decision.gains)


@dataclass
class Oracle:
    """The placement fitted on each step's expected load (each phase's true load), switched for free when
    it changes: per-step sampling noise stays, so it is the bar a real policy aims at.

    Args:
        algorithm: planning algorithm (None: the simulation's).
    """

    algorithm: str | None = None
    name: str = "oracle"
    _row: int = field(default=-1, init=False, repr=False)
    _cache: dict[int, Placement] = field(default_factory=dict, init=False, repr=False)

    def __call__(self, t: int, ctx: Context) -> Action | None:
        row = int(ctx.scenario.index[t])
        if row == self._row:
            return None
        self._row = row
        if row not in self._cache:
            self._cache[row] = ctx.plan(ctx.scenario.expected[row], self.algorithm)
        return Action(self._cache[row], mode="free")


@dataclass
class StepOracle:
    """The placement fitted on each step's own sampled load, for free: the in-sample lower bound.

    Args:
        algorithm: planning algorithm (None: the simulation's).
    """

    algorithm: str | None = None
    name: str = "step_oracle"

    def __call__(self, t: int, ctx: Context) -> Action | None:
        return Action(ctx.plan(ctx.load_now, self.algorithm), mode="free")


POLICIES: dict[str, Callable[..., Any]] = {
    "static": Static,
    "periodic": Periodic,
    "eplb": Online,
    "oracle": Oracle,
    "step_oracle": StepOracle,
}


def make(name: str, **kwargs: Any) -> Any:
    """A policy by name (``POLICIES``) with its keyword arguments."""
    if name not in POLICIES:
        raise EplbError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}, or pass a callable")
    try:
        return POLICIES[name](**kwargs)
    except TypeError as exc:
        raise EplbError(f"policy {name!r} does not take these options ({exc}); see help(eplb.simulation)") from None


def policy_name(policy: Any) -> str:
    """A policy's ``name`` attribute, or its function name."""
    return str(getattr(policy, "name", None) or getattr(policy, "__name__", type(policy).__name__))
