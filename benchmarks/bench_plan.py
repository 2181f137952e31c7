"""Planning time and balance of every load-based algorithm of ``eplb.plan``.

Timing: ``eplb.plan`` on one CPU thread (``torch.set_num_threads(1)``) for DeepSeek-V3-sized
loads (58 MoE layers x 256 experts, 8 groups) on clusters from EP32 (288 slots, 4 nodes) up to
EP256 (1024 slots, 32 nodes); the median (and the fastest) of ``--runs`` timed calls after three
warm-up calls. The load is a seeded heavy-tailed one ``[L, E]``; the time-series variants are
also timed on a 16-step history ``[16, L, E]``, since that is what they are for.

Balance: every algorithm fitted on each real load set under ``../shared/eplb_real_data`` (sets
that are absent are skipped) and scored on the same load: the mean over MoE layers of
max / mean GPU load (1 is perfect), the worst layer, the same for the lower bound of
``eplb.metrics.lower_bound``, and for sets with several steps (OLMoE domains) the mean of the
per-step scores. ``linear`` (no EPLB) is scored as the baseline. Sets are read
with ``eplb.io.read_load``.

    PYTHONPATH=src python benchmarks/bench_plan.py [--runs 20] [--data ../shared/eplb_real_data] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import eplb
from eplb import planning
from eplb.errors import EplbError
from eplb.io import read_load

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "eplb_real_data"

LAYERS, EXPERTS, GROUPS = 58, 256, 8  # DeepSeek-V3's MoE layers
HISTORY_STEPS = 16
WARMUP = 3
# (slots, GPUs, nodes): EP32 with 32 redundant slots, then larger expert-parallel groups.
CLUSTERS = [(288, 32, 4), (320, 64, 8), (512, 128, 16), (1024, 256, 8), (1024, 256, 32)]
# (set, file, slots, GPUs, nodes, groups): how each real set is planned.
REAL_SETS = [
    *((f"sglang-dsv3-ep-stats/{name}.json", 288, 32, 4, 8) for name in
      ("prefill_in512", "prefill_in1024", "prefill_in2048", "prefill_in4096", "prefill_in500out1500",
       "prefill_in1000out1000", "prefill_in1800out100", "prefill_in2000out100")),
    ("dsv3-0324-mmlu-expert-counts/config_671B_expert_scores_seqlen_4k.json", 288, 32, 4, 8),
    ("dsv3-0324-mmlu-expert-counts/config_671B_expert_scores_seqlen_8k.json", 288, 32, 4, 8),
    ("olmoe-mixtral-routing-counts/olmoe_expert_counts.json", 80, 8, 1, None),
    ("olmoe-mixtral-routing-counts/olmoe-sft_expert_counts.json", 80, 8, 1, None),
    ("olmoe-mixtral-routing-counts/mistral_expert_counts.json", 16, 8, 1, None),
]


def load_based() -> list[str]:
    return [name for name, algo in planning.ALGORITHMS.items() if algo.uses_load]


def synthetic_load(steps: int | None, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed integer token counts ``[L, E]`` (or ``[steps, L, E]``), like a router's."""
    gen = torch.Generator().manual_seed(seed)
    shape = (LAYERS, EXPERTS) if steps is None else (steps, LAYERS, EXPERTS)
    return torch.round(1e5 * torch.rand(shape, generator=gen, dtype=torch.float64) ** 4) + 1


def time_ms(load: torch.Tensor, runs: int, **kwargs) -> dict[str, float]:
    """Median and fastest of ``runs`` timed ``eplb.plan`` calls, after warm-up calls."""
    for _ in range(WARMUP):
        eplb.plan(load, **kwargs)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        eplb.plan(load, **kwargs)
        samples.append(time.perf_counter() - start)
    return {"ms": 1e3 * statistics.median(samples), "min_ms": 1e3 * min(samples)}


def time_plans(runs: int) -> list[dict]:
    rows = []
    single, history = synthetic_load(None), synthetic_load(HISTORY_STEPS)
    for slots, gpus, nodes in CLUSTERS:
        for name in load_based():
            loads = [("[L, E]", single)] + ([(f"[{HISTORY_STEPS}, L, E]", history)] if "vec" in name else [])
            for shape, load in loads:
                row = {"algorithm": name, "slots": slots, "gpus": gpus, "nodes": nodes, "load": shape}
                try:
                    row.update(time_ms(load, runs, num_gpus=gpus, num_slots=slots, num_nodes=nodes,
                                       num_groups=GROUPS, algorithm=name))
                except EplbError as exc:
                    row["skipped"] = str(exc)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def score_real(data: Path) -> list[dict]:
    rows = []
    for rel, slots, gpus, nodes, groups in REAL_SETS:
        path = data / rel
        if not path.exists():
            print(json.dumps({"set": rel, "skipped": "absent"}), flush=True)
            continue
        load = read_load(path).load
        for name in ["linear", *load_based()]:
            row = {"set": rel, "steps": load.shape[0], "algorithm": name, "slots": slots, "gpus": gpus}
            try:
                placement = eplb.plan(load, num_gpus=gpus, num_slots=slots, num_nodes=nodes,
                                      num_groups=groups, algorithm=name)
            except EplbError as exc:
                row["skipped"] = str(exc)
            else:
                report = eplb.evaluate(placement, load)
                loaded = report.loaded
                row.update(report.summary())
                bound = report.lower_bound[loaded] / report.mean_load[loaded]
                row["bound_max_over_mean"] = float(bound.mean())
                if load.shape[0] > 1:  # what the time-series variants optimise: each step's peak
                    per_step = [eplb.evaluate(placement, step).summary()["max_over_mean"] for step in load]
                    row["per_step_max_over_mean"] = statistics.mean(per_step)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed calls per case (median reported)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of the real load sets")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": args.runs}
    print(json.dumps(meta))
    timing = [] if args.skip_timing else time_plans(args.runs)
    balance = score_real(args.data)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "timing": timing, "balance": balance}, f, indent=1)


if __name__ == "__main__":
    main()
