"""The torch reference: counts, the water level, the draw and the fallback."""

from __future__ import annotations

import pytest
import torch

from eplb.waterfill.reference import Rule, choose_shared_rank, local_counts, rank_weights


def make_rule(ep_size: int, epr: int, rank: int = 0, **kw) -> Rule:
    settings = dict(shared_weight=1.0, key=12345, all_ranks=False, local_weight=11, remote_weight=10, min_tile_tokens=0)
    settings.update(kw)
    return Rule(ep_size=ep_size, slots_per_rank=epr, rank=rank, **settings)


def water_level(load: torch.Tensor, shared: float) -> float:
    """The level T with sum(max(T - load, 0)) == shared, by bisection."""
    lo, hi = float(load.min()), float(load.max()) + shared
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (mid - load).clamp(min=0).sum() < shared else (lo, mid)
    return (lo + hi) / 2


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
    deficit = (water_level(load.double(), shared) - load.double()).clamp(min=0)
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


def test_draw_follows_the_weights_with_the_local_preference():
    w, rank, tokens = 4, 1, 40_000
    rule = make_rule(w, 2, rank, all_ranks=True)
    ids = torch.zeros(tokens, 1, dtype=torch.int64)  # routes to rank 0 only; all_ranks ignores it
    weights = torch.tensor([100, 300, 0, 600])
    dest = choose_shared_rank(ids, torch.tensor([9, 9, 9, 9, 0]), weights, rule)
    share = torch.bincount(dest, minlength=w).double() / tokens
    expected = weights.double() * torch.tensor([10.0, 11.0, 10.0, 10.0])
    assert torch.allclose(share, expected / expected.sum(), atol=0.01)


def test_only_candidates_are_drawn():
    w, epr, rank = 8, 3, 2
    ids = torch.tensor([[0, 4], [22, -1], [-1, -1]])  # ranks {0, 1}, {7}, none
    rule = make_rule(w, epr, rank)
    for key in range(50):
        dest = choose_shared_rank(ids, torch.zeros(w + 1, dtype=torch.int64), torch.ones(w, dtype=torch.int64),
                                  make_rule(w, epr, rank, key=key))
        assert dest[0] in (0, 1, rank) and dest[1] in (7, rank) and dest[2] == rank
    assert rule.all_ranks is False


def test_fallback_prefers_home_unless_a_candidate_is_clearly_lower():
    w, epr, rank = 4, 1, 0
    ids = torch.tensor([[1, 2], [1, 3]])
    no_weight = torch.zeros(w, dtype=torch.int64)
    # Own load 100; candidate 2 at 95 is not 10 % lower, candidate 3 at 80 is.
    loads = torch.tensor([100, 200, 95, 80, 0])
    dest = choose_shared_rank(ids, loads, no_weight, make_rule(w, epr, rank))
    assert dest.tolist() == [0, 3]
