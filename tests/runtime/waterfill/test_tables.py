"""Host-side inputs from recorded rank loads: scaling, pseudo-counts, excess, fixed tables."""

from __future__ import annotations

import pytest
import torch

from eplb import EplbError
from eplb.runtime.waterfill.config import HostInput, Strategy
from eplb.runtime.waterfill.reference import EXCESS_BITS, Rule, Source, rank_tables, rank_weights
from eplb.runtime.waterfill.tables import (
    PRIOR_SCALE,
    excess_weights,
    fixed_rank_tables,
    host_input,
    recorded_excess,
    recorded_loads,
    scaled_rank_load,
)
from tests.runtime.waterfill.waterfill_inputs import bisected_level

RULE = Rule(ep_size=4, slots_per_rank=8, rank=1, shared_weight=1.0, key=7, all_ranks=False, local_weight=11,
            remote_weight=10, min_tile_tokens=0)


def random_loads(seed: int, max_ranks: int, shared_part: int) -> tuple[int, torch.Tensor, int]:
    """``(W, load [W], shared)``: 2 to ``max_ranks - 1`` ranks of random loads and a shared load of
    ``1 / shared_part`` of their sum."""
    gen = torch.Generator().manual_seed(seed)
    w = int(torch.randint(2, max_ranks, (1,), generator=gen))
    load = torch.randint(0, 10_000, (w,), generator=gen)
    return w, load, int(load.sum()) // shared_part


def test_rank_load_is_scaled_to_integers_of_a_fixed_sum():
    prior = scaled_rank_load([3.0, 1.0, 0.0, 4.0], 4)
    assert prior.dtype == torch.int64
    assert prior.tolist() == [3 * PRIOR_SCALE // 8, PRIOR_SCALE // 8, 0, PRIOR_SCALE // 2]
    for bad, match in (([1.0, 1.0], r"shape \(4,\)"), ([1.0, -1.0, 1.0, 1.0], "negative"),
                       ([1.0, float("inf"), 1.0, 1.0], "negative, NaN or infinite"), ([0.0] * 4, "sums to 0")):
        with pytest.raises(EplbError, match=match):
            scaled_rank_load(bad, 4)


def test_recorded_loads_end_with_the_shared_load_and_scale_to_pseudo_counts():
    prior = scaled_rank_load([3.0, 1.0, 0.0, 4.0], 4)
    loads = recorded_loads(prior, 2)
    assert torch.equal(loads[:-1], prior) and loads[-1] == PRIOR_SCALE // 2  # k = 2 entries per token
    pseudo = recorded_loads(prior, 2, prior_tokens=100)  # 100 tokens of 2 entries
    assert pseudo.tolist() == [75, 25, 0, 100, 100]
    assert recorded_loads(prior, 2, prior_tokens=0).tolist() == [0] * 5


@pytest.mark.parametrize("seed", range(4))
def test_excess_weights_keep_the_fair_share_and_send_the_rest_where_there_is_room(seed):
    w, load, shared = random_loads(seed, max_ranks=20, shared_part=4)
    loads = torch.cat([load, torch.tensor([shared])])
    deficit = (bisected_level(load.double(), shared) - load.double()).clamp(min=0)
    share = shared / w
    room = (deficit - share).clamp(min=0)
    # Expected shared load per rank if every rank sends by its own weights: its deficit.
    received = torch.zeros(w, dtype=torch.float64)
    for rank in range(w):
        weights = excess_weights(loads, rank).double()
        p = weights / weights.sum()
        if deficit[rank] >= share - 1e-6:
            assert p[rank] == 1.0  # at or below its share of the level: keeps everything
        else:
            assert (p[room == 0].sum() - p[rank]).abs() < 1e-9  # sends only to ranks with room
        received += share * p
    assert torch.allclose(received, deficit, rtol=0, atol=shared * 2e-3)


@pytest.mark.parametrize("seed", range(4))
def test_recorded_excess_is_the_others_load_above_the_level_per_token(seed):
    w, load, shared = random_loads(seed, max_ranks=40, shared_part=8)
    excess = recorded_excess(torch.cat([load, torch.tensor([shared])]), w)
    assert excess.shape == (w + 1,) and excess[-1] == 0
    above = (load.double() - bisected_level(load.double(), shared)).clamp(min=0)
    expected = above * (w - 1) / shared * (1 << EXCESS_BITS)
    assert torch.allclose(excess[:-1].double(), expected, rtol=1e-6, atol=1.0)
    assert ((excess[:-1] > 0) == (above > 1e-6)).all()


def test_recorded_excess_by_hand_and_edge_cases():
    # Level 650 (ranks 2 and 3 wet); ranks 0 and 1 are 250 and 150 above it, over 1000 shared
    # tokens: 3 other ranks add 0.75 and 0.45 entries per token.
    excess = recorded_excess(torch.tensor([900, 800, 100, 200, 1000]), 4)
    assert excess.tolist() == [round(0.75 * (1 << EXCESS_BITS)), round(0.45 * (1 << EXCESS_BITS)), 0, 0, 0]
    assert recorded_excess(torch.tensor([900, 100, 0]), 2).tolist() == [0, 0, 0]  # no shared load
    assert recorded_excess(torch.tensor([900, 50]), 1).tolist() == [0, 0]  # no other rank
    assert recorded_excess(torch.tensor([10, 10, 10, 5]), 3).tolist() == [0, 0, 0, 0]  # balanced


@pytest.mark.parametrize("move", ["excess", "all"])
def test_fixed_tables_weigh_by_excess_or_by_deficit(move):
    loads = recorded_loads(scaled_rank_load([900.0, 800.0, 100.0, 200.0], 4), 2)
    weights = excess_weights(loads, RULE.rank) if move == "excess" else rank_weights(loads, loads[-1], 0)
    assert torch.equal(fixed_rank_tables(loads, RULE, move), rank_tables(weights, loads, RULE))


def test_host_input_follows_the_strategy():
    prior = scaled_rank_load([900.0, 800.0, 100.0, 200.0], 4)
    loads = recorded_loads(prior, 3)
    cases = [
        (Strategy(Source.PRIOR, HostInput.LOADS, "recorded", "all"), loads),
        (Strategy(Source.BATCH, HostInput.LOADS, "recorded", "all", prior_tokens=50), recorded_loads(prior, 3, 50)),
        (Strategy(Source.BATCH_OFFSET, HostInput.EXCESS, "batch", "all"), recorded_excess(loads, 4)),
        (Strategy(Source.PRIOR, HostInput.TABLES, "recorded", "excess"), fixed_rank_tables(loads, RULE, "excess")),
    ]
    for strategy, expected in cases:
        assert torch.equal(host_input(strategy, prior, 3, RULE), expected)
