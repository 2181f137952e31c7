"""Timing helpers the GPU benchmarks share: CUDA-graph replay timing, interleaved A/B rounds, timed serving
steps (alone or alternating with another server's) and a rebalance's step overhead, metadata.

An op is a function ``op(i)`` of the call index ``i`` (benchmarks cycle it over a model's layers).
:func:`time_per_call` captures ``calls`` calls of it in one CUDA graph and times replays with CUDA
events: launches inside a graph cost what they cost in a serving engine that replays its forward
pass, without the Python overhead of eager calls. Imports without CUDA or triton (the benchmarks'
CPU parts use neither); the timing functions need both.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

Op = Callable[[int], object]


def time_per_call(op: Op, calls: int, replays: int = 20, repeats: int = 25) -> float:
    """Median microseconds per ``op(i)`` call under CUDA-graph replay.

    Args:
        op: the op; called once eagerly first (on a side stream, as a capture needs: Triton
            compiles a kernel on first use, which cannot happen inside a capture).
        calls: calls captured in the graph, ``op(0) .. op(calls - 1)``.
        replays: graph replays per sample, between two CUDA events.
        repeats: samples; the median is reported.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            op(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / (replays * calls))
    return statistics.median(samples)


def _empty(ptr):
    pass


def empty_launch(grid: tuple[int, ...] = (1,)) -> Op:
    """An op that launches an empty Triton kernel on ``grid``: the floor of any launch in a graph."""
    import triton

    kernel = triton.jit(_empty)
    flag = torch.zeros(1, device="cuda")
    return lambda i: kernel[grid](flag)


def interleaved_medians(timers: Sequence[tuple[str, Callable[[], float]]], rounds: int) -> dict[str, float]:
    """``{label: median}`` of each timer over ``rounds`` rounds; every round runs all the timers in
    turn, so that clock and thermal drift hit them alike (an A/B comparison)."""
    samples: dict[str, list[float]] = {label: [] for label, _ in timers}
    for _ in range(rounds):
        for label, timer in timers:
            samples[label].append(timer())
    return {label: statistics.median(values) for label, values in samples.items()}


def meta(**extra: Any) -> dict[str, Any]:
    """What a result was measured on: the GPU, torch and triton versions, then ``extra``."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "triton": triton_version, **extra}


def write_json(path: str | None, meta_: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write ``{"meta": ..., "rows": ...}`` to ``path`` (nothing when ``path`` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta_, "rows": rows}, f, indent=1)


def timed_steps(
    step: Callable[[int], bool], steps: int, sync: Callable[[], None], before: Callable[[int], None] | None = None
) -> list[tuple[float, bool]]:
    """Run ``step(i)`` for ``i < steps``, each timed from one ``sync()`` (a device sync) to the next.

    Args:
        step: one serving step; returns whether a migration was in flight during it.
        steps: how many.
        sync: waits for the device (a no-op on the CPU).
        before: ``before(i)`` runs untimed ahead of step ``i`` (e.g. ordering a rebalance).

    Returns:
        Per step ``(seconds, migrating)``.
    """
    return alternating_steps([step], steps, sync, before)[0]


def alternating_steps(
    sides: Sequence[Callable[[int], bool]], steps: int, sync: Callable[[], None],
    before: Callable[[int], None] | None = None,
) -> list[list[tuple[float, bool]]]:
    """``timed_steps`` of several servers at once: step ``i`` of every side, one after the other, before step
    ``i + 1`` of any, in reversed order every other step. Neighbouring steps of two sides then share the
    machine's state (clock, other load, a drifting host), which can change a host-bound step by 20% within
    a run: compare them pairwise (``paired_overhead``).

    Returns:
        Per side, per step ``(seconds, migrating)``.
    """
    out: list[list[tuple[float, bool]]] = [[] for _ in sides]
    for i in range(steps):
        if before is not None:
            before(i)
        order = range(len(sides)) if i % 2 == 0 else range(len(sides) - 1, -1, -1)
        for side in order:
            sync()
            start = time.perf_counter()
            busy = sides[side](i)
            sync()
            out[side].append((time.perf_counter() - start, busy))
    return out


def step_overhead(base: Sequence[float], with_rebalancer: Sequence[tuple[float, bool]]) -> dict[str, Any]:
    """What an in-flight rebalance costs a step, in milliseconds and as a fraction of the step without one.

    Args:
        base: step seconds of a run without a rebalancer (warm-up steps already dropped).
        with_rebalancer: ``(seconds, migrating)`` per step of the same run with one (warm-up dropped).
    """
    base_ms = statistics.median(base) * 1e3
    busy = [t * 1e3 for t, b in with_rebalancer if b]
    idle = [t * 1e3 for t, b in with_rebalancer if not b]
    row: dict[str, Any] = {
        "step_ms_without_rebalancer": base_ms,
        "step_ms_idle_rebalancer": statistics.median(idle) if idle else None,
        "step_ms_migrating": statistics.median(busy) if busy else None,
        "worst_step_ms_migrating": max(busy) if busy else None,
        "migrating_steps": len(busy),
    }
    if busy:
        row["overhead_median"] = row["step_ms_migrating"] / base_ms - 1
        row["overhead_worst"] = row["worst_step_ms_migrating"] / base_ms - 1
        if idle:
            row["overhead_vs_idle_steps"] = row["step_ms_migrating"] / row["step_ms_idle_rebalancer"] - 1
    return row


def paired_overhead(base: Sequence[float], with_rebalancer: Sequence[tuple[float, bool]],
                    limit: float = 0.05) -> dict[str, Any]:
    """Each migrating step against its neighbour without a rebalancer (``alternating_steps``): the median and
    worst ratio minus one, and how many stay within ``limit``.

    Args:
        base: step seconds without a rebalancer, step ``i`` run next to ``with_rebalancer[i]``.
        with_rebalancer: ``(seconds, migrating)`` per step with one.
        limit: the overhead a step may add (the runtime's target: 5%).
    """
    ratios = [t / b - 1 for b, (t, busy) in zip(base, with_rebalancer, strict=True) if busy]
    if not ratios:
        return {}
    return {"paired_overhead_median": statistics.median(ratios), "paired_overhead_worst": max(ratios),
            "paired_within_limit": sum(r <= limit for r in ratios), "paired_limit": limit,
            "paired_overheads": [round(r, 4) for r in ratios]}
