"""Balance against moved weights: ``eplb.plan(current=..., max_moves=k)`` after a workload shift.

The placement now serving was planned on one workload; the load has moved to another. For each
budget ``k`` (slots whose expert may change, per layer) the table gives the balance on the new
load (mean over MoE layers of max/mean GPU load, and the worst layer), the moves (per layer and in
all) and the weight bytes they copy, and the CPU time of the ``eplb.plan`` call (one thread).
Baselines: a full replan switched to as planned (every slot whose expert differs is copied);
vLLM's way (a full replan whose GPUs keep their rank, only experts staying on a GPU keep their
slot); and the full replan re-labelled to the current GPUs (``max_moves=None``).

    python benchmarks/bench_migration.py [--data ../shared/eplb_real_data] [--out docs/benchmarks/migration.md]

Real sets are read from ``--data``: SGLang's DeepSeek-V3 prefill files, else the MMLU counts;
without either the bundled MMLU file is fitted and scored with a seeded drift. Nothing is copied
into the repository.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

import eplb
from eplb.io.examples import read_example
from eplb.io.loads import read_load
from eplb.placement import Placement
from eplb.planning.migration import align, migration_cost

BUDGETS = [0, 1, 2, 4, 8, 16, 32, 64, 128]
# DeepSeek-V3 expert in fp8: gate, up and down projections of 7168 x 2048 parameters, 1 byte each.
DSV3_EXPERT_BYTES = 3 * 7168 * 2048


@dataclass(frozen=True)
class Scenario:
    title: str
    fit: torch.Tensor  # [L, E] the load the current placement was planned on
    new: torch.Tensor  # [L, E] the load to rebalance for


def _moe(load: torch.Tensor) -> torch.Tensor:
    """``[L, E]`` summed over steps, without the layers that carry no load (dense layers)."""
    load = load.sum(0)
    return load[load.sum(1) > 0]


def _read(folder: Path, name: str) -> torch.Tensor:
    return _moe(read_load(folder / name).load)


def scenarios(data: Path) -> list[Scenario]:
    sglang = data / "sglang-dsv3-ep-stats"
    mmlu = data / "dsv3-0324-mmlu-expert-counts"
    if sglang.is_dir():
        read = partial(_read, sglang)
        return [
            Scenario("SGLang DeepSeek-V3 prefill: fit on in512, rebalance for in4096",
                     read("prefill_in512.json"), read("prefill_in4096.json")),
            Scenario("SGLang DeepSeek-V3 prefill: fit on in1024, rebalance for in2000out100",
                     read("prefill_in1024.json"), read("prefill_in2000out100.json")),
        ]
    if mmlu.is_dir():
        read = partial(_read, mmlu)
        return [Scenario("DeepSeek-V3-0324 MMLU: fit on 4k chunks, rebalance for 8k chunks",
                         read("config_671B_expert_scores_seqlen_4k.json"),
                         read("config_671B_expert_scores_seqlen_8k.json"))]
    fit = _moe(read_example().load)
    drift = torch.exp(0.5 * torch.randn(fit.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return [Scenario("bundled DeepSeek-V3 MMLU: fit on it, rebalance for it with seeded +-50% drift",
                     fit, (fit * drift).round())]


def _timed(fn: Callable[[], Placement]) -> tuple[Placement, float]:
    start = time.process_time()
    out = fn()
    return out, 1e3 * (time.process_time() - start)


def table(scenario: Scenario, algorithm: str, gpus: int, slots: int, nodes: int, bytes_per_expert: int) -> str:
    spec = dict(num_gpus=gpus, num_slots=slots, num_nodes=nodes, algorithm=algorithm)
    current = eplb.plan(scenario.fit, **spec)
    ideal, ideal_ms = _timed(lambda: eplb.plan(scenario.new, **spec))
    kept_ranks = Placement(align(current.phy2log, ideal.phy2log, gpus, nodes, permute_gpus=False),
                           ideal.num_experts, gpus, nodes)
    rows: list[tuple[str, Placement, float | None]] = []
    for budget in BUDGETS + [slots]:
        label = f"max_moves={budget}" + {0: " (no rebalance)", slots: " (all slots)"}.get(budget, "")
        rows.append((label, *_timed(partial(eplb.plan, scenario.new, **spec, current=current, max_moves=budget))))
    rows += [
        ("full replan, as planned", ideal, ideal_ms),
        ("full replan, GPUs keep rank (vLLM)", kept_ranks, None),
        ("full replan, re-labelled (max_moves=None)",
         *_timed(lambda: eplb.plan(scenario.new, **spec, current=current))),
    ]
    lines = [
        f"### {scenario.title}",
        "",
        f"{scenario.new.shape[0]} MoE layers x {scenario.new.shape[1]} experts; {gpus} GPUs, {slots} slots, "
        f"{nodes} node(s); algorithm `{algorithm}`; {bytes_per_expert / 1e6:.1f} MB per expert.",
        "",
        "| placement | max/mean | worst layer | moves/layer | moves | GB moved | plan ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, placement, ms in rows:
        score = eplb.evaluate(placement, scenario.new).summary()
        cost = migration_cost(current, placement, bytes_per_expert)
        lines.append(
            f"| {label} | {score['max_over_mean']:.4f} | {score['worst_max_over_mean']:.3f} | "
            f"{cost.moves.double().mean():.1f} | {cost.total_moves} | {cost.bytes / 1e9:.2f} | "
            + ("-" if ms is None else f"{ms:.0f}") + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared"
                        / "eplb_real_data", help="folder of the real expert-load sets")
    parser.add_argument("--algorithm", action="append",
                        help="algorithm(s) of the current and the ideal placement (default: deepseek and eplb)")
    parser.add_argument("--bytes-per-expert", type=int, default=DSV3_EXPERT_BYTES)
    parser.add_argument("--out", type=Path, help="write the tables (markdown) here as well")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = []
    for scenario in scenarios(args.data):
        for algorithm in args.algorithm or ["deepseek", "eplb"]:
            for gpus, slots, nodes in ((32, 288, 1), (64, 320, 8)):
                parts.append(table(scenario, algorithm, gpus, slots, nodes, args.bytes_per_expert))
                print(parts[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(parts))


if __name__ == "__main__":
    main()
