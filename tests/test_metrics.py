import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.errors import EplbError
from eplb.metrics import duplicates, evaluate, lower_bound, mean_max_over_mean
from eplb.placement import Placement


def compositions(total: int, parts: int):
    """Every vector of ``parts`` integers >= 1 that sums to ``total``."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        edges = (0, *cuts, total)
        yield [b - a for a, b in zip(edges, edges[1:], strict=False)]


def brute_lower_bound(load: list[float], num_gpus: int, num_slots: int) -> float:
    best_replica_bound = min(
        max(x / c for x, c in zip(load, counts, strict=False)) for counts in compositions(num_slots, len(load))
    )
    return max(best_replica_bound, sum(load) / num_gpus)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 60), min_size=1, max_size=4),
    st.integers(0, 5),
    st.integers(1, 4),
)
def test_lower_bound_matches_brute_force(load, redundant, num_gpus):
    num_slots = -(-(len(load) + redundant) // num_gpus) * num_gpus  # a cluster's P is a multiple of G
    got = lower_bound(torch.tensor([load], dtype=torch.float64), num_gpus, num_slots)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(brute_lower_bound(load, num_gpus, num_slots), rel=1e-9, abs=1e-12)


def test_lower_bound_is_below_every_placement():
    # 3 experts, 4 slots on 2 GPUs: the bound is total / G = 7, the best placement ({0, 2} | {0, 1}) 7.5.
    load = torch.tensor([[9.0, 3.0, 2.0]])
    bound = lower_bound(load, num_gpus=2, num_slots=4).item()
    best = float("inf")
    for row in itertools.product(range(3), repeat=4):
        if set(row) != {0, 1, 2}:
            continue
        placement = Placement(torch.tensor([row]), num_experts=3, num_gpus=2)
        best = min(best, placement.gpu_load(load).max().item())
    assert bound == 7.0
    assert best == 7.5


def test_lower_bound_per_layer_and_history():
    load = torch.tensor([[[4.0, 0.0], [1.0, 1.0]], [[4.0, 0.0], [1.0, 1.0]]])  # [T=2, L=2, E=2]
    # Layer 0: 8 tokens, all on expert 0, which gets 3 of 4 slots; layer 1: 4 tokens over 4 GPUs.
    assert lower_bound(load, num_gpus=4, num_slots=4).tolist() == pytest.approx([8 / 3, 1.0])


def test_lower_bound_of_an_idle_layer_is_zero():
    assert lower_bound(torch.zeros(1, 4), num_gpus=2, num_slots=6).tolist() == [0.0]


@pytest.mark.parametrize(
    ("num_gpus", "num_slots", "match"),
    [(0, 8, "num_gpus must be a positive integer, got 0; pass the cluster's GPU count"),
     (1, 3, "3 slots cannot hold 4 experts; use at least 4 slots"),
     (2, 5, "5 slots cannot be split evenly over 2 GPUs; use a multiple of 2, e.g. 6")],
)
def test_lower_bound_rejects_bad_sizes(num_gpus, num_slots, match):
    with pytest.raises(EplbError, match=match):
        lower_bound(torch.ones(2, 4), num_gpus, num_slots)


def test_duplicates():
    phy2log = torch.tensor([
        [0, 0, 1, 2, 3, 3],  # expert 0 twice on GPU 0 (rank 0), expert 3 twice on GPU 2
        [0, 1, 0, 2, 3, 1],  # replicas on different GPUs: no duplicate
        [2, 2, 0, 1, 3, 2],  # only GPU 0 repeats expert 2
    ])
    placement = Placement(phy2log, num_experts=4, num_gpus=3)
    assert duplicates(placement).tolist() == [2, 0, 1]
    one_gpu = Placement(torch.tensor([[1, 1, 0, 1]]), num_experts=2, num_gpus=1)
    assert duplicates(one_gpu).tolist() == [2]


def test_duplicates_ignore_empty_slots():
    placement = Placement(torch.tensor([[0, -1, -1, 1]]), num_experts=2, num_gpus=1)
    assert duplicates(placement).tolist() == [0]


def test_evaluate_hand_made():
    # Layer 0: GPU loads 6 | 2 (expert 0 alone on GPU 0); layer 1: 4 | 4, perfectly balanced.
    placement = Placement(torch.tensor([[0, 0, 1, 2], [0, 1, 0, 2]]), num_experts=3, num_gpus=2)
    load = torch.tensor([[6.0, 1.0, 1.0], [4.0, 2.0, 2.0]])
    report = evaluate(placement, load)
    assert report.max_load.tolist() == [6.0, 4.0]
    assert report.mean_load.tolist() == [4.0, 4.0]
    assert report.balancedness.tolist() == pytest.approx([4 / 6, 1.0])
    assert report.imbalance.tolist() == pytest.approx([0.5, 0.0])
    # Both bounds: total / G = 4 beats the replica bound (expert 0 over 2 slots: 3).
    assert report.lower_bound.tolist() == pytest.approx([4.0, 4.0])
    assert report.gap.tolist() == pytest.approx([0.5, 0.0])
    assert report.duplicates.tolist() == [1, 0]
    assert report.loaded.tolist() == [True, True]
    summary = report.summary()
    assert summary["balancedness"] == pytest.approx((4 / 6 + 1) / 2)
    assert summary["max_over_mean"] == pytest.approx((1.5 + 1) / 2)
    assert summary["worst_max_over_mean"] == pytest.approx(1.5)
    assert summary["imbalance"] == pytest.approx(0.25)
    assert summary["gap"] == pytest.approx(0.25)
    assert summary["max_gap"] == pytest.approx(0.5)
    assert summary["duplicates"] == 1


def test_evaluate_gap_against_replica_bound():
    # One hot expert and one slot per GPU: its 2 replicas carry 5 each, above total / G = 3.
    # Layer 1 gives the spare slot to a cold expert instead.
    placement = Placement(torch.tensor([[0, 1, 0, 2], [0, 1, 2, 1]]), num_experts=3, num_gpus=4)
    report = evaluate(placement, torch.tensor([[10.0, 1.0, 1.0]] * 2))
    assert report.lower_bound.tolist() == [5.0, 5.0]
    assert report.max_load.tolist() == [5.0, 10.0]
    assert report.gap.tolist() == [0.0, 1.0]


def test_history_is_summed_over_steps(make_load):
    placement = Placement(torch.tensor([[0, 1, 2, 3, 0, 1]] * 2), num_experts=4, num_gpus=3)
    history = make_load(2, 4, steps=3)
    a, b = evaluate(placement, history), evaluate(placement, history.sum(0))
    for field in ("balancedness", "max_load", "lower_bound", "gap"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field))


def test_dense_layers_are_left_out_of_the_means():
    placement = Placement(torch.tensor([[0, 1, 2, 3]] * 3), num_experts=4, num_gpus=2)
    load = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    report = evaluate(placement, load)
    assert report.loaded.tolist() == [False, True, False]
    # Dense layers get neutral values, not NaN.
    assert report.balancedness.tolist() == pytest.approx([1.0, 0.75, 1.0])
    assert report.imbalance.tolist() == pytest.approx([0.0, 1 / 3, 0.0])
    assert report.gap[[0, 2]].tolist() == [0.0, 0.0]
    only_loaded = evaluate(Placement(torch.tensor([[0, 1, 2, 3]]), 4, 2), load[1:2]).summary()
    assert report.summary() == pytest.approx(only_loaded)
    assert report.summary()["balancedness"] == pytest.approx(0.75)


def test_summary_of_an_all_dense_load():
    placement = Placement(torch.tensor([[0, 1], [1, 0]]), num_experts=2, num_gpus=2)
    summary = evaluate(placement, torch.zeros(2, 2)).summary()
    assert summary["balancedness"] == 1.0
    assert summary["max_over_mean"] == 1.0
    assert summary["imbalance"] == 0.0
    assert summary["gap"] == 0.0


def test_evaluate_validates_the_load():
    placement = Placement(torch.tensor([[0, 1]]), num_experts=2, num_gpus=2)
    with pytest.raises(EplbError, match="negative"):
        evaluate(placement, torch.tensor([[1.0, -1.0]]))
    with pytest.raises(EplbError, match="placement is for 1 layers x 2 experts"):
        evaluate(placement, torch.ones(1, 3))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(0, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_property_bound_never_exceeds_a_placement(num_experts, redundant, num_gpus, seed):
    # A random placement on random loads: lower_bound <= max_load and 0 < balancedness <= 1.
    gen = torch.Generator().manual_seed(seed)
    per_gpu = -(-(num_experts + redundant) // num_gpus)
    num_slots = per_gpu * num_gpus
    extra = torch.randint(0, num_experts, (num_slots - num_experts,), generator=gen)
    row = torch.cat([torch.arange(num_experts), extra])[torch.randperm(num_slots, generator=gen)]
    placement = Placement(row[None], num_experts=num_experts, num_gpus=num_gpus)
    load = torch.rand(1, num_experts, generator=gen, dtype=torch.float64) * 100
    report = evaluate(placement, load)
    assert bool((report.lower_bound <= report.max_load * (1 + 1e-12)).all())
    assert bool((report.gap >= -1e-12).all())
    assert 0 < report.balancedness.item() <= 1 + 1e-12
    assert report.imbalance.item() == pytest.approx(1 / report.balancedness.item() - 1)


def test_mean_max_over_mean_skips_rows_without_load():
    gpu = torch.tensor([[[4.0, 2.0], [0.0, 0.0]], [[3.0, 3.0], [1.0, 3.0]]])  # [T=2, L=2, G=2]
    assert mean_max_over_mean(gpu) == pytest.approx((4 / 3 + 1.0 + 1.5) / 3)
    assert mean_max_over_mean(torch.zeros(2, 3)) == 1.0


def test_report_max_over_mean_and_layer_mean():
    placement = Placement(torch.tensor([[0, 1], [0, 1]]), num_experts=2, num_gpus=2)
    report = evaluate(placement, torch.tensor([[3.0, 1.0], [0.0, 0.0]]))
    assert report.max_over_mean.tolist() == [1.5, 1.0]
    assert report.layer_mean(torch.tensor([2.0, 7.0])) == 2.0  # the dense layer is left out
    assert report.summary()["max_over_mean"] == 1.5


def test_replicas_needed_in_a_buffer_equal_the_per_expert_counts():
    from eplb.metrics import _replicas_needed_per_expert

    gen = torch.Generator().manual_seed(0)
    load = torch.rand(6, 10, generator=gen, dtype=torch.float64) ** 3 * 50
    t = torch.rand(6, 1, generator=gen, dtype=torch.float64) * 5
    t[2], t[4] = 0.0, -1.0  # no threshold yet: one replica per expert
    per_expert = torch.where(t > 0, torch.ceil(load / torch.where(t > 0, t, 1.0)).clamp(min=1), 1.0)
    got = _replicas_needed_per_expert(load, t, torch.empty_like(load)).sum(1, keepdim=True)
    assert torch.equal(got, per_expert.sum(1, keepdim=True))
    assert torch.equal(_replicas_needed_per_expert(load, t), per_expert)
