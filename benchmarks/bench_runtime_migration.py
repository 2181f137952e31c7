"""Device-side cost of an expert-weight migration step, against the device copy bound.

One process, one layer of DeepSeek-V3 experts (hidden 7168, intermediate 2048: ``w13 [S, 4096,
7168]``, ``w2 [S, 7168, 2048]``) in bf16, and in fp8 e4m3 with float32 128x128 block scales
(``[S, 32, 56]`` and ``[S, 56, 16]``). ``--moves`` slots change expert (each takes the next
slot's expert, so every one is a local copy). Timed, each the median of ``--repeats`` runs:

- ``copy_bound``: one plain ``copy_`` of the moved bytes (the device's copy bandwidth);
- ``stage``: the local copies into staging rows, without and with source checksums;
- ``checksum``: the receiver's checksums of the staged rows (``verify``; Triton on CUDA), and
  ``checksum_torch`` the same in plain torch;
- ``commit``: the in-place copy of the staged rows into the engine's tensors;
- ``migrate``: the whole single-GPU ``migrate`` call (plan, stage, verify, vote, commit).

Bandwidths are moved weight bytes per second (each byte read once and written once). One JSON
line per (dtype, measurement); GPU if present, else CPU.

    PYTHONPATH=src python benchmarks/bench_runtime_migration.py [--slots 9 --moves 8 --repeats 20]
    PYTHONPATH=src python benchmarks/bench_runtime_migration.py --small   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from eplb.placement import Placement
from eplb.runtime.migration import ExpertWeights, MigrationConfig, Session, checksum, migrate, plan_layer, transfer

HIDDEN, INTERMEDIATE, BLOCK = 7168, 2048, 128


def expert_tensors(slots: int, hidden: int, inter: int, fp8: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """One layer's expert tensors with ``slots`` local slots, filled with random bytes."""
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    shapes = {"w13": (slots, 2 * inter, hidden), "w2": (slots, hidden, inter)}
    if fp8:
        shapes["w13_scale"] = (slots, 2 * inter // BLOCK, hidden // BLOCK)
        shapes["w2_scale"] = (slots, hidden // BLOCK, inter // BLOCK)
    out = {}
    for name, shape in shapes.items():
        kind = torch.float32 if name.endswith("scale") else dtype
        size = torch.Size(shape).numel() * torch.empty(0, dtype=kind).element_size()
        raw = torch.randint(0, 256, (size,), dtype=torch.uint8, device=device)
        out[name] = raw.view(kind).view(shape)
    return out


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up, device synchronised."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(label: str, tensors: dict[str, torch.Tensor], moves: int, repeats: int, device: torch.device) -> list[dict]:
    slots = next(iter(tensors.values())).shape[0]
    weights = ExpertWeights([tensors])
    old = Placement(torch.arange(slots)[None], slots, 1)
    # The first `moves` slots pass their experts round: `moves` local copies whose sources are
    # destinations too, so every one is staged.
    row = torch.arange(slots)
    row[:moves] = torch.roll(row[:moves], 1)
    new = Placement(row[None], slots, 1)
    t = plan_layer(old, new, 0)
    moved = len(t.fills) * weights.bytes_per_slot(0)
    sync = Session.open(None, dist.HashStore(), 1).step_sync(t, 0, 60.0)

    def stage(verify: bool) -> transfer.Staged:
        return transfer.stage(weights, t, 0, sync, timeout_s=60.0, chunk_bytes=1 << 30, verify=verify)

    staged = stage(True)
    segments = weights.layout(0).segments
    src = torch.empty(moved, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    forward = [True]

    def whole_call() -> None:
        # Alternate directions so that every call moves the same slots.
        migrate(weights, *((old, new) if forward[0] else (new, old)), config=MigrationConfig())
        forward[0] = not forward[0]

    timings = {
        "copy_bound": lambda: dst.copy_(src),
        "stage": lambda: stage(False),
        "stage_checksummed": lambda: stage(True),
        "checksum": lambda: [checksum(staged.rows[:, s.offset : s.offset + s.nbytes]) for s in segments],
        "checksum_torch": lambda: [checksum(staged.rows[:, s.offset : s.offset + s.nbytes], "torch") for s in segments],
        "commit": lambda: transfer.commit(weights, t, staged, 0),
        "migrate": whole_call,
    }
    rows, bound = [], None
    for name, fn in timings.items():
        seconds = median_seconds(fn, repeats, device)
        bound = bound or seconds
        rows.append({
            "dtype": label, "measure": name, "device": str(device), "slots": slots, "moves": len(t.fills),
            "bytes": moved, "median_ms": round(seconds * 1e3, 4), "GBps": round(moved / seconds / 1e9, 2),
            "of_copy_bound": round(bound / seconds, 3),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=9, help="local slots per GPU (DeepSeek-V3 288 slots on EP32: 9)")
    parser.add_argument("--moves", type=int, default=8, help="slots that change expert (2 to --slots)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU (a smoke run)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    hidden, inter = (256, 128) if args.small else (HIDDEN, INTERMEDIATE)
    repeats = 3 if args.small else args.repeats
    moves = max(2, min(args.moves, args.slots))
    for label, fp8 in (("bf16", False), ("fp8_e4m3+f32_scales", True)):
        tensors = expert_tensors(args.slots, hidden, inter, fp8, device)
        for row in run(label, tensors, moves, repeats, device):
            print(json.dumps(row), flush=True)
        del tensors


if __name__ == "__main__":
    main()
