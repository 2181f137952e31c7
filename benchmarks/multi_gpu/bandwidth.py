"""Migration bandwidth of a DeepSeek-V3-sized rebalance, sync and async, against plain send/recv between the
same ranks; and what an async rebalance in flight costs a serving step.

    torchrun --nproc-per-node 4 -m benchmarks.multi_gpu.bandwidth --out $OUT/bandwidth.json
    torchrun --nproc-per-node 2 -m benchmarks.multi_gpu.bandwidth --small --out /tmp/b.json    # CPU, gloo

The weights: ``--layers`` MoE layers (DeepSeek-V3 has 58; default: as many as fit ``--memory-gb`` 100 per
rank with the run's other buffers, at most 58: 2 at 1 GPU, 10 at 2, 26 at 4, 58 at 8) of 256 experts on
288 slots over the ranks, each slot fp8 e4m3 ``w13 [4096, 7168]`` and ``w2 [7168, 2048]`` with float32
128x128 block scales (44 MB), random bytes. The rebalance: an ``eplb``
placement planned on ``--loads`` (default: the bundled DeepSeek-V3 MMLU counts), re-planned with
``current=`` on the new workload ``--to`` (default: each layer takes the next layer's counts, a shift with
the real skew), ``--max-moves`` per layer (default: no bound).

- **sync**: ``migrate(weights, old, new)`` timed between device syncs, ``--repeats`` times alternating
  direction (the first warms up the communicators); per rank the weight bytes it received, and bytes per
  second per GPU over the slowest rank's time; the report's intra- and inter-node bytes and phase times.
- **bound**: the same per-layer pair volumes sent with plain send/recv (the ops ``migrate`` posts, all of a
  layer's messages at once, no staging, checksums or handshakes), and a plain device copy of each rank's
  moved bytes (the bound when every move is local, as on one GPU).
- **async**: a ``Rebalancer(mode="async")`` is ordered (``move_to``) to the other placement while every rank
  serves steps of ``--serve-layers`` reference ``EPMoE`` forwards (bf16, DeepSeek-V3 expert shapes, hash
  dispatch, ``--tokens`` tokens; the served experts are a stand-in compute and do not move), committing
  ``--layers-per-step`` layers per step; step times (the slowest rank's) against the same steps without a
  rebalancer (``timing.step_overhead``), ``--rounds`` interleaved rounds.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from benchmarks.bench_runtime_migration import expert_tensors
from benchmarks.multi_gpu.common import (
    Group,
    default_slots,
    device_experts,
    finish,
    gathered_max,
    join,
    land,
    parser,
    read_layer_loads,
)
from benchmarks.timing import step_overhead, timed_steps

import eplb
from eplb import ExpertLoadRecorder
from eplb.placement import Placement
from eplb.runtime.migration import ExpertWeights, MigrationConfig, migrate, plan_layer
from eplb.runtime.migration.transfer import _post  # the ops migrate posts, for the plain bound
from eplb.runtime.moe import EPMoE, EPMoEConfig
from eplb.runtime.rebalancer import Rebalancer, RebalancerConfig

MODEL_LAYERS = 58


def parse():
    p = parser(__doc__)
    p.add_argument("--layers", type=int, default=None, help="MoE layers moved (default: what --memory-gb holds)")
    p.add_argument("--memory-gb", type=float, default=100.0, help="per-rank device memory the default --layers fits")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--slots", type=int, default=None, help="default: experts * 9 / 8 (288 for 256)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the placement declares")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--loads", default=None, help="loads file to plan the serving placement on (default: bundled)")
    p.add_argument("--to", default=None, help="loads file of the new workload (default: the next layer's loads)")
    p.add_argument("--max-moves", type=int, default=None)
    p.add_argument("--max-peers", type=int, default=1)
    p.add_argument("--staging-bytes", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="sync migrations, alternating direction")
    p.add_argument("--rounds", type=int, default=2, help="async rounds (each against a run without)")
    p.add_argument("--serve-layers", type=int, default=4, help="EPMoE forwards per serving step")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank and serving step")
    p.add_argument("--layers-per-step", type=int, default=1)
    p.add_argument("--migration-timeout-s", type=float, default=120.0)
    args = p.parse_args()
    if args.small:
        args.layers, args.experts, args.hidden, args.intermediate, args.tokens = 3, 16, 256, 128, 64
        args.serve_layers, args.repeats, args.rounds = 2, 2, 1
    return args


def placements(args, group: Group) -> tuple[Placement, Placement]:
    """The serving placement and the rebalanced one (the same on every rank: planned from files)."""
    slots = args.slots or default_slots(args.experts, group.world)
    before = read_layer_loads(args.loads, args.layers, args.experts)
    if args.to is None:
        after = torch.roll(read_layer_loads(args.loads, args.layers + 1, args.experts), -1, 0)[: args.layers]
    else:
        after = read_layer_loads(args.to, args.layers, args.experts)
    old = eplb.plan(before, num_gpus=group.world, num_slots=slots, num_nodes=args.nodes, algorithm="eplb")
    new = eplb.plan(after, num_gpus=group.world, num_slots=slots, num_nodes=args.nodes, algorithm="eplb",
                    current=old, max_moves=args.max_moves)
    return old, new


def pair_bytes(old: Placement, new: Placement, rank: int, bytes_per_slot: int, max_peers: int) -> list[list]:
    """Per layer, this rank's messages as ``(is_send, nbytes, peer, tag)`` (the plan's, rounds merged; the tag
    is the message's index in the layer's plan, the same at both ends)."""
    out = []
    for layer in range(old.num_layers):
        t = plan_layer(old, new, layer, max_peers=max_peers)
        out.append([(m.src == rank, len(m.experts) * bytes_per_slot, m.dst if m.src == rank else m.src, tag)
                    for tag, m in enumerate(t.messages) if rank in (m.src, m.dst)])
    return out


def plain_bound(messages: list[list], filled: list[int], group: Group) -> dict:
    """Seconds to send every layer's pair volumes with plain P2P (the second of two runs), and to copy each
    layer's ``filled`` bytes of this rank once on the device; layer by layer, summed, so buffers stay one
    layer's size."""
    most = max([sum(n for _, n, _, _ in layer) for layer in messages] + [1])
    buffer = torch.empty(most, dtype=torch.uint8, device=group.device)
    seconds = 0.0
    for _ in range(2):
        seconds = 0.0
        for layer in messages:
            ops, at = [], 0
            for is_send, nbytes, peer, tag in layer:
                ops.append((is_send, buffer[at : at + nbytes], peer, tag))
                at += nbytes
            group.sync()
            dist.barrier()
            start = time.perf_counter()
            for work in _post(ops, None):
                work.wait()
            group.sync()
            seconds += time.perf_counter() - start
    del buffer
    src = torch.empty(max(filled + [1]), dtype=torch.uint8, device=group.device)
    dst = torch.empty_like(src)
    copy = 0.0
    for nbytes in filled:
        group.sync()
        start = time.perf_counter()
        dst[:nbytes].copy_(src[:nbytes])
        group.sync()
        copy += time.perf_counter() - start
    return {"plain_p2p_s": max(gathered_max([seconds], group)), "plain_copy_s": copy}


def sync_runs(args, group: Group, weights: ExpertWeights, old: Placement, new: Placement) -> tuple[list, Placement]:
    config = MigrationConfig(max_peers=args.max_peers, staging_bytes=args.staging_bytes,
                             timeout_s=args.migration_timeout_s)
    per_slot = weights.bytes_per_slot(0)
    runs, serving = [], old
    for repeat in range(args.repeats):
        target = new if serving is old else old
        sent = pair_bytes(serving, target, group.rank, per_slot, args.max_peers)
        group.sync()
        dist.barrier()
        start = time.perf_counter()
        report = migrate(weights, serving, target, config=config)
        group.sync()
        mine = time.perf_counter() - start
        slowest = max(gathered_max([mine], group))
        received = sum(n for layer in sent for is_send, n, _, _ in layer if not is_send)
        filled = [len(plan_layer(serving, target, layer).rank_fills(group.rank)) * per_slot
                  for layer in range(old.num_layers)]
        runs.append({
            "repeat": repeat, "direction": "old->new" if target is new else "new->old", "seconds": mine,
            "slowest_rank_s": slowest, "received_bytes": received, "filled_bytes_here": sum(filled),
            "recv_GBps_per_gpu": received / slowest / 1e9, "fill_GBps_per_gpu": sum(filled) / slowest / 1e9,
            "moves": report.moves,
            "bytes_intra_node": report.bytes_intra_node, "bytes_inter_node": report.bytes_inter_node,
            "phases_s": report.seconds, **plain_bound(sent, filled, group),
        })
        serving = target
    return runs, serving


def async_runs(args, group: Group, weights: ExpertWeights, serving: Placement, other: Placement) -> list[dict]:
    """Step times with an async rebalance in flight against the same steps without a rebalancer."""
    dev, dtype = group.device, torch.bfloat16
    config = EPMoEConfig(hidden=args.hidden, intermediate=args.intermediate, num_experts=args.experts, top_k=8,
                         router="softmax", dispatch="hash", dtype=dtype)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    spr = serving.slots_per_gpu
    served = {"w13": device_experts(spr, 2 * args.intermediate, args.hidden, dtype, dev, gen),
              "w2": device_experts(spr, args.hidden, args.intermediate, dtype, dev, gen)}
    router = {"gate": device_experts(1, args.experts, args.hidden, dtype, dev, gen)[0]}
    plan = eplb.plan(torch.ones(1, args.experts), num_gpus=group.world, num_slots=serving.num_slots,
                     algorithm="linear")
    # One set of served weights for every forward: the compute of --serve-layers layers at one layer's memory.
    layers = [EPMoE(config, plan, 0, served, router) for _ in range(args.serve_layers)]
    x = torch.randn(args.tokens, args.hidden, device=dev, generator=gen).to(dtype)
    moving = serving.num_layers
    steps = 4 + moving // args.layers_per_step + 6  # warm-up, the rebalance, then idle steps

    def run(rebalancer: Rebalancer | None, target: Placement | None) -> list[tuple[float, bool]]:
        def order(i: int) -> None:
            if rebalancer is not None and i == 4:
                rebalancer.move_to(target)

        def step(i: int) -> bool:
            for layer in layers:
                layer(x)
            if rebalancer is None:
                return False
            busy = rebalancer.migrating
            rebalancer.recorder.step()
            rebalancer.step()
            return busy or rebalancer.migrating

        timed = timed_steps(step, steps, group.sync, before=order)
        slowest = gathered_max([t for t, _ in timed], group)
        return [(t, busy) for t, (_, busy) in zip(slowest, timed, strict=True)]

    out = []
    for round_ in range(args.rounds):
        base = run(None, None)
        recorder = ExpertLoadRecorder(serving.num_layers, serving.num_slots, window=steps, device=dev)
        rb = Rebalancer(recorder, serving, weights, config=RebalancerConfig(
            every=10**6, mode="async", layers_per_step=args.layers_per_step,
            migration=MigrationConfig(max_peers=args.max_peers, staging_bytes=args.staging_bytes,
                                      timeout_s=args.migration_timeout_s)))
        with_rb = run(rb, other)
        land(rb)
        rb.close()
        record = rb.rebalances[-1] if rb.rebalances else None
        out.append({"round": round_, "steps": steps, **step_overhead([t for t, _ in base[2:]], with_rb[2:]),
                    "moves": record.report.moves if record else 0, "error": record.error if record else None,
                    "landed": bool(rb.serving == other),
                    "phases_s": record.report.seconds if record else None})
        serving, other = (other, serving) if rb.serving == other else (serving, other)
    return out


def summarize(rows: list[dict]) -> dict:
    sync = []
    for index, first in enumerate(rows[0]["sync"]):
        per_rank = [r["sync"][index] for r in rows]
        seconds = first["slowest_rank_s"]
        remote = any(r["received_bytes"] for r in per_rank)  # none at one GPU: every move is a local copy
        sync.append({
            "direction": first["direction"], "seconds": seconds, "moves": first["moves"],
            "bytes_intra_node": first["bytes_intra_node"], "bytes_inter_node": first["bytes_inter_node"],
            "recv_GBps_per_gpu_mean": sum(r["recv_GBps_per_gpu"] for r in per_rank) / len(per_rank),
            "recv_GBps_per_gpu_min": min(r["recv_GBps_per_gpu"] for r in per_rank),
            "plain_p2p_s": first["plain_p2p_s"] if remote else None,
            "ratio_to_plain_p2p": seconds / first["plain_p2p_s"] if remote else None,
            "plain_copy_s_max": max(r["plain_copy_s"] for r in per_rank),
            # Every slot filled, local copies included, over the slowest rank's time: the one rate at one GPU.
            "fill_GBps_per_gpu_mean": sum(r["fill_GBps_per_gpu"] for r in per_rank) / len(per_rank),
            "ratio_to_plain_copy": seconds / max(max(r["plain_copy_s"] for r in per_rank), 1e-9),
        })
    return {"layers": rows[0]["layers"], "bytes_per_slot": rows[0]["bytes_per_slot"], "sync": sync,
            "async": rows[0]["async"]}


def main() -> None:
    args = parse()
    group = join(args)
    per_slot = sum(t[0].numel() * t.element_size() for t in expert_tensors(
        1, args.hidden, args.intermediate, True, torch.device("meta")).values())
    spr = (args.slots or default_slots(args.experts, group.world)) // group.world
    if args.layers is None:
        # Besides the moved layers: the served stand-in (bf16, twice an fp8 slot), a layer's staging and the
        # bound's two copy buffers of a layer.
        layer_bytes = spr * per_slot
        fits = int((args.memory_gb * 1e9 - 2 * layer_bytes) // layer_bytes) - 3
        args.layers = max(1, min(MODEL_LAYERS, fits))
    old, new = placements(args, group)
    weights = ExpertWeights([expert_tensors(spr, args.hidden, args.intermediate, True, group.device)
                             for _ in range(args.layers)])
    sync, serving = sync_runs(args, group, weights, old, new)
    if group.device.type == "cuda":
        torch.cuda.empty_cache()  # the sync part's staging and bound buffers, before the served stand-in
    other = new if serving is old else old
    row = {"rank": group.rank, "layers": args.layers, "bytes_per_slot": weights.bytes_per_slot(0), "sync": sync,
           "async": async_runs(args, group, weights, serving, other)}
    moves = (old.phy2log != new.phy2log).sum(1).tolist()
    finish(group, args, row, summarize, slots=old.num_slots, moves_per_layer=moves)


if __name__ == "__main__":
    main()
