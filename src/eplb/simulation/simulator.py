"""``simulate``: replay a scenario through balancing policies, step by step, and score every step.

Each step ``t``, for each policy: the policy may act (``policies``), due async layer commits land, then
the step's load is served by the placement in place: max/mean per layer and, with a cost model, the MoE
time. The step's load joins the history only afterwards, so a real policy never sees the step it serves.
Steps are drawn and scored in chunks, so memory stays bounded on long replays.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from eplb import migration_cost
from eplb.cluster import Cluster, check_cluster, require_choice
from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.simulation import evaluation
from eplb.simulation.cost import CostModel, describe
from eplb.simulation.policies import LAYERS_AUTO, Action, Context, History, make, policy_name
from eplb.simulation.results import PolicyRun, SimResult
from eplb.simulation.scenarios import Scenario

CHUNK = 32
# The weighted dispatch's split is solved on the last WEIGHTS_EVERY steps and refreshed as often (an engine
# refreshes it from its recorder windows).
WEIGHTS_EVERY = 4


@dataclass
class _Runner:
    """One policy's state along the replay."""

    policy: Any
    name: str
    serving: Placement
    pending: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (step, layer, row)
    target: Placement | None = None
    split: torch.Tensor | None = None
    split_for: Placement | None = None
    plan_seconds: float = 0.0
    plan_calls: int = 0
    rebalances: list[int] = field(default_factory=list)
    parts: list[evaluation.StepMetrics] = field(default_factory=list)
    copies: list[int] = field(default_factory=list)
    stall: list[float] = field(default_factory=list)
    hidden: list[float] = field(default_factory=list)


def simulate(
    scenario: Scenario,
    policies: Sequence[Any] = ("static", "periodic", "eplb", "oracle"),
    *,
    num_gpus: int,
    num_slots: int,
    num_nodes: int = 1,
    num_groups: int | None = None,
    cost: CostModel | None = None,
    dispatch: str = "even",
    waterfill: bool = False,
    initial: Placement | None = None,
    algorithm: str = "deepseek",
    keep_ranks: bool = False,
    progress: bool = False,
) -> SimResult:
    """Replay ``scenario`` through each policy.

    Args:
        scenario: from ``eplb.simulation.build`` or ``replay``.
        policies: names (``"static"``, ``"periodic"``, ``"eplb"``, ``"oracle"``, ``"step_oracle"``), policy
            objects (``eplb.simulation.policies``) or callables ``(step, ctx) -> Action | Placement | None``.
            Each run gets its own copy, so one object can be passed to several simulations.
        num_gpus, num_slots, num_nodes, num_groups: the cluster (as for ``eplb.plan``).
        cost: the time model (``CostModel``; needs the measured GEMM table), or None for balance only.
        dispatch: ``"even"``, ``"static"`` or ``"weighted"`` (see ``eplb.simulation.evaluation``).
        waterfill: spread the shared expert's tokens to the least loaded ranks (needs ``cost``).
        initial: the placement every policy starts from; default: planned with ``algorithm`` on the first
            step's expected load (a profile recorded before serving).
        algorithm: planning algorithm of the initial placement and of policies that do not name one.
        keep_ranks: keep per-GPU tokens and activated experts ``[T, L, G]`` in the result.
        progress: show a progress bar on stderr.
    """
    spec = Cluster(num_gpus=num_gpus, num_slots=num_slots, num_nodes=num_nodes, num_groups=num_groups)
    check_cluster(spec, scenario.num_experts)
    require_choice("dispatch", dispatch, evaluation.DISPATCH)
    if waterfill and cost is None:
        raise EplbError("waterfill changes step time, not max/mean: pass a cost model (CostModel()) with it")
    if cost is not None:
        cost.gemm  # noqa: B018  (fails here, with the fix, when the measured table is missing)
    objects = [make(p) if isinstance(p, str) else copy.deepcopy(p) for p in policies]
    names = [policy_name(p) for p in objects]
    if not objects or len(set(names)) != len(names):
        raise EplbError(f"pass one or more policies with distinct names, got {names}; set name= to tell them apart")
    history = History(_history_steps(objects), scenario.num_layers, scenario.num_experts)
    ctx = Context(scenario=scenario, cluster=spec, history=history, serving=None,  # type: ignore[arg-type]
                  load_now=torch.empty(0), algorithm=algorithm)
    if initial is None:
        initial = ctx.plan(scenario.expected[int(scenario.index[0])])
    elif (initial.num_layers, initial.num_experts) != (scenario.num_layers, scenario.num_experts):
        raise EplbError(
            f"initial placement has {initial.num_layers} layers x {initial.num_experts} experts but the scenario "
            f"has {scenario.num_layers} x {scenario.num_experts} (dense layers dropped); plan it on the scenario"
        )
    runners = [_Runner(p, n, initial) for p, n in zip(objects, names, strict=True)]
    timing = {"sample_s": 0.0, "policy_s": 0.0, "evaluate_s": 0.0}
    bar = _progress(progress, scenario.num_steps)
    for start in range(0, scenario.num_steps, CHUNK):
        stop = min(start + CHUNK, scenario.num_steps)
        tick = time.perf_counter()
        loads = scenario.steps(start, stop)
        timing["sample_s"] += time.perf_counter() - tick
        segments: list[list[tuple[Placement, torch.Tensor | None, int, int]]] = [[] for _ in runners]
        for t in range(start, stop):
            for r, segs in zip(runners, segments, strict=True):
                tick = time.perf_counter()
                ctx.serving, ctx.load_now, ctx.plan_calls = r.serving, loads[t - start], 0
                stall, hidden = _advance(r, t, ctx, cost)
                r.plan_calls += ctx.plan_calls
                r.stall.append(stall)
                r.hidden.append(hidden)
                refresh = dispatch == "weighted" and t % WEIGHTS_EVERY == 0
                if segs and segs[-1][0] is r.serving and not refresh:
                    segs[-1] = (*segs[-1][:3], t + 1)
                else:
                    # The dispatch split is fixed from what was observed before the segment's first step.
                    segs.append((r.serving, _split(r, r.serving, dispatch, history), t, t + 1))
                timing["policy_s"] += time.perf_counter() - tick
            history.push(loads[t - start : t - start + 1])
        tick = time.perf_counter()
        for r, segs in zip(runners, segments, strict=True):
            for placement, split, a, b in segs:
                r.parts.append(evaluation.evaluate_steps(placement, loads[a - start : b - start], top_k=scenario.top_k,
                                                         cost=cost, split=split, waterfill=waterfill,
                                                         ranks=keep_ranks))
        timing["evaluate_s"] += time.perf_counter() - tick
        if bar is not None:
            bar[0].update(bar[1], completed=stop)
    if bar is not None:
        bar[0].stop()
    runs = {r.name: _collect(r, cost, keep_ranks) for r in runners}
    setup = {
        "phases": scenario.phase_names, "switches": scenario.switches, "num_steps": scenario.num_steps,
        "num_layers": scenario.num_layers, "num_experts": scenario.num_experts, "layer_ids": scenario.layer_ids,
        "tokens_per_step": scenario.tokens_per_step, "top_k": scenario.top_k, "seed": scenario.seed,
        "num_gpus": num_gpus, "num_slots": num_slots, "num_nodes": num_nodes, "num_groups": num_groups,
        "dispatch": dispatch, "waterfill": waterfill, "algorithm": algorithm,
        "cost": describe(cost) if cost is not None else None,
        "bytes_per_expert": cost.bytes_per_expert if cost is not None else None,
        "policies": {r.name: repr(r.policy) for r in runners},
    }
    return SimResult(runs=runs, setup=setup, timing=timing)


def _history_steps(policies: list[Any]) -> int:
    """The longest window a policy reads (``window`` / ``config.window``), at least 64."""
    steps = 64
    for p in policies:
        steps = max(steps, int(getattr(p, "window", 0) or 0), int(getattr(getattr(p, "config", None), "window", 0)))
    return steps


def _advance(r: _Runner, t: int, ctx: Context, cost: CostModel | None) -> tuple[float, float]:
    """Let the policy act and land what is due at step ``t``; returns (stall us, async copy us to hide)."""
    stall = hidden = 0.0
    copies = 0
    if not r.pending:
        tick = time.perf_counter()
        action = r.policy(t, ctx)
        r.plan_seconds += time.perf_counter() - tick
        if isinstance(action, Placement):
            action = Action(action, mode="sync")
        if action is not None:
            if not isinstance(action, Action):
                raise EplbError(f"policy {r.name!r} returned a {type(action).__name__}; return an Action, a "
                                "Placement or None")
            changed = (action.target.phy2log != r.serving.phy2log).any(1)
            if bool(changed.any()):
                r.rebalances.append(t)
                if action.mode == "async":
                    _schedule(r, t, action, changed, ctx, cost)
                else:
                    copies = _copies(r.serving, action.target)
                    if action.mode == "sync" and cost is not None:
                        stall = evaluation.copy_us(r.serving, action.target, cost)
                    r.serving = action.target
    due = [(layer, row) for step, layer, row in r.pending if step == t]
    if due:
        r.pending = [p for p in r.pending if p[0] != t]
        phy2log = r.serving.phy2log.clone()
        for layer, row in due:
            phy2log[layer] = row
        landed = Placement(phy2log, r.serving.num_experts, r.serving.num_gpus, r.serving.num_nodes,
                           algorithm=r.target.algorithm if r.target is not None else "")
        copies = _copies(r.serving, landed)
        if cost is not None:
            hidden = evaluation.copy_us(r.serving, landed, cost)
        r.serving = landed
    r.copies.append(copies)
    return stall, hidden


def _schedule(r: _Runner, t: int, action: Action, changed: torch.Tensor, ctx: Context,
              cost: CostModel | None) -> None:
    layers = changed.nonzero().flatten()
    if action.order is not None:
        layers = layers[torch.argsort(action.order[layers], descending=True, stable=True)]
    first = t + action.latency_steps
    r.target = action.target
    r.pending = [(first + i, layer, action.target.phy2log[layer])
                 for i, batch in enumerate(_batches(layers.tolist(), r.serving, action, ctx, cost)) for layer in batch]


def _batches(layers: list[int], serving: Placement, action: Action, ctx: Context,
             cost: CostModel | None) -> list[list[int]]:
    """``layers`` (in commit order) cut into the batches that land on consecutive steps (see ``Action``)."""
    if action.layers_per_step != LAYERS_AUTO:
        n = int(action.layers_per_step)
        return [layers[i : i + n] for i in range(0, len(layers), n)]
    if cost is None or ctx.history.count == 0:
        return [layers] if cost is None else [[layer] for layer in layers]
    last = ctx.history.recent(1)
    budget = float(evaluation.evaluate_steps(action.target, last, top_k=ctx.scenario.top_k, cost=cost).gemm_us[0])
    batches: list[list[int]] = []
    for layer in layers:
        grown = [*batches[-1], layer] if batches else [layer]
        if batches and evaluation.copy_us(serving, action.target, cost, torch.tensor(grown)) <= budget:
            batches[-1] = grown
        else:
            batches.append([layer])
    return batches


def _copies(old: Placement, new: Placement) -> int:
    # bytes_per_expert=1 counts the changed slots that receive an expert.
    return int(migration_cost(old, new, bytes_per_expert=1).bytes or 0)


def _split(r: _Runner, placement: Placement, dispatch: str, history: History) -> torch.Tensor | None:
    if dispatch == "even":
        return None
    if dispatch == "static" and r.split_for is placement:
        return r.split
    probs = None
    if dispatch == "weighted":
        from eplb.runtime.dispatch import solve_weights

        recent = history.recent(WEIGHTS_EVERY)
        probs = solve_weights(placement, recent if history.count else placement.logcnt.to(torch.float64))
    r.split, r.split_for = evaluation.split_matrix(placement, dispatch, probs), placement
    return r.split


def _collect(r: _Runner, cost: CostModel | None, keep_ranks: bool) -> PolicyRun:
    def cat(key: str) -> torch.Tensor | None:
        parts = [getattr(p, key) for p in r.parts]
        return None if parts[0] is None else torch.cat(parts)

    stall = torch.tensor(r.stall, dtype=torch.float64)
    copies = torch.tensor(r.copies, dtype=torch.int64)
    step_us = ideal_us = layer_us = None
    if cost is not None:
        layer_us, ideal_us = cat("layer_us"), cat("ideal_us")
        # An async copy runs on the links while the step computes; only what the GEMMs cannot hide stalls.
        stall = stall + (torch.tensor(r.hidden, dtype=torch.float64) - cat("gemm_us")).clamp(min=0)
        step_us = layer_us.sum(1) + stall
    return PolicyRun(
        name=r.name, layer_max_over_mean=cat("layer_max_over_mean"), copies=copies,
        bytes=copies * (cost.bytes_per_expert if cost is not None else 0), stall_us=stall, step_us=step_us,
        ideal_us=ideal_us, layer_us=layer_us, rebalances=r.rebalances, plan_calls=r.plan_calls,
        plan_seconds=r.plan_seconds, loaded=cat("loaded"),
        rank_tokens=cat("rank_tokens").float() if keep_ranks else None,
        rank_experts=cat("rank_experts").to(torch.int16) if keep_ranks else None,
    )


def _progress(show: bool, total: int) -> tuple[Any, Any] | None:
    if not show:
        return None
    from rich.console import Console
    from rich.progress import Progress

    bar = Progress(console=Console(stderr=True), transient=True)
    bar.start()
    return bar, bar.add_task("simulating", total=total)
