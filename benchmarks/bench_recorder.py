"""Per-layer cost of ExpertLoadRecorder updates under CUDA-graph replay, beside its baselines.

Every op is captured CALLS times in one CUDA graph (cycling over the layers, as a model's forward
pass does) and the graph is replayed; the per-call time is the median over 25 timings of 20
replays each, measured with CUDA events (``timing.time_per_call``). Baselines in the same run: an empty Triton
kernel (the floor of any launch inside a graph), torch ``scatter_add_`` (what SGLang records
top-k ids with) and a torch in-place add (for counts).

    PYTHONPATH=src python benchmarks/bench_recorder.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from eplb.runtime.recorder import ExpertLoadRecorder
from timing import Op, empty_launch, meta, time_per_call, write_json

LAYERS, SLOTS, TOP_K, GPUS = 61, 288, 8, 32  # DeepSeek-V3 with 32 redundant slots on EP32
CALLS = 61


def routed_ids(tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Skewed top-k ids over the slots (a few hot slots, as real routers give), on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    weights = torch.rand(SLOTS, device="cuda", generator=gen) ** 4 + 1e-3
    ids = torch.multinomial(weights.expand(tokens, -1), TOP_K, generator=gen)
    return ids.to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    import triton

    from eplb.runtime.recorder import _triton as triton_ops

    rec = ExpertLoadRecorder(LAYERS, SLOTS, window=1000, device="cuda", decay=0.95, backend="triton")
    ref = ExpertLoadRecorder(LAYERS, SLOTS, window=1000, device="cuda", decay=0.95, backend="torch")
    flag = rec.enabled_flag
    local = SLOTS // GPUS
    counts = torch.randint(0, 4096, (local,), dtype=torch.int32, device="cuda")
    rows: list[dict] = []

    def add(name: str, shape: str, op: Op, calls: int = CALLS) -> None:
        us = time_per_call(op, calls)
        rows.append({"op": name, "shape": shape, "us_per_call": round(us, 3)})
        print(f"{name:<44} {shape:<22} {us:8.3f} us", flush=True)

    add("empty triton kernel (floor)", "-", empty_launch())
    add("record_counts, triton", f"[{local}] int32", lambda i: rec.record_counts(i, counts, first_slot=0))
    add("record_counts, torch backend", f"[{local}] int32", lambda i: ref.record_counts(i, counts, first_slot=0))
    add("baseline: torch row += counts", f"[{local}] int32", lambda i: ref.current[i, :local].add_(counts))

    for tokens in (128, 2048, 16384):
        for dtype in (torch.int32, torch.int64):
            ids = routed_ids(tokens, dtype)
            flat = ids.reshape(-1)
            shape = f"{tokens}x{TOP_K} {str(dtype)[6:]}"
            ones = torch.ones_like(flat, dtype=torch.int32)
            wide = flat.to(torch.int64)
            add("record_topk, triton", shape, lambda i, ids=ids: rec.record_topk(i, ids))
            add("record_topk, torch backend (masked)", shape, lambda i, ids=ids: ref.record_topk(i, ids))
            add("baseline: torch scatter_add_ (no mask)", shape,
                lambda i, wide=wide, ones=ones: ref.current[i].scatter_add_(0, wide, ones))
            if dtype == torch.int32:
                # Ids per program and warps of the histogram kernel, to pick the defaults.
                for block in (1024, 2048, 4096):
                    if block > triton.next_power_of_2(flat.numel()):
                        continue
                    for warps in (4, 8, 16):
                        grid = (triton.cdiv(flat.numel(), block),)
                        add(f"  sweep: topk kernel block={block} warps={warps}", shape,
                            lambda i, b=block, w=warps, g=grid, flat=flat: triton_ops._record_topk_kernel[g](
                                flat, flat.numel(), rec.current[i], flag, SLOTS,
                                BLOCK=b, BINS=triton.next_power_of_2(SLOTS), num_warps=w))
    # Both paths must count the same ids alike, or the timings compare different work.
    rec.reset()
    ref.reset()
    ids = routed_ids(16384, torch.int32)
    rec.record_topk(0, ids)
    ref.record_topk(0, ids)
    assert torch.equal(rec.current, ref.current), "triton and torch counts differ"

    coact = ExpertLoadRecorder(LAYERS, SLOTS, window=1, device="cuda", num_experts=256, coactivation=True)
    for tokens in (128, 16384):
        logical = routed_ids(tokens, torch.int32) % 256
        add("record_coactivation (opt-in, torch)", f"{tokens}x{TOP_K} int32",
            lambda i, logical=logical: coact.record_coactivation(i, logical))

    rec.stop()
    add("record_topk, triton, recording stopped", f"16384x{TOP_K} int32", lambda i: rec.record_topk(i, ids))
    rec.start()
    add("step(), triton (per forward pass)", f"[{LAYERS}, {SLOTS}]", lambda i: rec.step(), calls=8)
    add("step(), torch backend", f"[{LAYERS}, {SLOTS}]", lambda i: ref.step(), calls=8)

    info = meta(calls_per_graph=CALLS,
                default_topk_launch={n: triton_ops.topk_launch(n) for n in (128 * TOP_K, 16384 * TOP_K)})
    print(json.dumps(info))
    write_json(args.json, info, rows)


if __name__ == "__main__":
    main()
