"""Placement quality of every algorithm, in sample and out of sample, on real and synthetic loads.

In sample: plan on a load, score on the same load. Out of sample: plan on a history of other
workloads (one window each), score on a held-out one (leave-one-out over the files or domains
of a set; MMLU against the SGLang files and back; synthetic: fit on 7 drifting windows, score
on an 8th). Scores: mean over layers of max/mean GPU load, its worst layer, the mean gap to the
lower bound (max / bound - 1), replicas sharing a GPU with their expert (% of GPU-layer pairs),
expected remote nodes per token (``eplb.traffic``, with router groups where the model has them),
and the single-thread plan time of one plan.

    python benchmarks/bench_quality.py [--data ../shared/eplb_real_data] [--out docs/benchmarks/quality.md]

Real sets are read from ``--data`` (skipped when absent); nothing is copied into the repo.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import eplb
from eplb.errors import EplbError
from eplb.io.loads import read_load
from eplb.metrics import evaluate
from eplb.planning import ALGORITHMS, get
from eplb.traffic import expected_remote_nodes

ORDER = ["linear", "round_robin", "deepseek", "deepseek_hierarchical", "deepseek_vec", "deepseek_vec_hierarchical",
         "eplb"]


@dataclass(frozen=True)
class Setup:
    name: str
    gpus: int
    slots: int
    nodes: int
    groups: int | None
    top_k: int
    groups_per_token: int | None = None


def _moe(load: torch.Tensor) -> torch.Tensor:
    """``[T, L, E]`` without the layers that carry no load in any window (dense layers)."""
    return load[:, load.sum(dim=(0, 2)) > 0]


def _plan(history: torch.Tensor, setup: Setup, algo: str):
    return eplb.plan(history, num_gpus=setup.gpus, num_slots=setup.slots, num_nodes=setup.nodes,
                     num_groups=setup.groups, algorithm=algo)


def _supported(algo: str, setup: Setup, num_experts: int) -> bool:
    try:
        get(algo).check(eplb.planning.Cluster(setup.gpus, setup.slots, setup.nodes, setup.groups), num_experts)
        _plan(torch.ones(1, 1, num_experts), setup, algo)
    except EplbError:
        return False
    return True


def _score(placement, load: torch.Tensor, setup: Setup) -> dict[str, float]:
    report = evaluate(placement, load)
    summary = report.summary()
    traffic = expected_remote_nodes(placement, load, top_k=setup.top_k, num_groups=setup.groups,
                                    groups_per_token=setup.groups_per_token)
    return {
        "mm": summary["max_over_mean"], "worst": summary["worst_max_over_mean"], "gap": summary["gap"],
        "dup": 100.0 * summary["duplicates"] / (placement.num_layers * placement.num_gpus),
        "traffic": float(traffic.mean()),
    }


def _plan_ms(history: torch.Tensor, setup: Setup, algo: str, runs: int = 5) -> tuple[float, float]:
    """(min, median) CPU ms of one plan over ``runs`` runs."""
    times = []
    for _ in range(runs):
        start = time.process_time()
        _plan(history, setup, algo)
        times.append(1e3 * (time.process_time() - start))
    return min(times), statistics.median(times)


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    out["worst"] = max(r["worst"] for r in rows)
    return out


def evaluate_set(title: str, windows: list[torch.Tensor], setup: Setup, tests: list[tuple[list[int], int]],
                 extra_oos: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> str:
    """One table: in sample on every window, out of sample on ``tests`` (fit indices, held-out index)."""
    num_experts = windows[0].shape[-1]
    lines = [f"### {title}", "",
             f"{setup.name}: {setup.gpus} GPUs, {setup.slots} slots, {setup.nodes} node(s), "
             f"groups {setup.groups}, top-{setup.top_k}" + (f", {setup.groups_per_token} groups per token"
                                                             if setup.groups_per_token else ""), "",
             "| algorithm | in-sample max/mean | gap to bound | dup % | remote nodes/token | out-of-sample max/mean "
             "| OOS worst layer | plan ms |", "|---|---|---|---|---|---|---|---|"]
    for algo in ORDER:
        if algo not in ALGORITHMS or not _supported(algo, setup, num_experts):
            continue
        ins = _mean([_score(_plan(w, setup, algo), w, setup) for w in windows])
        oos_rows = [_score(_plan(torch.cat([windows[i] for i in fit]), setup, algo), windows[held], setup)
                    for fit, held in tests]
        oos_rows += [_score(_plan(h, setup, algo), target, setup) for h, target in (extra_oos or [])]
        oos = _mean(oos_rows) if oos_rows else None
        ms, _ = _plan_ms(windows[0], setup, algo)
        lines.append(
            f"| {algo} | {ins['mm']:.4f} | {ins['gap']:.4f} | {ins['dup']:.1f} | {ins['traffic']:.3f} | "
            + (f"{oos['mm']:.4f} | {oos['worst']:.3f}" if oos else "- | -") + f" | {ms:.1f} |"
        )
    return "\n".join(lines) + "\n"


def loo(n: int) -> list[tuple[list[int], int]]:
    """Leave-one-out splits (none for a single window)."""
    return [([i for i in range(n) if i != k], k) for k in range(n)] if n > 1 else []


def zipf_windows(alpha: float, layers: int = 16, experts: int = 256, windows: int = 8, seed: int = 0):
    """Windows of Zipf(alpha) expert popularity, per-layer random ranks, drifting +-30% per window."""
    gen = torch.Generator().manual_seed(seed)
    rank = torch.stack([torch.randperm(experts, generator=gen) for _ in range(layers)]) + 1
    base = rank.to(torch.float64) ** -alpha
    out = []
    for _ in range(windows):
        drift = torch.exp(0.3 * torch.randn(layers, experts, generator=gen, dtype=torch.float64))
        out.append((1e6 * base * drift / (base * drift).sum(-1, keepdim=True)).round().unsqueeze(0))
    return out


def redundancy(title: str, windows: list[torch.Tensor], gpus: int, slot_counts: tuple[int, ...]) -> str:
    """Out of sample (leave-one-out) max/mean of deepseek and eplb as the redundant slots grow, one node."""
    lines = [f"### {title}: out of sample vs redundant slots ({gpus} GPUs, one node)", "",
             "| slots | deepseek OOS max/mean | eplb OOS max/mean |", "|---|---|---|"]
    for slots in slot_counts:
        setup = Setup("", gpus, slots, 1, None, 8)
        cells = []
        for algo in ("deepseek", "eplb"):
            rows = [_score(_plan(torch.cat([windows[i] for i in fit]), setup, algo), windows[held], setup)
                    for fit, held in loo(len(windows))]
            cells.append(f"{_mean(rows)['mm']:.3f}")
        lines.append(f"| {slots} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def scaling(load: torch.Tensor) -> str:
    """Plan time of ``eplb`` and ``deepseek`` (one window; min / median of 20 runs, side by side)."""
    lines = [f"### Plan time vs cluster size ({load.shape[1]} layers x {load.shape[2]} experts, one window, "
             "one thread; CPU ms, min / median of 20 runs)", "",
             f"Load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores).", "",
             "| GPUs | slots | nodes | eplb ms | deepseek ms |", "|---|---|---|---|---|"]
    for gpus, slots, nodes in ((32, 288, 1), (32, 288, 4), (64, 320, 8), (64, 512, 1), (128, 512, 1),
                               (256, 1024, 1), (256, 1024, 32)):
        setup = Setup("", gpus, slots, nodes, 8, 8)
        ours, ref = _plan_ms(load, setup, "eplb", 20), _plan_ms(load, setup, "deepseek", 20)
        lines.append(f"| {gpus} | {slots} | {nodes} | {ours[0]:.0f} / {ours[1]:.0f} | {ref[0]:.0f} / {ref[1]:.0f} |")
    lines += ["", f"Load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}."]
    return "\n".join(lines) + "\n"


NOTES = """### Notes

- eplb runs with its defaults (`HedgedConfig(risk=1.0, half_life=8.0, locality=0.25)`); no constant was fitted
  to these sets. Out-of-sample histories are the other workloads as windows, oldest first in file-name order.
- Duplicates (a replica on a GPU that already holds its expert): none of these specs forces one by the slot
  counts (`eplb.planning.hedged.forced_duplicates`). The loads can: on Zipf >= 1.5 more replicas heavier than
  half a GPU's fair load exist than GPUs, one GPU must take two, and two replicas of one expert can be the
  lightest pair. With one node eplb then keeps DeepSeek's duplicate (after its own search, moving every
  duplicate it can without raising the peak) only where that beats its duplicate-free plan
  (`HedgedConfig(allow_duplicates=False)` forbids it). With several nodes it stays duplicate-free and has no
  DeepSeek fallback (that plan ignores nodes and groups), so on Zipf 1.5 at 4 nodes it is still above deepseek:
  1.238 at the default locality 0.25, 1.206 at 0.1, 1.204 at 0 (deepseek 1.192), with 1.31 / 1.36 / 1.38
  remote nodes per token against deepseek's 1.99.
- Synthetic out of sample: the drift is independent noise per window, which no history predicts, so hedging
  buys nothing and costs a little; on the real sets, where workloads share structure, it pays.
- OLMoE out of sample misses the issue's 1.10 (eplb 1.275, deepseek 1.43). One placement can serve all six
  domains: eplb fitted on all six scores 1.037-1.059 on each. Fitted on five, the sixth is not predicted: the
  heaviest replica is at most 0.85 of a GPU's mean load on every held-out layer, so replica counts are not the
  limit; each GPU's sum of its 10 replicas is. An expert's share varies by a coefficient of variation of 0.63
  across domains (pairwise correlations of the domains' shares -0.41 to 0.84), and ten such shares summed give
  a GPU a CV near 0.19, so the heaviest of 8 GPUs lands near 1 + 1.4 x 0.19 = 1.27 whatever the packing,
  unless the history predicts the direction of the shift. Tried, not kept: shrinking the window covariance
  toward its diagonal (independent per-expert risk; 1.34-1.44) and risk 0 / 2 / 3 / 5 (1.35 / 1.34 / 1.38 /
  1.28; three layers, so noisy). More redundant slots help both algorithms but do not reach 1.10 in the range
  an engine would spend (the redundancy table: at 192 slots, three per expert, eplb still scores about 1.14).
- Plan times are CPU time of the one thread (`time.process_time`; tables: best of 5), so other jobs on the
  shared 2-core machine inflate them less than wall-clock; the load averages around the timing table say how
  busy the machine was, and times vary by about +-30% between runs.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared"
                        / "eplb_real_data")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dsv3_ep32 = Setup("EP32", 32, 288, 4, 8, 8, 4)
    dsv3_ep64 = Setup("EP64", 64, 320, 8, 8, 8, 4)
    parts = ["# Placement quality\n", "Machine: 2-core CPU, one torch thread. Command: "
             "`python benchmarks/bench_quality.py --out docs/benchmarks/quality.md`.\n"]
    sglang = sorted((args.data / "sglang-dsv3-ep-stats").glob("*.json"))
    mmlu = sorted((args.data / "dsv3-0324-mmlu-expert-counts").glob("*.json"))
    if sglang:
        windows = [_moe(read_load(p).load) for p in sglang]
        mmlu_w = [_moe(read_load(p).load) for p in mmlu]
        for setup in (dsv3_ep32, dsv3_ep64):
            parts.append(evaluate_set(f"DeepSeek-V3 prefill, SGLang ({len(windows)} files; OOS: leave-one-out, "
                                      "history = the other 7 files)", windows, setup, loo(len(windows))))
        if mmlu_w:
            cross = [(torch.cat(windows), w) for w in mmlu_w] + [(torch.cat(mmlu_w), w) for w in windows]
            parts.append(evaluate_set("Cross-workload: fit on the 8 SGLang files, score MMLU 4k/8k, and fit on "
                                      "MMLU 4k+8k, score each SGLang file (in-sample columns: SGLang files)",
                                      windows, dsv3_ep32, [], cross))
    if mmlu:
        parts.append(evaluate_set("DeepSeek-V3-0324 MMLU (4k, 8k; OOS: one against the other)", mmlu_w, dsv3_ep32,
                                  loo(len(mmlu_w))))
    olmoe = args.data / "olmoe-mixtral-routing-counts"
    for name, setup in (("olmoe", Setup("EP8", 8, 80, 2, None, 8)), ("olmoe-sft", Setup("EP8", 8, 80, 2, None, 8)),
                        ("olmoe-dpo", Setup("EP8", 8, 80, 2, None, 8)), ("mistral", Setup("EP4", 4, 12, 1, None, 2))):
        path = olmoe / f"{name}_expert_counts.json"
        if path.exists():
            loaded = read_load(path)
            domain_w = [loaded.load[i : i + 1] for i in range(loaded.num_steps)]
            oos = "leave-one-domain-out" if len(domain_w) > 1 else "none, in sample only"
            parts.append(evaluate_set(f"{name} ({len(domain_w)} domain(s); OOS: {oos})", domain_w, setup,
                                      loo(len(domain_w))))
            if name == "olmoe":
                parts.append(redundancy(name, domain_w, setup.gpus, (72, 80, 96, 128, 192)))
    synth = Setup("EP32", 32, 288, 4, 8, 8, 4)
    for alpha in (0.5, 1.0, 1.5):
        w = zipf_windows(alpha)
        parts.append(evaluate_set(f"Synthetic Zipf {alpha} (16 layers x 256 experts; OOS: fit 7 windows, score the "
                                  "8th)", w, synth, [(list(range(7)), 7)]))
    parts.append(scaling(windows[1] if sglang else zipf_windows(1.0, layers=58)[0]))
    parts.append(NOTES)
    text = "\n".join(parts)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
