"""Benchmark eplb.runtime.dispatch: remap latency on GPU (CUDA-graph replay) and the weight solver.

    PYTHONPATH=src python benchmarks/bench_dispatch.py            # both parts
    PYTHONPATH=src python benchmarks/bench_dispatch.py --part remap   # GPU only
    PYTHONPATH=src python benchmarks/bench_dispatch.py --part solver  # CPU only

remap: DeepSeek-V3 shape (58 layers, 256 experts, 288 slots on 32 GPUs / 4 nodes), 16384
tokens x top-8 int32 ids. Each variant is captured in one CUDA graph of ``--calls`` remaps
(cycling over the layers); a replay is timed with CUDA events and divided by the call count;
the median over ``--replays`` replays is reported (``timing.time_per_call``), next to an empty
Triton kernel with the same grid (the launch floor) and the plain-torch remap. Two placements: a synthetic
heavy-tailed load (one expert gets 33 replicas: the worst case for a per-replica scan) and a
realistic one with X ~ 8 replicas at most: planned on the real DeepSeek-V3 loads when they are
present, else on a log-normal stand-in (sigma 0.8: per-layer coefficient of variation 0.93,
real files 0.75-1.07; it also gives X = 8), weights solved on a second load.

solver: real DeepSeek-V3 prefill loads (../shared/eplb_real_data/sglang-dsv3-ep-stats, skipped
when absent): a placement from ``eplb.plan(algorithm="deepseek")`` fitted on one file, weights
solved on another; the max/mean GPU load with the even split, with the solved weights, and the
LP optimum by scipy's HiGHS (when scipy is installed), averaged over the MoE layers; the time to
solve the weights and to build their alias table (``WeightedDispatch.set_probs`` minus the copy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import eplb
from eplb.runtime.dispatch import HashDispatch, StaticDispatch, WeightedDispatch, solve_weights, split_gpu_load
from eplb.runtime.dispatch.alias import alias_table
from timing import empty_launch, meta, time_per_call

REAL = Path(__file__).resolve().parents[1] / "../shared/eplb_real_data/sglang-dsv3-ep-stats"
LAYERS, EXPERTS, SLOTS, GPUS, NODES = 58, 256, 288, 32, 4


def synthetic_load(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Heavy-tailed like real routing: a few hot experts per layer.
    return torch.rand(LAYERS, EXPERTS, generator=g, dtype=torch.float64) ** -1.5


def realistic_loads() -> tuple[str, torch.Tensor, torch.Tensor]:
    """(source, load to plan on, load to solve weights on), both ``[58, 256]``."""
    if REAL.is_dir():
        return "real DSv3 loads", read_real("prefill_in4096"), read_real("prefill_in1024")
    gens = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    fit, recent = ((torch.randn(LAYERS, EXPERTS, generator=g, dtype=torch.float64) * 0.8).exp() for g in gens)
    return "log-normal loads", fit, recent


def read_real(name: str) -> torch.Tensor:
    return torch.tensor(json.loads((REAL / f"{name}.json").read_text())["logical_count"], dtype=torch.float64)[3:]


def bench_remap(args) -> list[dict]:
    from eplb.runtime.dispatch.kernel import BLOCK  # imports triton

    def per_call(op) -> float:
        # One replay per sample: a graph of --calls remaps is long enough to time alone.
        return time_per_call(op, args.calls, replays=1, repeats=args.replays)

    plan = dict(num_gpus=GPUS, num_slots=SLOTS, num_nodes=NODES, algorithm="deepseek")
    synthetic = eplb.plan(synthetic_load(), **plan)
    source, fit, recent = realistic_loads()
    realistic = eplb.plan(fit, **plan)
    ids = torch.randint(0, EXPERTS, (args.tokens, args.topk), dtype=torch.int32, device="cuda")
    grid = (-(-ids.numel() // BLOCK),)
    rows = [{"variant": "empty Triton kernel (same grid)", "us": per_call(empty_launch(grid))}]
    width = synthetic.log2phy.shape[-1]
    policies = {
        "static": StaticDispatch(synthetic, 3, device="cuda"),
        "hash": HashDispatch(synthetic, device="cuda"),
        f"weighted, heavy-tailed X={width}": WeightedDispatch(synthetic, solve_weights(synthetic, synthetic_load(1)),
                                                           device="cuda"),
        f"weighted, {source} X={realistic.log2phy.shape[-1]}": WeightedDispatch(
            realistic, solve_weights(realistic, recent), device="cuda"),
    }
    for name, policy in policies.items():
        for backend in ("triton", "torch"):
            us = per_call(lambda i, policy=policy, backend=backend: policy.remap(i % LAYERS, ids, backend=backend))
            rows.append({"variant": f"{name} / {backend}", "us": us})
    return rows


def bench_solver(args) -> list[dict]:
    rows = []
    for fit_name, recent_name in args.pairs:
        fit, recent = read_real(fit_name), read_real(recent_name)
        placement = eplb.plan(fit, num_gpus=GPUS, num_slots=SLOTS, num_nodes=NODES, algorithm="deepseek")
        solve_times, alias_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            probs = solve_weights(placement, recent)
            solve_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            alias_table(placement, probs)
            alias_times.append(time.perf_counter() - start)
        mean = recent.sum(1) / GPUS
        row = {
            "fit": fit_name, "recent": recent_name,
            "even": float((placement.gpu_load(recent).amax(1) / mean).mean()),
            "solved": float((split_gpu_load(placement, recent, probs).amax(1) / mean).mean()),
            "solve_ms": 1000 * statistics.median(solve_times),
            "alias_ms": 1000 * statistics.median(alias_times),
        }
        optimum = lp_optimum(placement, recent)
        if optimum is not None:
            row["lp"] = float((optimum / mean).mean())
        rows.append(row)
    return rows


def lp_optimum(placement, load):
    try:
        import numpy as np
        from scipy.optimize import linprog
    except ImportError:
        return None
    out = []
    log2phy = placement.log2phy
    for layer in range(placement.num_layers):
        replicas = (log2phy[layer] >= 0).nonzero().tolist()
        a_ub = np.zeros((placement.num_gpus, len(replicas) + 1))
        a_ub[:, -1] = -1.0
        a_eq = np.zeros((placement.num_experts, len(replicas) + 1))
        for i, (e, x) in enumerate(replicas):
            a_ub[int(log2phy[layer, e, x]) // placement.slots_per_gpu, i] += float(load[layer, e])
            a_eq[e, i] = 1.0
        cost = np.zeros(len(replicas) + 1)
        cost[-1] = 1.0
        res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(placement.num_gpus), A_eq=a_eq,
                      b_eq=np.ones(placement.num_experts), bounds=(0, None), method="highs")
        out.append(res.fun)
    return torch.tensor(out, dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "remap", "solver"), default="all")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=lambda s: tuple(s.split(":")), nargs="+",
                        default=[("prefill_in4096", "prefill_in4096"), ("prefill_in4096", "prefill_in1024"),
                                 ("prefill_in1024", "prefill_in500out1500"), ("prefill_in512", "prefill_in2000out100")])
    args = parser.parse_args()
    if args.part in ("all", "remap"):
        if torch.cuda.is_available():
            info = meta()
            print(f"## remap, {info['device']}, torch {info['torch']}, triton {info['triton']}, "
                  f"{args.tokens} x top-{args.topk} int32, median us per layer call over {args.replays} graph "
                  "replays (X: most replicas of one expert)")
            print("| variant | us / call |\n|---|---|")
            for row in bench_remap(args):
                print(f"| {row['variant']} | {row['us']:.2f} |")
        else:
            print("remap: no CUDA device, skipped")
    if args.part in ("all", "solver"):
        if REAL.is_dir():
            print("## solver, max/mean GPU load (mean over 58 MoE layers), EP32 / 288 slots / 4 nodes")
            print("| placement fitted on | weights solved on | even split | solved | LP optimum "
                  "| solve ms | alias ms |")
            print("|---|---|---|---|---|---|---|")
            for r in bench_solver(args):
                lp = f"{r['lp']:.5f}" if "lp" in r else "n/a"
                print(f"| {r['fit']} | {r['recent']} | {r['even']:.5f} | {r['solved']:.5f} | {lp} "
                      f"| {r['solve_ms']:.0f} | {r['alias_ms']:.1f} |")
        else:
            print(f"solver: {REAL} not present, skipped")


if __name__ == "__main__":
    main()
