"""The Triton kernel against the torch reference, bit for bit (``kernel_harness``: on CUDA, and
on the CPU under Triton's interpreter)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from eplb import WaterfillBalancer, WaterfillConfig
from tests.runtime.kernel_harness import KERNEL_DEVICES, run_check
from tests.runtime.waterfill.waterfill_inputs import random_topk

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

# (slots, ep_size, k, tokens, settings): every source, candidate rule and size edge.
CASES = [
    (288, 16, 8, 300, {}),
    (288, 16, 8, 300, {"rank_load": "skewed"}),  # estimate="batch"
    (288, 16, 8, 64, {"rank_load": "skewed"}),  # counts a single tile
    (288, 16, 8, 300, {"rank_load": "skewed", "estimate": "recorded"}),
    (288, 16, 8, 300, {"rank_load": "skewed", "estimate": "recorded", "rank": 14}),  # a rank below the level
    (288, 16, 8, 300, {"rank_load": "skewed", "estimate": "recorded", "move": "all"}),
    (288, 16, 8, 300, {"rank_load": "skewed", "estimate": "recorded", "candidates": "all"}),
    (288, 16, 8, 300, {"rank_load": "skewed", "estimate": "recorded", "min_tile_tokens": 128}),
    (288, 16, 8, 300, {"rank_load": "skewed", "prior_tokens": 1000}),
    (288, 16, 8, 300, {"rank_load": "skewed", "estimate": "batch", "rank": 14, "min_tile_tokens": 128}),
    (288, 96, 8, 150, {"rank_load": "skewed", "estimate": "batch", "rank": 70, "candidates": "all"}),
    (256, 64, 6, 70, {"rank_load": "random", "estimate": "batch", "layer_id": 3}),
    (288, 16, 8, 300, {"candidates": "all", "local_preference": 1.0}),
    (288, 16, 8, 300, {"min_tile_tokens": 300, "rank": 15}),
    (36, 6, 3, 130, {"mode": "dynamic"}),
    (36, 6, 3, 130, {"mode": "dynamic", "min_tile_tokens": 64, "candidates": "all"}),
    (256, 64, 8, 200, {"mode": "dynamic", "rank": 63}),
    (256, 64, 6, 70, {"rank_load": "skewed", "estimate": "recorded", "layer_id": 5}),
    (288, 96, 8, 150, {"rank_load": "skewed", "estimate": "recorded", "rank": 70}),  # two 64-rank bitmask words
    (320, 160, 4, 1100, {"mode": "dynamic", "rank": 100}),  # several count programs
    (4, 1, 2, 100, {}),
    (32, 4, 1, 40, {}),  # under min_batch: local
    (32, 4, 2, 0, {"mode": "dynamic"}),  # empty batch
]


def random_cases(count: int, seed: int = 0) -> list[tuple[int, int, int, int, dict]]:
    """Random sizes and settings, drawn from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)

    def pick(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=gen))

    cases = []
    for _ in range(count):
        w = 1 + pick(80)
        settings = {"rank": pick(w), "layer_id": pick(100), "local_preference": 1 + pick(4) / 4,
                    "candidates": ("routed", "all")[pick(2)]}
        settings.update(({"mode": "dynamic"}, {"rank_load": "random", "estimate": "recorded"}, {},
                         {"rank_load": "random", "min_tile_tokens": 1 + pick(200)})[pick(4)])
        cases.append((w * (1 + pick(6)), w, 1 + pick(9), 64 + pick(600), settings))
    return cases


CASES += random_cases(8)


def balancer(p: int, w: int, case: int, settings: dict, backend: str) -> WaterfillBalancer:
    """The balancer of case number ``case``: ``settings`` are config knobs, plus ``rank`` (default
    1 % w), ``layer_id`` and ``rank_load`` ("skewed" or "random")."""
    knobs = dict(settings)
    rank, layer_id, rank_load = knobs.pop("rank", 1 % w), knobs.pop("layer_id", 0), knobs.pop("rank_load", None)
    if rank_load == "skewed":
        rank_load = torch.linspace(1.0, 0.1, w) ** 2
    elif rank_load == "random":
        rank_load = torch.rand(w, generator=torch.Generator().manual_seed(case)) + 0.05
    config = WaterfillConfig(routed_scaling_factor=2.5, backend=backend, **knobs)
    return WaterfillBalancer(p, w, rank, config, layer_id=layer_id, rank_load=rank_load)


def check_cases(device: str) -> None:
    """Run every case on both backends on ``device`` and assert equal outputs."""
    for i, (p, w, k, m, settings) in enumerate(CASES):
        ids, weights = random_topk(m, min(k, p), p, seed=i, skew=2.0, padded=min(m, 3),
                                   dtype=(torch.int32, torch.int64)[i % 2],
                                   weight_dtype=(torch.float32, torch.bfloat16, torch.float64)[i % 3])
        ids, weights = ids.to(device), weights.to(device)
        outs = []
        for backend in ("torch", "triton"):
            b = balancer(p, w, i, settings, backend)
            if b.mode == "dynamic":
                counts = b.local_counts(ids)
                outs.append((counts, *b.expand_topk_global(ids, weights, counts * w)))
            else:
                outs.append(b.expand_topk(ids, weights))
        for a, b in zip(*outs, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), f"case {i} {CASES[i]}: backends differ"


@pytest.mark.slow  # about 30 s in the CPU interpreter
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernel_matches_reference(device):
    run_check(check_cases, device)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize(("mode", "estimate"), [("static", "batch"), ("static", "recorded"), ("dynamic", None)])
def test_cuda_graph_replay_follows_new_inputs(mode, estimate):
    p, w, k, m = 288, 16, 8, 4096
    config = WaterfillConfig(mode=mode, estimate=estimate, routed_scaling_factor=2.5, check_inputs=False)
    if mode == "dynamic":
        b = WaterfillBalancer(p, w, 3, config, all_reduce=lambda t: t.mul_(w))
    else:
        b = WaterfillBalancer(p, w, 3, config, rank_load=torch.rand(w) + 0.1)
    ids, weights = (t.cuda() for t in random_topk(m, k, p, seed=0, skew=2.0, dtype=torch.int32))
    b.expand_topk(ids, weights)  # warm-up: compile and build the buffers
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_ids, out_w = b.expand_topk(ids, weights)
    # Several replays: the counting launch must leave its grid counters zeroed for the next one.
    for seed in (1, 2, 3):
        new_ids, new_w = (t.cuda() for t in random_topk(m, k, p, seed=seed, skew=seed / 2, dtype=torch.int32))
        ids.copy_(new_ids)
        weights.copy_(new_w)
        graph.replay()
        ref_ids, ref_w = b.expand_topk(new_ids, new_w)
        assert torch.equal(out_ids, ref_ids) and torch.equal(out_w, ref_w)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("resident", [1, 3, None])
def test_counting_launch_with_several_tiles_per_program(monkeypatch, resident):
    """Fewer resident programs than tiles (forced, or a batch larger than the SMs hold): each
    program counts and expands several tiles, and batch sizes that change between calls reuse
    the same counters."""
    from eplb.runtime.waterfill import kernel

    if resident is not None:
        monkeypatch.setattr(kernel, "_resident_programs", lambda device: resident)
    p, w, k = 288, 16, 8
    rank_load = torch.rand(w, generator=torch.Generator().manual_seed(0)) + 0.1
    b, ref = (WaterfillBalancer(p, w, 5, WaterfillConfig(routed_scaling_factor=2.5, backend=backend),
                                rank_load=rank_load) for backend in ("triton", "torch"))
    for m in (1000, 70, 20000, 4096):
        ids, weights = (t.cuda() for t in random_topk(m, k, p, seed=m, skew=2.0, dtype=torch.int32))
        for out, expected in zip(b.expand_topk(ids, weights), ref.expand_topk(ids, weights), strict=True):
            assert torch.equal(out, expected), f"{m} tokens, {resident} resident programs"

