"""What each balancing policy buys over shifting real traffic: the simulator on scenarios built from the real
loads in ``../shared/eplb_real_data`` (nothing is copied into the repo), on one CPU thread.

Scenarios:

- ``dsv3``: 12 phases of 60 steps, EP32 / 288 slots / 4 nodes / 8 groups: the 8 SGLang DeepSeek-V3 prefill
  workloads, then MMLU 4k, MMLU 4k + prefill_in4096 (50/50), MMLU 8k, MMLU 8k + prefill_in512 (50/50);
  abrupt switches at 16,384 and at 4,096 tokens x top-8 per step, and gradual (10-step ramps) at 16,384;
- ``olmoe``: the 6 OLMoE domains, 60 steps each, EP8 / 80 slots / 2 nodes, 16,384 tokens x top-8;
- ``smartmoe``: the GPT-MoE training trace replayed as recorded (501 steps, 24 layers x 32 experts,
  top-2), EP8 / 48 slots; no workload switch.

Policies: ``static``; ``periodic`` (every 10 steps from the last 10, sync, like the engines) and a sweep of
intervals for the balance-against-copies plot; a naive budgeted loop (``eplb.plan(current=, max_moves=8)``
every 5 steps, sync); ``eplb`` (the online policy, defaults: ``layers_per_step="auto"``, as many layers per
step as the links copy under the step's GEMMs) and three variants (one layer per step; every changed layer per
step; no move budget); ``oracle``; ``step_oracle``. Then step time with dispatch
(even / static / weighted) and waterfill on and off, and the speed of a 10,000-step run.

    python benchmarks/bench_simulate.py [--data ../shared/eplb_real_data] [--out-dir build/simulate]

Writes ``summary.json`` and one ``eplb simulate --save`` style result per scenario into ``--out-dir`` (for
``eplb report``), and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import eplb
import eplb.planning.online as online_module
import eplb.simulation.policies as policies_module
from eplb.io.loads import read_load
from eplb.planning.online import OnlineConfig
from eplb.simulation import CostModel, Online, Oracle, Periodic, StepOracle, build, replay, simulate
from eplb.simulation.policies import Context

DSV3 = {"num_gpus": 32, "num_slots": 288, "num_nodes": 4, "num_groups": 8}
OLMOE = {"num_gpus": 8, "num_slots": 80, "num_nodes": 2}
SMARTMOE = {"num_gpus": 8, "num_slots": 48, "num_nodes": 1}


@dataclass
class Budgeted:
    """The naive budgeted loop: every ``every`` steps, ``eplb.plan`` from the last ``window`` steps with
    ``current=`` and ``max_moves``, moved at once (sync), whatever the gain."""

    every: int = 5
    window: int = 10
    max_moves: int = 8
    name: str = "budgeted"

    def __call__(self, t: int, ctx: Context) -> eplb.Placement | None:
        if t == 0 or t % self.every or ctx.history.count == 0:
            return None
        return ctx.plan(ctx.history.recent(self.window), current=ctx.serving, max_moves=self.max_moves)


def online(name: str, **kwargs) -> Online:
    return Online(name=name, **kwargs)


def policies(num_groups: int | None, sweep: bool) -> list:
    config = OnlineConfig(window=16, max_moves=32, min_gain=0.02, algorithm="deepseek", num_groups=num_groups)
    unbounded = OnlineConfig(window=16, max_moves=None, min_gain=0.02, algorithm="deepseek", num_groups=num_groups)
    out = [
        "static",
        Periodic(interval=10, window=10, name="periodic"),
        Budgeted(),
        online("eplb", config=config),
        online("eplb 1 layer/step", config=config, layers_per_step=1),
        online("eplb all-layers", config=config, layers_per_step=1000),
        online("eplb unbounded", config=unbounded, layers_per_step=1000),
        Oracle(),
        StepOracle(),
    ]
    if sweep:
        out += [Periodic(interval=n, window=10, name=f"periodic/{n}") for n in (5, 20, 60, 120)]
    return out


def dsv3_phases(data: Path) -> list:
    sglang = sorted((data / "sglang-dsv3-ep-stats").glob("prefill_*.json"))
    mmlu = data / "dsv3-0324-mmlu-expert-counts"
    m4 = read_load(str(mmlu / "config_671B_expert_scores_seqlen_4k.json"))
    m8 = read_load(str(mmlu / "config_671B_expert_scores_seqlen_8k.json"))
    in4096 = read_load(str(data / "sglang-dsv3-ep-stats" / "prefill_in4096.json"))
    in512 = read_load(str(data / "sglang-dsv3-ep-stats" / "prefill_in512.json"))

    def blend(a, b):
        return (a.load[0] / a.load[0].sum() + b.load[0] / b.load[0].sum()) / 2

    return [str(p) for p in sglang] + [("mmlu-4k", m4), ("mmlu-4k + in4096", blend(m4, in4096)), ("mmlu-8k", m8),
                                       ("mmlu-8k + in512", blend(m8, in512))]


def run(name: str, scenario, cluster: dict, out_dir: Path, cost: CostModel | None, sweep: bool = False,
        extra: list | None = None) -> dict:
    start = time.perf_counter()
    result = simulate(scenario, extra or policies(cluster.get("num_groups"), sweep), **cluster, cost=cost)
    wall = time.perf_counter() - start
    result.save(out_dir / f"{name}.json")
    rows = result.summary()
    print(f"\n### {name}: {scenario.num_steps} steps, {len(scenario.phase_names)} phase(s), "
          f"{scenario.tokens_per_step or 'recorded'} tokens/step ({wall:.0f} s)\n")
    print("| policy | max/mean | worst step | copies | GB moved | stall s | step ms | vs ideal | plans | plan s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['max_over_mean']:.4f} | {r['worst_step_max_over_mean']:.3f} | {r['copies']} | "
              f"{r['bytes'] / 1e9:.0f} | {r['stall_s']:.2f} | {r.get('step_ms', float('nan')):.1f} | "
              f"{r.get('time_over_ideal', float('nan')):.4f} | {r['plan_calls']} | {r['plan_seconds']:.1f} |")
    return {"name": name, "wall_s": wall, "timing": result.timing, "rows": rows}


def dispatch_table(scenario, out_dir: Path, cost: CostModel) -> list[dict]:
    out = []
    config = OnlineConfig(window=16, max_moves=32, min_gain=0.02, algorithm="deepseek", num_groups=8)
    chosen = ["static", Periodic(interval=10, window=10, name="periodic"),
              online("eplb all-layers", config=config, layers_per_step=1000), Oracle()]
    for dispatch in ("even", "static", "weighted"):
        for waterfill in (False, True):
            res = simulate(scenario, chosen, **DSV3, cost=cost, dispatch=dispatch, waterfill=waterfill)
            res.save(out_dir / f"dispatch-{dispatch}-waterfill-{'on' if waterfill else 'off'}.json")
            for r in res.summary():
                out.append({"dispatch": dispatch, "waterfill": waterfill, **r})
                print(f"| {r['policy']} | {dispatch} | {'on' if waterfill else 'off'} | {r['max_over_mean']:.4f} | "
                      f"{r['step_ms']:.2f} | {r['time_over_ideal']:.4f} |", flush=True)
    return out


@contextmanager
def timed(module, name: str, bucket: dict):
    """Count the calls of ``module.name`` and their seconds into ``bucket`` while inside."""
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        tick = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket["calls"] = bucket.get("calls", 0) + 1
            bucket["s"] = bucket.get("s", 0.0) + time.perf_counter() - tick

    setattr(module, name, wrapper)
    try:
        yield bucket
    finally:
        setattr(module, name, fn)


def speed(data: Path, steps: int = 10_000) -> dict:
    """``steps`` steps of DeepSeek-V3 shape with the eplb policy, balance only and with the time model, and
    where the time goes: sampling, the policy (of which the planner, ``eplb.plan`` inside ``decide``, and the
    shift detector, ``current_workload`` in ``decide`` and the policy's ``ShiftDetector``; the rest is the
    policy's scoring of the serving placement) and scoring."""
    phases = dsv3_phases(data)
    per_phase = steps // len(phases)
    lengths = [per_phase] * (len(phases) - 1) + [steps - per_phase * (len(phases) - 1)]
    scenario = build(phases, steps_per_phase=lengths, tokens_per_step=16384, top_k=8, seed=7)
    out = {}
    for label, cost in (("balance", None), ("time model", CostModel())):
        planner, detector = {}, {}
        with timed(online_module, "plan", planner), timed(online_module, "current_workload", detector), \
                timed(policies_module.Online, "_workload_run", detector):
            start = time.perf_counter()
            res = simulate(scenario, [Online()], **DSV3, cost=cost)
            wall = time.perf_counter() - start
        t = res.timing
        out[label] = {"wall_s": wall, **t, "planner_calls": planner.get("calls", 0), "planner_s": planner.get("s", 0.0),
                      "detector_s": detector.get("s", 0.0), **res.summary()[0]}
        print(f"{steps:,} steps, {label}: {wall:.1f} s: sampling {t['sample_s']:.1f} s, policy {t['policy_s']:.1f} s "
              f"(planner {planner.get('s', 0.0):.1f} s in {planner.get('calls', 0)} calls, shift detector "
              f"{detector.get('s', 0.0):.1f} s), scoring {t['evaluate_s']:.1f} s; {res.summary()[0]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/eplb_real_data"))
    parser.add_argument("--out-dir", type=Path, default=Path("build/simulate"))
    parser.add_argument("--only", help="comma-separated parts: dsv3,dsv3-4k,dsv3-gradual,olmoe,smartmoe,dispatch,speed")
    parser.add_argument("--speed-steps", type=int, default=10_000, help="steps of the speed run (fewer: a quick look)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    parts = set(args.only.split(",")) if args.only else None
    cost = CostModel()
    summary: dict = {}

    def want(part: str) -> bool:
        return parts is None or part in parts

    phases = dsv3_phases(args.data)
    if want("dsv3"):
        sc = build(phases, steps_per_phase=60, tokens_per_step=16384, top_k=8, seed=0)
        summary["dsv3"] = run("dsv3", sc, DSV3, args.out_dir, cost, sweep=True)
    if want("dsv3-4k"):
        sc = build(phases, steps_per_phase=60, tokens_per_step=4096, top_k=8, seed=0)
        summary["dsv3-4k"] = run("dsv3-4k", sc, DSV3, args.out_dir, cost)
    if want("dsv3-gradual"):
        sc = build(phases, steps_per_phase=60, tokens_per_step=16384, top_k=8, switch="gradual", ramp_steps=10,
                   seed=0)
        summary["dsv3-gradual"] = run("dsv3-gradual", sc, DSV3, args.out_dir, cost)
    if want("olmoe"):
        path = args.data / "olmoe-mixtral-routing-counts" / "olmoe_expert_counts.json"
        domains = read_load(str(path)).domains
        sc = build([f"{path}#{d}" for d in domains], steps_per_phase=60, tokens_per_step=16384, top_k=8, seed=0)
        summary["olmoe"] = run("olmoe", sc, OLMOE, args.out_dir, None)
    if want("smartmoe"):
        trace = np.load(args.data / "smartmoe-gptmoe-train-trace" / "smartmoe_gptmoe_trace.npz")["counts_mb"].sum(1)
        sc = replay(torch.from_numpy(trace.astype(np.float64)), top_k=2, name="smartmoe")
        summary["smartmoe"] = run("smartmoe", sc, SMARTMOE, args.out_dir, None)
    if want("dispatch"):
        print("\n| policy | dispatch | waterfill | max/mean | step ms | vs ideal |\n|---|---|---|---|---|---|")
        sc = build(phases, steps_per_phase=60, tokens_per_step=16384, top_k=8, seed=0)
        summary["dispatch"] = dispatch_table(sc, args.out_dir, cost)
    if want("speed"):
        summary["speed"] = speed(args.data, args.speed_steps)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
