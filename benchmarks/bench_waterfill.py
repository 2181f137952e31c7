"""WaterfillBalancer: per-layer cost under CUDA-graph replay, and its simulated gain on real loads.

Timing (needs CUDA): every variant of ``expand_topk`` (count, choose, expand) is captured CALLS
times in one CUDA graph, one balancer per layer as in a forward pass (``waterfill_balancers``),
and replayed; the time per call is the median over repeated CUDA-event timings
(``timing.time_per_call``), beside an empty Triton kernel. Before timing, the script checks that
the Triton and torch paths agree.

    PYTHONPATH=src python benchmarks/bench_waterfill.py [--json out.json]

Simulation (CPU): per-rank compute, routed entries plus shared-expert tokens, max over mean,
with and without waterfill, on DeepSeek-V3 expert loads recorded by SGLang, at EP 8/16/32/64.
Every rank gets ``--tokens`` tokens whose top-8 experts are drawn from the layer's recorded
distribution; EPLB places 256 + n_ep slots and hash dispatch picks the replicas.

    PYTHONPATH=src python benchmarks/bench_waterfill.py --simulate
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from eplb import Placement, WaterfillBalancer, WaterfillConfig, plan
from eplb.runtime.dispatch import HashDispatch
from timing import Op, empty_launch, meta, time_per_call, write_json
from waterfill_balancers import DEFAULT, EP, LAYERS, SLOTS, TOKENS, TOP_K, layer_balancers, skewed_topk

REPO = Path(__file__).resolve().parents[1]
# The DeepSeek-V3 statistics live beside the repository (license unstated: never copied in).
STATS = REPO.parent / "shared" / "eplb_real_data" / "sglang-dsv3-ep-stats"
CALLS = LAYERS


# Timing ----------------------------------------------------------------------------------


def cycle(balancers: list[WaterfillBalancer], ids: torch.Tensor, weights: torch.Tensor) -> Op:
    """The op of a forward pass: call ``i`` runs layer ``i``'s balancer."""
    return lambda i: balancers[i % LAYERS].expand_topk(ids, weights)


def bench(json_path: str | None) -> None:
    rows: list[dict] = []

    def add(name: str, shape: str, op: Op, calls: int = CALLS) -> None:
        us = time_per_call(op, calls)
        rows.append({"op": name, "shape": shape, "calls_per_graph": calls, "us_per_call": round(us, 3)})
        print(f"{name:<58} {shape:<26} {calls:>3} {us:8.3f} us", flush=True)

    add("empty triton kernel (floor)", "-", empty_launch())
    identity = {"all_reduce": lambda t: t}  # dynamic mode minus the collective
    recorded_only = dict(recorded=True, estimate="recorded")
    variants = [
        (DEFAULT, dict(recorded=True)),
        ("static, recorded loads only (estimate=recorded)", recorded_only),
        ("static, recorded loads only, move=all (by deficit)", dict(**recorded_only, move="all")),
        ("static, recorded loads only + tile rule (128)", dict(**recorded_only, min_tile_tokens=128)),
        ("static, batch counts (SGLang's static rule)", dict()),
        ("static, recorded loads only, candidates=all", dict(**recorded_only, candidates="all")),
        ("dynamic: count kernel + fused kernel, no all-reduce", dict(mode="dynamic", **identity)),
        ("expand only (batch under min_batch)", dict(recorded=True, min_batch=1 << 30)),
        ("torch backend, static default", dict(recorded=True, backend="torch")),
        ("torch backend, dynamic, no all-reduce", dict(mode="dynamic", backend="torch", **identity)),
    ]
    ids, weights = skewed_topk(TOKENS, SLOTS, "cuda")
    for name, kw in variants:
        # Same output from both backends, or the timings compare different work.
        a, b = (layer_balancers(EP, SLOTS, **{**kw, "backend": be})[3].expand_topk(ids, weights)
                for be in ("triton", "torch"))
        if not all(map(torch.equal, a, b)):
            print(f"MISMATCH: {name}: triton and torch outputs differ", flush=True)
        balancers = layer_balancers(EP, SLOTS, **kw)
        shape = f"{TOKENS}x{TOP_K} EP{EP} P={SLOTS}"
        add(name, shape, cycle(balancers, ids, weights))
        if name == DEFAULT:
            add(name + ", 1 call per graph", shape, cycle(balancers[:1] * LAYERS, ids, weights), calls=1)
    for ep, slots in ((8, 288), (32, 288), (64, 320)):
        sized_ids, sized_w = skewed_topk(TOKENS, slots, "cuda")
        for name, kw in ((DEFAULT, dict(recorded=True)), ("static, recorded loads only", recorded_only)):
            add(name, f"{TOKENS}x{TOP_K} EP{ep} P={slots}", cycle(layer_balancers(ep, slots, **kw), sized_ids, sized_w))
        dyn = layer_balancers(ep, slots, mode="dynamic", **identity)
        add("dynamic, no all-reduce", f"{TOKENS}x{TOP_K} EP{ep} P={slots}", cycle(dyn, sized_ids, sized_w))
    for tokens in (128, 16384):
        sized_ids, sized_w = skewed_topk(tokens, SLOTS, "cuda")
        add(DEFAULT, f"{tokens}x{TOP_K} EP{EP} P={SLOTS}",
            cycle(layer_balancers(EP, SLOTS, recorded=True), sized_ids, sized_w))
    # Tokens per program and warps of the fused kernel (module constants): which is fastest here.
    from eplb.runtime.waterfill import kernel

    default = (kernel.BLOCK_M, kernel.NUM_WARPS)
    for block, warps in ((32, 1), (64, 2), (128, 4), (256, 8)):
        kernel.BLOCK_M, kernel.NUM_WARPS = block, warps
        for ep, slots in ((16, 288), (64, 320)):
            sized_ids, sized_w = skewed_topk(TOKENS, slots, "cuda")
            add(f"{DEFAULT}, BLOCK_M={block} num_warps={warps}", f"{TOKENS}x{TOP_K} EP{ep} P={slots}",
                cycle(layer_balancers(ep, slots, recorded=True), sized_ids, sized_w))
    kernel.BLOCK_M, kernel.NUM_WARPS = default

    info = meta(calls_per_graph=CALLS)
    print(json.dumps(info))
    print("\n| variant | input | calls/graph | us per call |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['shape']} | {r['calls_per_graph']} | {r['us_per_call']:.2f} |")
    write_json(json_path, info, rows)


# Simulation ------------------------------------------------------------------------------


def load_stats(name: str) -> torch.Tensor:
    """``[58, 256]`` float64 MoE-layer loads of one SGLang statistics file, each layer summing to 1."""
    data = torch.tensor(json.loads((STATS / f"{name}.json").read_text())["logical_count"], dtype=torch.float64)
    moe = data[3:]  # rows 0-2 are DeepSeek-V3's dense layers
    return moe / moe.sum(1, keepdim=True)


def draw_routes(probs: torch.Tensor, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """``[tokens, TOP_K]`` distinct logical experts per token, drawn in proportion to ``probs``."""
    out = []
    for start in range(0, tokens, 8192):  # Gumbel top-k, in chunks to bound memory
        n = min(8192, tokens - start)
        gumbel = -torch.empty(n, probs.numel(), dtype=torch.float32).exponential_(generator=gen).log()
        out.append((probs.log().float() + gumbel).topk(TOP_K, dim=1).indices)
    return torch.cat(out)


# Scenarios: (placement fitted on, recorded loads, per-rank workloads the tokens come from).
FILES = ["prefill_in512", "prefill_in1024", "prefill_in2048", "prefill_in4096",
         "prefill_in500out1500", "prefill_in1000out1000", "prefill_in1800out100", "prefill_in2000out100"]
SCENARIOS = {
    "fresh placement": (["prefill_in4096"], ["prefill_in4096"], ["prefill_in4096"]),
    "stale placement": (["prefill_in1024"], ["prefill_in4096"], ["prefill_in4096"]),
    "mixed ranks": (FILES, FILES, FILES),
}


def waterfill_variants(placement: Placement, recorded: torch.Tensor) -> dict[str, Callable[[int, int], Any]]:
    """The simulated variants: ``{name: make(layer, rank) -> WaterfillBalancer}`` on the torch backend."""
    slots, ep = placement.num_slots, placement.num_gpus

    def static(estimate: str) -> Callable[[int, int], WaterfillBalancer]:
        config = WaterfillConfig(estimate=estimate, backend="torch")
        return lambda layer, rank: WaterfillBalancer.from_placement(placement, recorded, layer=layer, rank=rank,
                                                                    config=config)

    def batch(mode: str, **runtime: Any) -> Callable[[int, int], WaterfillBalancer]:
        config = WaterfillConfig(mode=mode, backend="torch")
        return lambda layer, rank: WaterfillBalancer(slots, ep, rank, config, layer_id=layer, **runtime)

    return {
        "static, recorded loads (move=excess)": static("recorded"),
        "static, batch counts (SGLang)": batch("static"),
        "static, batch + recorded excess": static("batch"),
        "dynamic": batch("dynamic", all_reduce=lambda t: t),
    }


def simulate(scenario: str, tokens: int, layer_stride: int, eps: tuple[int, ...], seed: int = 0) -> list[dict]:
    """Mean over layers of per-rank compute max/mean, for every waterfill variant."""
    fit_files, recorded_files, rank_files = SCENARIOS[scenario]
    fit = sum(load_stats(f) for f in fit_files)
    recorded = sum(load_stats(f) for f in recorded_files)
    workloads = [load_stats(f) for f in rank_files]
    gen = torch.Generator().manual_seed(seed)
    results = []
    for ep in eps:
        slots = 256 + ep
        placement = plan(fit, num_gpus=ep, num_slots=slots)
        dispatch = HashDispatch(placement)
        variants = waterfill_variants(placement, recorded)
        sums = {"routed only": 0.0, "no waterfill": 0.0, **{v: 0.0 for v in variants}}
        layer_ids = range(0, fit.shape[0], layer_stride)
        for layer in layer_ids:
            batches = [dispatch.remap(layer, draw_routes(workloads[r % len(workloads)][layer], tokens, gen),
                                      backend="torch") for r in range(ep)]
            routed = sum(torch.bincount(b.flatten() // (slots // ep), minlength=ep) for b in batches)
            sums["routed only"] += float(routed.max() / routed.double().mean())
            local = routed + tokens
            sums["no waterfill"] += float(local.max() / local.double().mean())
            weights = torch.ones(tokens, TOP_K)
            for name, make in variants.items():
                balancers = [make(layer, r) for r in range(ep)]
                counts = sum(b.local_counts(ids) for b, ids in zip(balancers, batches, strict=True))
                work = torch.zeros(ep, dtype=torch.int64)
                for b, ids in zip(balancers, batches, strict=True):
                    out = (b.expand_topk_global(ids, weights, counts) if b.mode == "dynamic"
                           else b.expand_topk(ids, weights))[0]
                    work += torch.bincount(out.flatten() // (slots // ep + 1), minlength=ep)
                sums[name] += float(work.max() / work.double().mean())
        row = {"scenario": scenario, "ep": ep, "slots": slots, "layers": len(layer_ids),
               **{k: v / len(layer_ids) for k, v in sums.items()}}
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def print_table(results: list[dict]) -> None:
    columns = [k for k in results[0] if k not in ("scenario", "ep", "slots", "layers")]
    print("| scenario | EP | slots | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for r in results:
        print(f"| {r['scenario']} | {r['ep']} | {r['slots']} | " + " | ".join(f"{r[c]:.3f}" for c in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--simulate", action="store_true", help="run the CPU simulation on real loads instead")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank (simulation)")
    parser.add_argument("--layer-stride", type=int, default=8, help="simulate every n-th MoE layer")
    parser.add_argument("--scenario", choices=list(SCENARIOS), action="append", help="default: all")
    parser.add_argument("--ep", type=int, action="append", help="EP sizes (default: 8 16 32 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn tokens (simulation)")
    args = parser.parse_args()
    if args.simulate:
        if not STATS.is_dir():
            sys.exit(f"real DeepSeek-V3 statistics not found at {STATS}")
        t0 = time.time()
        results = [row for scenario in args.scenario or SCENARIOS
                   for row in simulate(scenario, args.tokens, args.layer_stride, tuple(args.ep or (8, 16, 32, 64)),
                                       args.seed)]
        print_table(results)
        print(f"({time.time() - t0:.0f} s)")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    if not torch.cuda.is_available():
        sys.exit("timing needs a CUDA device; pass --simulate for the CPU simulation")
    bench(args.json)


if __name__ == "__main__":
    main()
