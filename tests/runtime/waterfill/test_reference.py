"""The torch reference: counts, the water level, the draw and the fallback."""

from __future__ import annotations

import pytest
import torch

from eplb.runtime.waterfill.reference import (
    EXCESS_BITS,
    Rule,
    Source,
    choose_shared_rank,
    local_counts,
    rank_tables,
    rank_weights,
    waterfill_torch,
)
from tests.runtime.waterfill.waterfill_inputs import bisected_level


def make_rule(ep_size: int, epr: int, rank: int = 0, **kw) -> Rule:
    settings = dict(shared_weight=1.0, key=12345, all_ranks=False, local_weight=11, remote_weight=10, min_tile_tokens=0)
    settings.update(kw)
    return Rule(ep_size=ep_size, slots_per_rank=epr, rank=rank, **settings)


def test_local_counts_count_entries_per_rank_and_tokens_once(make_topk):
    ids, _ = make_topk(50, 4, 24, seed=1, padded=3)
    counts = local_counts(ids, 6, 4)
    expected = [sum(1 for i in ids.flatten().tolist() if i >= 0 and i // 6 == r) for r in range(4)]
    assert counts.tolist() == expected + [47]
    assert local_counts(ids[:0], 6, 4).tolist() == [0] * 5


@pytest.mark.parametrize("seed", range(6))
def test_weights_are_the_deficits_below_the_water_level(seed):
    gen = torch.Generator().manual_seed(seed)
    w = int(torch.randint(1, 40, (1,), generator=gen))
    load = torch.randint(0, 10_000, (w,), generator=gen) * torch.randint(0, 2, (w,), generator=gen)
    shared = int(torch.randint(1, 30_000, (1,), generator=gen))
    weights = rank_weights(torch.cat([load, torch.tensor([shared])]), torch.tensor(shared), 0)
    deficit = (bisected_level(load.double(), shared) - load.double()).clamp(min=0)
    share = weights.double() / weights.sum()
    assert torch.allclose(share, deficit / deficit.sum(), atol=2e-3)
    assert int(weights.max()) < 4096


def test_no_shared_load_means_no_weight():
    assert rank_weights(torch.tensor([5, 0, 3, 0]), torch.tensor(0), 0).tolist() == [0, 0, 0]


def test_tile_rule_drops_ranks_with_few_shared_tokens_but_keeps_the_largest():
    load = torch.tensor([0, 900, 990, 1000])
    loads = torch.cat([load, torch.tensor([1000])])
    # Level 950: deficits 950 and 50, the others are above it.
    weights = rank_weights(loads, torch.tensor(1000), 0)
    assert (weights[2:] == 0).all() and weights[0] == 19 * weights[1]
    load = torch.tensor([0, 100, 960, 1000])
    loads = torch.cat([load, torch.tensor([300])])
    free = rank_weights(loads, torch.tensor(300), 0)  # level 200: deficits 200, 100
    assert free[1] > 0 and free[0] > 0
    tiled = rank_weights(loads, torch.tensor(300), 128)  # rank 1 would get 100 < 128 tokens
    assert tiled[1] == 0 and tiled[0] == free[0]
    everyone_small = rank_weights(loads, torch.tensor(300), 10_000)
    assert everyone_small.tolist() == [free[0], 0, 0, 0]


def choose(ids: torch.Tensor, loads: list[int], weights: list[int], rule: Rule) -> torch.Tensor:
    tables = rank_tables(torch.tensor(weights), torch.tensor(loads), rule)
    return choose_shared_rank(ids, tables, rule)


@pytest.mark.parametrize("all_ranks", [True, False])
def test_draw_follows_the_weights_with_the_local_preference(all_ranks):
    w, rank, tokens = 4, 1, 40_000
    rule = make_rule(w, 2, rank, all_ranks=all_ranks)
    # Every token routes to ranks 0, 2 and 3 (all_ranks ignores the routes).
    ids = torch.tensor([[0, 4, 6]]).expand(tokens, 3)
    weights = [100, 300, 0, 600]
    share = torch.bincount(choose(ids, [9, 9, 9, 9, 0], weights, rule), minlength=w).double() / tokens
    expected = torch.tensor(weights, dtype=torch.float64) * torch.tensor([10.0, 11.0, 10.0, 10.0])
    assert torch.allclose(share, expected / expected.sum(), atol=0.01)


def test_a_rank_routed_to_twice_counts_once():
    w, rank, tokens = 8, 0, 40_000
    ids = torch.tensor([[6, 7, 10]]).expand(tokens, 3)  # rank 3 twice (epr 2), rank 5 once
    share = torch.bincount(choose(ids, [0] * 9, [0, 0, 0, 1, 0, 1, 0, 0], make_rule(w, 2, rank)), minlength=w)
    assert abs(share[3] / tokens - 0.5) < 0.01 and share[3] + share[5] == tokens


def test_only_candidates_are_drawn():
    w, epr, rank = 8, 3, 2
    ids = torch.tensor([[0, 4], [22, -1], [-1, -1]])  # ranks {0, 1}, {7}, none
    for key in range(50):
        dest = choose(ids, [0] * (w + 1), [1] * w, make_rule(w, epr, rank, key=key))
        assert dest[0] in (0, 1, rank) and dest[1] in (7, rank) and dest[2] == rank


def test_fallback_prefers_home_unless_a_candidate_is_clearly_lower():
    w, epr, rank = 4, 1, 0
    ids = torch.tensor([[1, 2], [1, 3], [2, 3]])
    # Own load 100; candidate 2 at 95 is not 10 % lower, candidate 3 at 80 is (and 3 beats 2).
    loads = [100, 200, 95, 80, 0]
    for all_ranks in (False, True):
        dest = choose(ids, loads, [0] * w, make_rule(w, epr, rank, all_ranks=all_ranks))
        assert dest.tolist() == ([0, 3, 3] if not all_ranks else [3, 3, 3])
    ties = choose(torch.tensor([[3, 2]]), [100, 200, 50, 50, 0], [0] * w, make_rule(w, epr, rank))
    assert ties.tolist() == [2]  # equal loads: the lower rank


def test_batch_offset_adds_the_excess_scaled_by_the_batch_tokens(make_topk):
    w, epr = 4, 8
    rule = make_rule(w, epr, rank=1, all_ranks=True, local_weight=1, remote_weight=1)
    ids, weights = make_topk(500, 2, w * epr, seed=4, skew=1.0)
    excess = torch.tensor([0, 3 << EXCESS_BITS, 0, 0, 0])  # 3 entries per token on rank 1
    counts = local_counts(ids, epr, w)
    shifted = counts + torch.tensor([0, 3 * int(counts[-1]), 0, 0, 0])
    out = waterfill_torch(ids, weights, excess, Source.BATCH_OFFSET, rule)
    assert all(map(torch.equal, out, waterfill_torch(ids, weights, shifted, Source.PRIOR, rule)))
    zero = waterfill_torch(ids, weights, torch.zeros(w + 1, dtype=torch.int64), Source.BATCH_OFFSET, rule)
    assert all(map(torch.equal, zero, waterfill_torch(ids, weights, None, Source.BATCH, rule)))
    assert not torch.equal(out[0], zero[0])
