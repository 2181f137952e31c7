"""What the online rebalancer costs a serving step, on one GPU: step time with an async rebalance in flight
against the same steps without a rebalancer, and the sync rebalance's copy rate against the HBM copy bound.

    python benchmarks/bench_rebalancer.py --json out.json          # H200: DeepSeek-V3 expert shapes, bf16
    python benchmarks/bench_rebalancer.py --fp8 --json out.json    # the rebalancer moves fp8 experts + scales
    python benchmarks/bench_rebalancer.py --small                  # CPU smoke run

One process is a one-rank EP group, so every move is a local copy (staged, checksummed, committed), and
one GPU is always balanced, so the rebalance is ordered with ``Rebalancer.move_to``: every redundant slot
of every layer takes another expert (``--slots - --experts`` moves per layer); the multi-GPU transfers are
measured on several GPUs (docs/benchmarks/multi_gpu.md). A step is the reference ``EPMoE`` forward of every
layer on ``--tokens`` tokens plus ``recorder.step()`` and ``rebalancer.step()``, timed from one sync of the
serving stream to the next (the side stream's staging overlaps the next step, as in an engine); async mode
commits ``--layers-per-step`` layers per step. Two copies of the model serve step by step in turn
(``timing.alternating_steps``), one without a rebalancer: each migrating step is compared with its neighbour
(``paired_overhead``), which the machine's drift (20% within a run for a host-bound step) hits alike, as well
as with the medians. Each round orders one rebalance: to the target in even rounds, back in odd ones. Each
step also records ``Probes`` (garbage collection, device allocations, Triton compilations, host time), which
say what a slow step spent its time on.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist

import eplb
from bench_runtime_migration import expert_tensors
from eplb import ExpertLoadRecorder
from eplb.runtime.migration import ExpertWeights, MigrationConfig
from eplb.runtime.moe import EPMoE, EPMoEConfig, local_slot_weights
from eplb.runtime.rebalancer import Rebalancer, RebalancerConfig
from timing import alternating_steps, meta, paired_overhead, step_overhead, write_json


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--slots", type=int, default=72)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=24, help="steps per round (the rebalance is ordered half way)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, one rebalance each")
    parser.add_argument("--layers-per-step", type=int, default=1, help="async: layers committed per step")
    parser.add_argument("--touch-target", action="store_true",
                        help="before the first round, run one untimed forward of every layer on the target placement's "
                             "tables (wrong experts, right shapes): separates the layer's first use of a placement "
                             "from the migration's cost")
    parser.add_argument("--fp8", action="store_true",
                        help="the rebalancer moves fp8 e4m3 experts with float32 128x128 block scales (random bytes, "
                             "registered beside the layers, which keep computing in bf16 on theirs: a step's compute "
                             "stays the bf16 reference's, and after a commit it uses the wrong experts' weights)")
    parser.add_argument("--json", default=None)
    return parser.parse_args()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _serving_sync(device: torch.device) -> None:
    """The end of a serving step: the serving stream's work done (an engine never waits for the side stream,
    whose staging overlaps the next forward pass)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class Probes:
    """Per-step counters that tell a slow step's cause: Python's garbage collection (ms), device allocations
    by the caching allocator (``cudaMalloc`` calls and out-of-memory retries, which free the cache), Triton
    kernels compiled, and the host time of the step's launches and ``rebalancer.step()``."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.gc_s, self._gc_start = device, 0.0, 0.0
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, _: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc_start

    def counters(self) -> tuple[float, int, int, int]:
        stats = torch.cuda.memory_stats(self.device) if self.device.type == "cuda" else {}
        return (self.gc_s, stats.get("num_device_alloc", 0), stats.get("num_alloc_retries", 0), _compiled_kernels())

    @staticmethod
    def delta(before: tuple, after: tuple, host_s: float) -> dict:
        return {"gc_ms": round((after[0] - before[0]) * 1e3, 2), "device_allocs": after[1] - before[1],
                "alloc_retries": after[2] - before[2], "triton_compiles": after[3] - before[3],
                "host_ms": round(host_s * 1e3, 2)}


def _compiled_kernels() -> int:
    """Kernel variants Triton has compiled in this process for the migration's kernels (0 without triton)."""
    try:
        from eplb.runtime.migration import checksums_triton as kernels
    except ImportError:
        return 0
    jitted = (kernels._copy_rows_kernel, kernels._checksum_kernel)
    return sum(len(cache[0]) for fn in jitted for cache in getattr(fn, "device_caches", {}).values())


def main() -> None:
    args = parse()
    hidden, inter = (128, 128) if args.small else (7168, 2048)
    if args.small:
        args.experts, args.slots, args.tokens, args.layers = 16, 20, 256, 2
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1, device_id=device if cuda else None)
    dtype = torch.bfloat16 if cuda else torch.float32
    config = EPMoEConfig(hidden=hidden, intermediate=inter, num_experts=args.experts, top_k=8, router="grouped",
                         num_groups=8, topk_groups=4, routed_scaling_factor=2.5, shared_expert=False,
                         dispatch="hash", dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    routers, fulls = [], []
    for _ in range(args.layers):
        routers.append({"gate": torch.randn(args.experts, hidden, device=device, dtype=dtype, generator=gen) * 0.02,
                        "bias": torch.zeros(args.experts, device=device, dtype=dtype)})
        fulls.append({"w13": torch.randn(args.experts, 2 * inter, hidden, device=device, dtype=dtype, generator=gen),
                      "w2": torch.randn(args.experts, hidden, inter, device=device, dtype=dtype, generator=gen)})
    x = torch.randn(args.tokens, hidden, device=device, dtype=dtype, generator=gen)

    start = eplb.plan(torch.ones(args.layers, args.experts), num_gpus=1, num_slots=args.slots, algorithm="linear")
    moved = start.phy2log.clone()
    spare = args.slots - args.experts
    moved[:, args.experts :] = (moved[:, args.experts :] + spare) % args.experts
    target = eplb.Placement(moved, args.experts, 1)

    class Server:
        """One model's layers, recorder and (optionally) rebalancer, stepped by ``step(i)``; it keeps, until
        ``take()``, the host seconds of ``rb.step()`` in migrating steps (before the device sync) and of each
        table switch (``set_placement``, the engine's part of a commit), and each step's ``Probes``."""

        def __init__(self, with_rebalancer: bool) -> None:
            slots = [local_slot_weights(f, start, 0, layer) for layer, f in enumerate(fulls)]
            self.recorder = ExpertLoadRecorder(args.layers, args.slots, window=args.steps, device=device)
            self.layers = [EPMoE(config, start, layer, slots[layer], routers[layer], recorder=self.recorder)
                           for layer in range(args.layers)]
            if args.fp8 and with_rebalancer:
                slots = [expert_tensors(args.slots, hidden, inter, True, device) for _ in slots]
            self.weights, self.rb = ExpertWeights(slots), None
            if with_rebalancer:
                self.rb = self.rebalancer("async", start)
            self.host: list[float] = []
            self.switches: list[float] = []
            self.probed: list[dict] = []

        def rebalancer(self, mode: str, serving: eplb.Placement) -> Rebalancer:
            return Rebalancer(self.recorder, serving, self.weights, config=RebalancerConfig(
                every=10**6, mode=mode, layers_per_step=args.layers_per_step,
                migration=MigrationConfig(timeout_s=120)), on_commit=self.switch)

        def switch(self, layer: int, placement: eplb.Placement) -> None:
            clock = time.perf_counter()
            self.layers[layer].set_placement(placement)
            self.switches.append(time.perf_counter() - clock)

        def step(self, _: int) -> bool:
            begin, before = time.perf_counter(), probes.counters()
            for layer in self.layers:
                layer(x)
            self.recorder.step()
            rb = self.rb
            busy = rb is not None and rb.migrating
            if rb is not None:
                clock = time.perf_counter()
                rb.step()
                if busy or rb.migrating:
                    self.host.append(time.perf_counter() - clock)
                busy = busy or rb.migrating
            self.probed.append(Probes.delta(before, probes.counters(), time.perf_counter() - begin))
            return busy

        def land(self) -> int:
            """Untimed steps until a rebalance still staging after the timed ones is committed (a commit waits
            for staging done on every rank), then the device sync; how many it took."""
            steps = 0
            while self.rb is not None and self.rb.migrating and steps < 100:
                self.step(args.steps + steps)
                steps += 1
            _sync(device)
            return steps

        def take(self) -> dict:
            rb, host, switches, probed = self.rb, self.host, self.switches, self.probed
            self.host, self.switches, self.probed = [], [], []
            if rb is None:
                return {"probes_without": probed[: args.steps]}
            return {"slots_moved": rb.rebalances[-1].report.moves, "phases_s": dict(rb.rebalances[-1].report.seconds),
                    "rebalancer_step_host_ms": [round(t * 1e3, 2) for t in host],
                    "table_switch_host_ms": [round(t * 1e3, 2) for t in switches], "probes": probed[: args.steps]}

    probes = Probes(device)
    plain, served = Server(False), Server(True)
    expert_bytes = served.weights.bytes_per_slot(0)
    fulls.clear()  # both servers hold their own slots: room for 16,384-token steps of six DeepSeek-V3 layers
    if args.touch_target:
        for layer in served.layers:
            layer.set_placement(target)
            layer(x)
            layer.set_placement(start)
        _sync(device)

    rows = []
    for round_ in range(args.rounds):  # the served model moves to the target and back, one way per round
        goal = target if round_ % 2 == 0 else start

        def order(step: int, goal: eplb.Placement = goal) -> None:
            if step == args.steps // 2:
                served.rb.move_to(goal)

        base, with_rb = alternating_steps([plain.step, served.step], args.steps, lambda: _serving_sync(device),
                                          before=order)
        untimed = served.land()
        base_s = [t for t, _ in base[2:]]
        row = {"round": round_, **step_overhead(base_s, with_rb[2:]), **paired_overhead(base_s, with_rb[2:]),
               "bytes_per_expert": expert_bytes,
               "migrating_steps_ms": [round(t * 1e3, 2) for t, migrating in with_rb[2:] if migrating],
               "steps_ms_without": [round(t * 1e3, 2) for t, _ in base],
               "steps_ms_with": [round(t * 1e3, 2) for t, _ in with_rb], "untimed_steps_to_land": untimed,
               **plain.take(), **served.take()}
        print({k: v for k, v in row.items() if not isinstance(v, list)}, flush=True)
        rows.append(row)
    served.rb.close()
    serving, served.rb = served.rb.serving, None
    del plain
    gc.collect()  # the async rebalancer's staging reserve goes back to the cache, for the sync one to reuse

    # Sync mode: one whole rebalance inside one step; its copy rate against a plain device copy.
    rb = served.rebalancer("sync", serving)
    _sync(device)
    t0, before = time.perf_counter(), probes.counters()
    rb.move_to(start if torch.equal(serving.phy2log, target.phy2log) else target)
    _sync(device)
    seconds = time.perf_counter() - t0
    probed = Probes.delta(before, probes.counters(), seconds)
    moved = sum(r.report.moves for r in rb.rebalances)
    block = torch.empty(moved * expert_bytes, dtype=torch.uint8, device=device)
    copy = torch.empty_like(block)
    _sync(device)
    t0 = time.perf_counter()
    copy.copy_(block)
    _sync(device)
    bound = time.perf_counter() - t0
    sync_row = {"sync_rebalance_s": seconds, "slots_moved": moved, "bytes_moved": moved * expert_bytes,
                "plain_copy_s": bound, "ratio_to_one_copy": seconds / bound if bound else None,
                "phases_s": rb.rebalances[-1].report.seconds if rb.rebalances else None, "probes": probed}
    print(sync_row, flush=True)
    rb.close()
    write_json(args.json, meta(command="python benchmarks/bench_rebalancer.py", **vars(args)), rows + [sync_row])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
