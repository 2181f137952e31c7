"""Random re-placements of fp8 expert weights over the group: every slot exact after each, and a rank killed
or delayed mid-migration leaves every surviving rank serving the old placement with one clear error.

    torchrun --nproc-per-node 4 -m benchmarks.multi_gpu.replacements --out $OUT/replacements.json
    torchrun --nproc-per-node 4 -m benchmarks.multi_gpu.replacements --kill-rank 2 --at 10 --out $OUT/kill.json
    torchrun --nproc-per-node 4 -m benchmarks.multi_gpu.replacements --delay-rank 1 --delay-s 40 --at 10 \\
        --out $OUT/delay.json

Every rank registers ``--layers`` layers of known expert contents (``eplb.runtime.migration.selfcheck``):
fp8 e4m3 ``w13 [2I, H]`` and ``w2 [H, I]`` with float32 128x128 block scales per slot (random bytes, so
the fp8 and float32 NaN and infinity patterns are there too), loaded for a random placement. Then
``--migrations`` times: a new random placement (every expert at least once, the spare slots random, all
shuffled) and ``eplb.runtime.migration.migrate`` to it; after each, every slot of every layer is compared
byte for byte with its expert's known contents.

Faults, at migration ``--at``, in layer ``--fault-layer`` (default: the middle one, so earlier layers are
committed), through the hooks the fault tests patch (``transfer.stage``; ``StepSync.vote`` with
``--fault-phase vote``):

- ``--kill-rank R``: rank R exits at once (``os._exit(0)``: status 0 because torchrun tears every worker
  down when one fails, and the point is what the survivors see). The survivors must raise the same
  ``MigrationError`` within about ``--migration-timeout-s``, serve ``error.serving`` (new rows for the
  committed layers, old rows from the faulty layer on) with every slot exact, and stop there.
- ``--delay-rank R --delay-s S``: rank R sleeps S seconds there. With S above ``--migration-timeout-s``
  the step aborts on every rank (the same error, old rows serving, every slot exact); the retry from
  ``error.serving`` (with ``--timeout-s`` as its timeout, so the late rank catches up) must succeed and the
  run goes on. With S below it the migration just completes late.

Every wait is bounded: the migration's store waits by ``--migration-timeout-s``, the process group by
``--timeout-s``, the whole run by ``--deadline-s``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import torch
from benchmarks.bench_runtime_migration import expert_tensors
from benchmarks.multi_gpu.common import finish, join, parser

from eplb.placement import Placement
from eplb.runtime.migration import MigrationConfig, MigrationError, migrate
from eplb.runtime.migration import sync as sync_module
from eplb.runtime.migration import transfer as transfer_module
from eplb.runtime.migration.selfcheck import canonical, corrupted_slots, make_weights, random_placement


def parse():
    p = parser(__doc__)
    p.add_argument("--migrations", type=int, default=1000)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--slots-per-rank", type=int, default=None, help="default: experts * 9 / 8 over the ranks")
    p.add_argument("--nodes", type=int, default=1, help="nodes the placement declares (senders prefer their node)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--max-peers", type=int, default=1)
    p.add_argument("--migration-timeout-s", type=float, default=30.0)
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--delay-rank", type=int, default=None)
    p.add_argument("--delay-s", type=float, default=60.0)
    p.add_argument("--at", type=int, default=None, help="the migration the fault hits (default: half way)")
    p.add_argument("--fault-layer", type=int, default=None, help="default: the middle layer")
    p.add_argument("--fault-phase", choices=("stage", "vote"), default="stage")
    args = p.parse_args()
    if args.small:
        args.layers, args.experts, args.hidden, args.intermediate = 3, 16, 256, 128
    if args.kill_rank is not None and args.delay_rank is not None:
        raise SystemExit("pass --kill-rank or --delay-rank, not both")
    args.at = args.migrations // 2 if args.at is None else args.at
    args.fault_layer = args.layers // 2 if args.fault_layer is None else args.fault_layer
    return args


@contextlib.contextmanager
def fault(args, rank: int, active: bool):
    """Inside: this rank, if it is the faulty one and ``active``, dies or sleeps when it reaches the fault
    layer's ``args.fault_phase`` (the same hook points as ``tests/runtime/migration/test_faults.py``)."""
    faulty = rank in (args.kill_rank, args.delay_rank)
    if not (active and faulty):
        yield
        return

    def act() -> None:
        if args.kill_rank is not None:
            print(f"rank {rank}: killed in the {args.fault_phase} of layer {args.fault_layer}", flush=True)
            os._exit(0)
        time.sleep(args.delay_s)

    if args.fault_phase == "stage":
        owner, name = transfer_module, "stage"
        original = transfer_module.stage

        def hooked(weights, t, *rest, **kwargs):
            if t.layer == args.fault_layer:
                act()
            return original(weights, t, *rest, **kwargs)
    else:
        owner, name = sync_module.StepSync, "vote"
        original = sync_module.StepSync.vote

        def hooked(self, failure):
            if int(self.prefix.rstrip("/").split("/")[-2]) == args.fault_layer:  # <ns><epoch>/<layer>/<part>/
                act()
            return original(self, failure)

    setattr(owner, name, hooked)
    try:
        yield
    finally:
        setattr(owner, name, original)


def mixed(old: Placement, new: Placement, committed: int) -> Placement:
    """``new``'s rows for the first ``committed`` layers, ``old``'s for the rest."""
    rows = torch.cat([new.phy2log[:committed], old.phy2log[committed:]])
    return Placement(rows, old.num_experts, old.num_gpus, old.num_nodes)


def main() -> None:
    args = parse()
    group = join(args)
    rank, world = group.rank, group.world
    for what, r in (("--kill-rank", args.kill_rank), ("--delay-rank", args.delay_rank)):
        if r is not None and not (world > 1 and 0 <= r < world):
            raise SystemExit(f"{what} {r}: a fault needs a rank in [0, {world}) and a peer to see it; "
                             "run 2 ranks or more")
    spr = args.slots_per_rank or -(-args.experts * 9 // 8 // world)
    slots = spr * world
    spec = {n: (t.dtype, tuple(t.shape[1:]))
            for n, t in expert_tensors(1, args.hidden, args.intermediate, True, torch.device("meta")).items()}
    gen = torch.Generator().manual_seed(args.seed)  # the same placements on every rank
    canon = canonical(args.layers, args.experts, spec, device=group.device)
    current = random_placement(gen, args.layers, args.experts, slots, world, args.nodes)
    weights, _ = make_weights(canon, current, rank, spec)
    config = MigrationConfig(max_peers=args.max_peers, timeout_s=args.migration_timeout_s)
    row = {"rank": rank, "migrations": 0, "corrupted": corrupted_slots(weights, canon, current, rank), "moves": 0,
           "bytes_intra_node": 0, "bytes_inter_node": 0, "seconds": [], "fault": None}
    dead: tuple[int, ...] = ()
    for i in range(args.migrations):
        new = random_placement(gen, args.layers, args.experts, slots, world, args.nodes)
        group.sync()
        start = time.perf_counter()
        try:
            with fault(args, rank, i == args.at):
                report = migrate(weights, current, new, config=config)
        except MigrationError as error:
            elapsed = time.perf_counter() - start
            want = mixed(current, new, args.fault_layer)
            row["fault"] = {
                "migration": i, "seconds_to_error": elapsed, "message": str(error), "layer": error.layer,
                "ranks": list(error.ranks), "serving_is_old_from_fault_layer": bool(error.serving == want),
                "corrupted_after_error": corrupted_slots(weights, canon, error.serving, rank),
            }
            if args.kill_rank is not None:
                dead = (args.kill_rank,)
                break
            # The retry goes on where it stopped; its timeout lets the late rank catch up.
            report = migrate(weights, error.serving, new, config=dataclasses.replace(config, timeout_s=args.timeout_s))
            row["fault"]["retry_ok"] = bool(report.serving == new)
        else:
            if i == args.at and (args.kill_rank is not None or args.delay_rank is not None):
                row["fault"] = {"migration": i, "seconds_to_error": None, "message": None,
                                "completed_in_s": time.perf_counter() - start}
        group.sync()
        row["seconds"].append(time.perf_counter() - start)
        row["corrupted"] += corrupted_slots(weights, canon, new, rank)
        row["migrations"] += 1
        row["moves"] += report.moves
        row["bytes_intra_node"] += report.bytes_intra_node
        row["bytes_inter_node"] += report.bytes_inter_node
        current = new
    row["bytes_per_slot"] = weights.bytes_per_slot(0)
    finish(group, args, row, summarize, dead=dead, slots=slots)


def summarize(rows: list[dict]) -> dict:
    seconds = sorted(s for r in rows for s in r["seconds"])
    faults = [r["fault"] for r in rows if r["fault"] is not None]
    out = {
        "ranks_reporting": [r["rank"] for r in rows],
        "migrations": max(r["migrations"] for r in rows),
        "corrupted_slots": sum(r["corrupted"] for r in rows),
        "moves": rows[0]["moves"], "bytes_intra_node": rows[0]["bytes_intra_node"],
        "bytes_inter_node": rows[0]["bytes_inter_node"], "bytes_per_slot": rows[0]["bytes_per_slot"],
        "median_migration_s": seconds[len(seconds) // 2] if seconds else None,
        "max_migration_s": seconds[-1] if seconds else None,
    }
    if faults:
        errors = [f for f in faults if f.get("message")]
        out["fault"] = {
            "errors_on_ranks": len(errors),
            "same_error_everywhere": len({f["message"] for f in errors}) <= 1,
            "message": errors[0]["message"] if errors else None,
            "old_placement_serving": all(f["serving_is_old_from_fault_layer"] for f in errors),
            "corrupted_after_error": sum(f["corrupted_after_error"] for f in errors),
            "max_seconds_to_error": max((f["seconds_to_error"] for f in errors), default=None),
            "retry_ok": all(f["retry_ok"] for f in errors) if any("retry_ok" in f for f in errors) else None,
            "completed_late_in_s": max((f["completed_in_s"] for f in faults if "completed_in_s" in f), default=None),
        }
    return out


if __name__ == "__main__":
    main()
