"""The EP layer with an eplb placement, weighted dispatch and waterfill equals the single-process dense layer.

    torchrun --nproc-per-node 2 -m benchmarks.multi_gpu.correctness --out $OUT/correctness.json
    torchrun --nproc-per-node 2 -m benchmarks.multi_gpu.correctness --small --out /tmp/c.json   # CPU, gloo

Per config (experts x waterfill mode), one DeepSeek-V3-like MoE layer in bf16 (hidden 7168, intermediate
2048, grouped router with 8 groups of which 4 per token, top-8, routed scaling 2.5, one shared expert of
2048), the same random checkpoint on every rank (a skewed router bias makes some experts hot):

1. every rank routes a calibration batch with the dense router; the counts, summed over the ranks, are the
   load ``[1, E]`` that ``eplb.plan(algorithm="eplb")`` places ``E * 9 / 8`` slots from;
2. ``EPMoE`` with that placement, ``dispatch="weighted"`` (replica weights solved from the load) and
   waterfill (``static`` from the load, or ``dynamic``: an all-reduce per layer) serves an uneven batch
   per rank;
3. each rank compares its output with ``dense_moe`` (the full checkpoint on that rank) on the same tokens.

Reported per config and rank: max abs error, max abs error over max |dense| (``max_rel_err``), whether
``allclose(ep, dense, rtol, atol * rms(dense))`` holds, the routed entries each rank computed and the
shared-expert rows waterfill moved. The run fails (exit 1) when any config is not allclose.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from benchmarks.multi_gpu.common import Group, default_slots, device_experts, finish, join, parser

import eplb
from eplb import WaterfillConfig
from eplb.runtime.moe import EPMoE, EPMoEConfig, dense_moe, local_slot_weights, route


def parse():
    p = parser(__doc__)
    p.add_argument("--experts", default="64,128,256", help="routed experts per config, comma-separated")
    p.add_argument("--waterfill", default="static,dynamic", help="waterfill modes per config, comma-separated")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=2048, help="mean tokens per rank (ranks get 0.5x to 1.5x)")
    p.add_argument("--rtol", type=float, default=2e-2)
    p.add_argument("--atol", type=float, default=2e-2, help="times the dense output's rms")
    args = p.parse_args()
    if args.small:
        args.experts, args.hidden, args.intermediate, args.tokens = "16", 64, 32, 64
    return args


def run_config(args, group: Group, experts: int, mode: str) -> dict:
    dtype = torch.bfloat16
    config = EPMoEConfig(hidden=args.hidden, intermediate=args.intermediate, num_experts=experts, top_k=8,
                         router="grouped", num_groups=8, topk_groups=4, routed_scaling_factor=2.5,
                         shared_expert=True, dispatch="weighted", waterfill=True, dtype=dtype, seed=args.seed)
    dev, h, i = group.device, args.hidden, args.intermediate
    gen = torch.Generator(device=dev).manual_seed(args.seed + experts)
    full = {"w13": device_experts(experts, 2 * i, h, dtype, dev, gen),
            "w2": device_experts(experts, h, i, dtype, dev, gen)}
    shared = {"w13": device_experts(1, 2 * i, h, dtype, dev, gen)[0],
              "w2": device_experts(1, h, i, dtype, dev, gen)[0]}
    order = torch.randperm(experts, generator=torch.Generator().manual_seed(args.seed))
    router = {"gate": device_experts(1, experts, h, dtype, dev, gen)[0],
              "bias": (0.3 * torch.linspace(1, -1, experts)[order]).to(dev, dtype)}

    tokens = torch.Generator(device=dev).manual_seed(args.seed * 1000 + group.rank)
    calibration = torch.randn(args.tokens, h, device=dev, generator=tokens).to(dtype)
    ids, _ = route(calibration, router, config)
    load = torch.bincount(ids.flatten(), minlength=experts).to(torch.float64)
    dist.all_reduce(load)
    load = load.cpu()[None]  # [1, E]
    placement = eplb.plan(load, num_gpus=group.world, num_slots=default_slots(experts, group.world),
                          algorithm="eplb")
    layer = EPMoE(config, placement, 0, local_slot_weights(full, placement, group.rank, 0), router, shared,
                  load=load, waterfill_config=WaterfillConfig(mode=mode, min_batch=0))
    m = int(args.tokens * (0.5 + group.rank / max(1, group.world - 1))) if group.world > 1 else args.tokens
    x = torch.randn(m, h, device=dev, generator=tokens).to(dtype)
    out = layer(x).float()
    want = dense_moe(x, router, full, shared, config).float()
    diff = (out - want).abs()
    scale = want.abs().max().item() if m else 0.0
    rms = want.pow(2).mean().sqrt().item() if m else 0.0
    ok = bool(torch.allclose(out, want, rtol=args.rtol, atol=args.atol * rms)) if m else True
    counts = layer.last_slot_tokens
    return {
        "experts": experts, "slots": placement.num_slots, "waterfill": mode, "tokens": m,
        "max_abs_err": diff.max().item() if m else 0.0, "max_rel_err": diff.max().item() / scale if scale else 0.0,
        "dense_rms": rms, "allclose": ok, "routed_entries": int(counts[:-1].sum()),
        "shared_rows_computed": int(counts[-1]),
    }


def summarize(rows: list[dict]) -> dict:
    configs = []
    for index, first in enumerate(rows[0]["configs"]):
        per_rank = [r["configs"][index] for r in rows]
        entries = torch.tensor([c["routed_entries"] + c["shared_rows_computed"] for c in per_rank], dtype=torch.float64)
        configs.append({
            "experts": first["experts"], "slots": first["slots"], "waterfill": first["waterfill"],
            "max_abs_err": max(c["max_abs_err"] for c in per_rank),
            "max_rel_err": max(c["max_rel_err"] for c in per_rank),
            "allclose": all(c["allclose"] for c in per_rank),
            "entries_max_over_mean": float(entries.max() / entries.mean()) if entries.sum() else None,
        })
    return {"configs": configs, "all_allclose": all(c["allclose"] for c in configs)}


def main() -> None:
    args = parse()
    group = join(args)
    configs = []
    for experts in map(int, args.experts.split(",")):
        for mode in args.waterfill.split(","):
            configs.append(run_config(args, group, experts, mode))
            if group.device.type == "cuda":
                torch.cuda.empty_cache()
    ok = all(c["allclose"] for c in configs)
    flag = torch.tensor([int(ok)], device=group.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    finish(group, args, {"rank": group.rank, "configs": configs}, summarize, rtol=args.rtol, atol=args.atol)
    if not flag.item():
        raise SystemExit("the EP layer differs from the dense layer beyond the tolerance (see the result file)")


if __name__ == "__main__":
    main()
