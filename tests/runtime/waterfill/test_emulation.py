"""In-process expert-parallel emulation: with waterfill the MoE output is unchanged.

Each of ``W`` emulated ranks routes its own tokens; the expanded top-k is dispatched to the
ranks that hold the slots, which run their local experts (``epr`` routed ones and the shared
copy in local slot ``epr``), and the results are combined back on the source rank. The output
must equal the plain MoE, ``factor * sum_k w_k E_k(x) + S(x)``, whether the expert kernel
applies the top-k weights (DeepEP normal mode) or the combine does (DeepEP low-latency).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from eplb import WaterfillBalancer, WaterfillConfig

HIDDEN = 8


def make_experts(num: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU MLPs, ``num`` of them: ``up [num, H, 2H]``, ``down [num, 2H, H]``."""
    up = torch.randn(num, HIDDEN, 2 * HIDDEN, generator=gen, dtype=torch.float64)
    down = torch.randn(num, 2 * HIDDEN, HIDDEN, generator=gen, dtype=torch.float64)
    return up, down


def run_expert(experts, index: int, x: torch.Tensor) -> torch.Tensor:
    up, down = experts
    return torch.nn.functional.silu(x @ up[index]) @ down[index]


def plain_moe(x, ids, weights, routed, shared, factor) -> torch.Tensor:
    """The model's MoE layer without EP: routed experts by slot id, the shared expert unscaled."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t].tolist(), strict=False):
            if e >= 0:
                out[t] += w * run_expert(routed, e, x[t])
    return (factor or 1.0) * out + run_expert(shared, 0, x)


def ep_moe(xs, expanded, routed, shared, factor, epr: int, weights_in_expert: bool) -> list[torch.Tensor]:
    """Dispatch the expanded top-k of every rank, run the experts where they live, combine."""
    ep_size = len(xs)
    received = [[] for _ in range(ep_size)]  # per rank: (source rank, token, column)
    for src, (ids, _) in enumerate(expanded):
        for t, row in enumerate(ids.tolist()):
            for c, slot in enumerate(row):
                if slot >= 0:
                    received[slot // (epr + 1)].append((src, t, c, slot % (epr + 1)))
    outs = [torch.zeros_like(x) for x in xs]
    for dest, work in enumerate(received):
        for src, t, c, local in work:
            x = xs[src][t]
            y = run_expert(shared, 0, x) if local == epr else run_expert(routed, dest * epr + local, x)
            w = float(expanded[src][1][t, c])
            # Normal mode: the expert kernel scales and the combine sums; low-latency: the combine
            # scales the expert's raw output. Either way, w multiplies y exactly once.
            outs[src][t] += (w * y) if weights_in_expert else y * w
    return [(factor or 1.0) * o for o in outs]


@pytest.mark.parametrize("weights_in_expert", [True, False])
@pytest.mark.parametrize(("mode", "seed"), [("static", 0), ("static", 1), ("dynamic", 2), ("dynamic", 3)])
def test_waterfill_leaves_the_moe_output_unchanged(mode, seed, weights_in_expert):
    gen = torch.Generator().manual_seed(seed)
    ep_size = int(torch.randint(2, 6, (1,), generator=gen))
    epr = int(torch.randint(1, 4, (1,), generator=gen))
    k = min(int(torch.randint(1, 5, (1,), generator=gen)), ep_size * epr)
    factor = (None, 0.0, 2.5, 0.7)[seed]
    routed, shared = make_experts(ep_size * epr, gen), make_experts(1, gen)
    xs, tops = [], []
    for _ in range(ep_size):
        m = int(torch.randint(0, 90, (1,), generator=gen))
        ids = torch.rand(m, ep_size * epr, generator=gen).argsort(1)[:, :k]
        ids[torch.rand(m, k, generator=gen) < 0.1] = -1  # padded entries, some whole tokens
        xs.append(torch.randn(m, HIDDEN, generator=gen, dtype=torch.float64))
        tops.append((ids, torch.rand(m, k, generator=gen, dtype=torch.float64)))
    config = WaterfillConfig(mode=mode, routed_scaling_factor=factor, min_batch=8, backend="torch")
    if mode == "dynamic":
        balancers = [WaterfillBalancer(ep_size * epr, ep_size, r, config, all_reduce=lambda t: t)
                     for r in range(ep_size)]
        counts = sum(b.local_counts(ids) for b, (ids, _) in zip(balancers, tops, strict=True))
        expanded = [b.expand_topk_global(ids, w, counts) for b, (ids, w) in zip(balancers, tops, strict=True)]
    else:
        rank_load = torch.rand(ep_size, generator=gen) + 0.01
        config = replace(config, candidates="all")
        expanded = [
            WaterfillBalancer(ep_size * epr, ep_size, r, config, rank_load=rank_load).expand_topk(ids, w)
            for r, (ids, w) in enumerate(tops)
        ]
    outs = ep_moe(xs, expanded, routed, shared, factor, epr, weights_in_expert)
    moved = 0
    for r, (x, (ids, w), out, (new_ids, _)) in enumerate(zip(xs, tops, outs, expanded, strict=False)):
        real = (ids >= 0).any(1)  # a token without routed entries is padding: its output is unused
        assert torch.allclose(out[real], plain_moe(x, ids, w, routed, shared, factor)[real], rtol=1e-10, atol=1e-10)
        moved += int((new_ids[:, -1] >= 0).logical_and(new_ids[:, -1] // (epr + 1) != r).sum())
    assert moved > 0  # the test exercises remote shared experts
