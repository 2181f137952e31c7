"""WaterfillBalancer on the torch backend: layout, weights, candidates, modes, validation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import eplb
from eplb import EplbError, Placement, WaterfillBalancer, WaterfillConfig
from eplb.runtime.waterfill import expand_routed_ids, shared_slot
from tests.runtime.waterfill.waterfill_inputs import random_topk

TORCH = WaterfillConfig(backend="torch")


def shared_ranks(ids: torch.Tensor, epr: int) -> torch.Tensor:
    return torch.div(ids[:, -1], epr + 1, rounding_mode="floor")


def test_lazy_export():
    assert eplb.WaterfillBalancer is WaterfillBalancer
    assert eplb.WaterfillConfig is WaterfillConfig


@pytest.mark.parametrize("factor", [None, 0, 2.5, 1])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_layout_and_weights(make_topk, factor, dtype):
    p, w, k = 48, 6, 4
    ids, weights = make_topk(200, k, p, seed=3, padded=5, dtype=dtype, weight_dtype=torch.float64)
    out_ids, out_w = WaterfillBalancer(p, w, 2, replace(TORCH, routed_scaling_factor=factor)).expand_topk(ids, weights)
    assert out_ids.shape == (200, k + 1) and out_ids.dtype == dtype and out_w.dtype == torch.float64
    assert torch.equal(out_ids[:, :k], expand_routed_ids(ids, p // w))
    assert torch.equal(out_w[:, :k], torch.where(ids >= 0, weights, 0))
    padded = (ids < 0).all(1)
    assert (out_ids[padded, k] == -1).all() and (out_w[padded, k] == 0).all()
    expected_weight = 1.0 if not factor else 1.0 / factor
    assert (out_w[~padded, k] == expected_weight).all()
    assert out_ids[0, k] >= 0  # half padded is still a token


@pytest.mark.parametrize("ep_size", [1, 2, 5, 8, 16, 64])
@pytest.mark.parametrize("candidates", ["routed", "all"])
def test_each_token_gets_one_shared_slot_among_its_candidates(make_topk, ep_size, candidates):
    p, k, rank = 4 * ep_size * 3, 3, 0  # rank 0 holds the hottest slots
    epr = p // ep_size
    ids, weights = make_topk(300, k, p, seed=ep_size, skew=4.0, padded=4)
    out, _ = WaterfillBalancer(p, ep_size, rank, replace(TORCH, candidates=candidates)).expand_topk(ids, weights)
    valid = (ids >= 0).any(1)
    shared = out[valid, -1]
    assert ((shared % (epr + 1)) == epr).all()  # a shared slot, never a routed one
    dest = shared_ranks(out[valid], epr)
    assert ((dest >= 0) & (dest < ep_size)).all()
    if candidates == "routed":
        routed = torch.where(ids[valid] >= 0, ids[valid] // epr, -1)
        assert ((routed == dest[:, None]).any(1) | (dest == rank)).all()
    # Routed columns never hold a shared slot: exactly one shared column per token.
    assert ((out[:, :k] % (epr + 1) != epr) | (out[:, :k] < 0)).all()
    if ep_size > 1:
        assert (dest != rank).any()  # the skewed batch makes some shared experts move


def test_small_batches_stay_local(make_topk):
    p, w, rank = 32, 4, 0  # rank 0 is the hot one: waterfill wants to move its shared experts
    b = WaterfillBalancer(p, w, rank, TORCH)
    ids, weights = make_topk(63, 2, p, seed=0, skew=6.0)
    out, _ = b.expand_topk(ids, weights)
    assert (out[(ids >= 0).any(1), -1] == shared_slot(rank, 8)).all()
    ids, weights = make_topk(64, 2, p, seed=0, skew=6.0)
    out, _ = b.expand_topk(ids, weights)
    assert (out[:, -1] != shared_slot(rank, 8)).any()
    out, _ = WaterfillBalancer(p, w, rank, replace(TORCH, min_batch=0)).expand_topk(*make_topk(5, 2, p, skew=6.0))
    assert (out[:, -1] != shared_slot(rank, 8)).any()


def test_deterministic_and_seeded_per_layer_and_rank(make_topk):
    p, w = 64, 8
    ids, weights = make_topk(500, 4, p, seed=1, skew=2.0)

    def dest(layer_id: int = 0, seed: int = 0, rank: int = 3) -> torch.Tensor:
        b = WaterfillBalancer(p, w, rank, replace(TORCH, seed=seed), layer_id=layer_id)
        return b.expand_topk(ids, weights)[0][:, -1]

    assert torch.equal(dest(), dest())
    assert not torch.equal(dest(layer_id=0), dest(layer_id=1))
    assert not torch.equal(dest(seed=0), dest(seed=1))
    assert not torch.equal(dest(rank=3), dest(rank=4))
    assert torch.equal(dest(layer_id=7, seed=2), dest(layer_id=7, seed=2))


def rank_compute(outs: list[torch.Tensor], epr: int, ep_size: int) -> torch.Tensor:
    """Per-rank work: routed entries plus shared tokens received, summed over the senders."""
    work = torch.zeros(ep_size, dtype=torch.int64)
    for out in outs:
        valid = out[out >= 0]
        work += torch.bincount(valid // (epr + 1), minlength=ep_size)
    return work


def emulate_dynamic(batches, p, w, **knobs) -> tuple[torch.Tensor, torch.Tensor]:
    """(global counts, per-rank work) of one dynamic-mode step on ``w`` emulated ranks."""
    config = replace(TORCH, mode="dynamic", **knobs)
    balancers = [WaterfillBalancer(p, w, r, config, all_reduce=lambda t: t) for r in range(w)]
    counts = sum(b.local_counts(ids) for b, (ids, _) in zip(balancers, batches, strict=False))
    outs = [b.expand_topk_global(ids, wt, counts)[0] for b, (ids, wt) in zip(balancers, batches, strict=False)]
    return counts, rank_compute(outs, p // w, w)


@pytest.mark.parametrize("candidates", ["routed", "all"])
def test_dynamic_mode_evens_out_rank_compute(make_topk, candidates):
    p, w, k, m = 64, 8, 4, 512
    batches = [make_topk(m, k, p, seed=r, skew=0.5, padded=r) for r in range(w)]
    counts, work = emulate_dynamic(batches, p, w, candidates=candidates)
    tokens = [int((ids >= 0).any(1).sum()) for ids, _ in batches]
    assert counts[-1] == sum(tokens)  # each token counted once
    assert counts[:-1].sum() == sum(int((ids >= 0).sum()) for ids, _ in batches)
    baseline = counts[:-1] + torch.tensor(tokens)  # shared expert on the token's own rank
    assert work.sum() == baseline.sum()
    imbalance = work.max() / work.double().mean()
    assert imbalance < (1.06 if candidates == "routed" else 1.02) < 1.15 < baseline.max() / baseline.double().mean()


def test_dynamic_mode_moves_every_shared_expert_off_a_very_hot_rank(make_topk):
    p, w, k, m = 64, 8, 4, 512
    batches = [make_topk(m, k, p, seed=r, skew=3.0) for r in range(w)]
    counts, work = emulate_dynamic(batches, p, w)
    hot = counts[:-1].argmax()
    assert work[hot] <= counts[hot] + 0.02 * m  # almost none of the 8 x 512 shared tokens land there


def test_dynamic_mode_joins_the_all_reduce_on_every_call(make_topk):
    calls = []

    def all_reduce(t):
        calls.append(t.clone())
        return t * 2

    b = WaterfillBalancer(32, 4, 1, replace(TORCH, mode="dynamic"), all_reduce=all_reduce)
    ids, weights = make_topk(10, 2, 32)
    out, _ = b.expand_topk(ids[:0], weights[:0])
    assert out.shape == (0, 3)
    out, _ = b.expand_topk(ids, weights)  # small: local, but still reduced
    assert (out[:, -1] == shared_slot(1, 8)).all()
    assert len(calls) == 2 and calls[0].tolist() == [0] * 5 and int(calls[1][-1]) == 10


def static_shares(rank: int, rank_load: list[float], tokens: int = 4000, **knobs) -> torch.Tensor:
    """Share of an even batch's shared experts that each rank runs, from ``rank``'s balancer."""
    p, w = 32, 4
    ids, weights = random_topk(tokens, 2, p, seed=5)
    config = replace(TORCH, estimate="recorded", candidates="all", local_preference=1.0, **knobs)
    b = WaterfillBalancer(p, w, rank, config, rank_load=torch.tensor(rank_load))
    dest = shared_ranks(b.expand_topk(ids, weights)[0], p // w)
    return torch.bincount(dest, minlength=w).double() / len(dest)


def test_static_mode_moves_only_the_excess_of_the_recorded_loads():
    # 2000 routed + 1000 shared (k = 2): ranks 2 and 3 are below the level 650, with deficits
    # 550 and 450; each rank holds 250 shared tokens, so rank 2 has room for 300 more, rank 3 200.
    hot = [900.0, 800.0, 100.0, 200.0]
    assert torch.allclose(static_shares(0, hot), torch.tensor([0.0, 0.0, 0.6, 0.4], dtype=torch.float64), atol=0.03)
    assert static_shares(2, hot)[2] == 1.0  # below the level: keeps every shared expert
    # SGLang's rule samples every token by deficit, also on rank 2.
    by_deficit = static_shares(2, hot, move="all")
    assert torch.allclose(by_deficit, torch.tensor([0.0, 0.0, 0.55, 0.45], dtype=torch.float64), atol=0.03)
    # Level 750 over all ranks, deficits [150, 250, 300, 300]: rank 0 keeps 150 of its 250
    # shared tokens and sends 50 to each of ranks 2 and 3; rank 1 is exactly at its share.
    mild = [600.0, 500.0, 450.0, 450.0]
    assert torch.allclose(static_shares(0, mild), torch.tensor([0.6, 0.0, 0.2, 0.2], dtype=torch.float64), atol=0.03)
    assert static_shares(1, mild)[1] == 1.0


def test_prior_tokens_blend_the_recorded_loads_with_the_batch(make_topk):
    p, w = 32, 4
    ids, weights = make_topk(2000, 2, p, seed=5, skew=2.0)  # the batch says rank 0 is hot
    recorded = torch.tensor([100.0, 100.0, 100.0, 900.0])  # the records say rank 3 is

    def shares(rank_load=None, **knobs):
        b = WaterfillBalancer(p, w, 0, replace(TORCH, candidates="all", **knobs), rank_load=rank_load)
        dest = shared_ranks(b.expand_topk(ids, weights)[0], p // w)
        return torch.bincount(dest, minlength=w).double() / len(dest)

    batch_only = shares()
    records_only = shares(recorded, estimate="recorded", move="all")  # as prior_tokens: by deficit
    assert torch.equal(shares(recorded, prior_tokens=0), batch_only)
    assert batch_only[0] < 0.05 and records_only[3] < 0.05
    blended = shares(recorded, prior_tokens=2000)  # as many tokens as the batch
    assert (blended - batch_only).abs().sum() > 0.1 and (blended - records_only).abs().sum() > 0.1
    assert torch.allclose(shares(recorded, prior_tokens=10**7), records_only, atol=0.01)


def test_estimate_batch_is_the_batch_rule_where_the_records_are_level(make_topk):
    p, w = 64, 8
    ids, weights = make_topk(600, 4, p, seed=6, skew=2.0)
    for rank in (0, 5):
        sglang = WaterfillBalancer(p, w, rank, TORCH).expand_topk(ids, weights)
        # Every rank below the recorded water level: no excess, so the batch's counts alone decide.
        level = WaterfillBalancer(p, w, rank, replace(TORCH, estimate="batch"), rank_load=torch.ones(w))
        assert all(torch.equal(a, b) for a, b in zip(level.expand_topk(ids, weights), sglang, strict=False))


def test_estimate_batch_sends_nothing_to_a_rank_hot_in_the_records_but_light_in_the_batch(make_topk):
    p, w, m = 32, 4, 2000
    ids, weights = make_topk(m, 2, p, seed=5, skew=2.0)
    ids = torch.where(ids >= 0, p - 1 - ids, ids)  # the batch says rank 0 is the lightest, rank 3 the hottest
    recorded = torch.tensor([900.0, 100.0, 100.0, 100.0])  # the records say rank 0 is hot overall

    def shares(rank: int, rank_load=None) -> torch.Tensor:
        b = WaterfillBalancer(p, w, rank, replace(TORCH, candidates="all"), rank_load=rank_load)
        dest = shared_ranks(b.expand_topk(ids, weights)[0], p // w)
        return torch.bincount(dest, minlength=w).double() / m

    for rank in range(w):
        assert shares(rank)[0] > 0.3  # SGLang's rule fills the rank that is light in this batch
        combined = shares(rank, rank_load=recorded)  # estimate="batch", the default
        assert combined[0] == 0.0
        # Among the ranks below the recorded level, it still follows the batch: rank 3 is hottest.
        assert combined[3] < combined[1]


def test_estimate_batch_is_deterministic_and_seeded_per_layer(make_topk):
    p, w = 64, 8
    ids, weights = make_topk(500, 4, p, seed=1, skew=2.0)
    load = torch.linspace(2.0, 1.0, w)

    def dest(layer_id: int = 0) -> torch.Tensor:
        b = WaterfillBalancer(p, w, 3, replace(TORCH, estimate="batch"), layer_id=layer_id, rank_load=load)
        return b.expand_topk(ids, weights)[0][:, -1]

    assert torch.equal(dest(), dest())
    assert not torch.equal(dest(layer_id=0), dest(layer_id=1))


def test_estimate_batch_keeps_small_batches_local(make_topk):
    p, w = 32, 4
    b = WaterfillBalancer(p, w, 0, replace(TORCH, estimate="batch"), rank_load=torch.tensor([1.0, 9.0, 9.0, 9.0]))
    ids, weights = make_topk(63, 2, p, seed=0, skew=6.0)
    assert (b.expand_topk(ids, weights)[0][:, -1] == shared_slot(0, 8)).all()


def test_from_placement_reads_gpu_loads(make_topk):
    phy2log = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])
    placement = Placement(phy2log, num_experts=8, num_gpus=4)
    load = torch.tensor([[100.0, 100.0, 50.0, 50.0, 0.0, 0.0, 0.0, 0.0]])
    config = replace(TORCH, candidates="all")
    b = WaterfillBalancer.from_placement(placement, load, layer=0, rank=0, config=config)
    assert (b.num_routed_slots, b.ep_size, b.num_expanded_slots, b.layer_id) == (8, 4, 12, 0)
    ids, weights = make_topk(1000, 2, 8, seed=2)
    dest = shared_ranks(b.expand_topk(ids, weights)[0], 2)
    assert set(dest.tolist()) == {2, 3}  # the hot GPU sends all: only the idle GPUs are below the level
    with pytest.raises(EplbError, match="layer 3"):
        WaterfillBalancer.from_placement(placement, load, layer=3, rank=0)


@pytest.mark.parametrize(
    ("knobs", "args", "match"),
    [
        ({}, dict(num_routed_slots=30, ep_size=4), "multiple of 4"),
        ({}, dict(rank=4), "rank must be an integer in"),
        ({}, dict(layer_id=-1), "layer_id"),
        ({}, dict(config={"mode": "static"}), "must be a WaterfillConfig"),
        ({}, dict(rank_load=torch.ones(3)), r"shape \(4,\)"),
        ({}, dict(rank_load=torch.tensor([1.0, -1.0, 0.0, 0.0])), "negative"),
        ({}, dict(rank_load=torch.zeros(4)), "sums to 0"),
        (dict(mode="dynamic"), dict(rank_load=torch.ones(4)), "static mode"),
        ({}, dict(all_reduce=lambda t: t), "no collective"),
        (dict(prior_tokens=100), {}, "pass rank_load too"),
        (dict(estimate="batch"), {}, "pass rank_load too"),
        (dict(move="excess"), {}, "use move='all'"),
    ],
)
def test_balancer_arguments_are_validated(knobs, args, match):
    settings = dict(num_routed_slots=32, ep_size=4, rank=0, config=WaterfillConfig(**knobs))
    settings.update(args)
    with pytest.raises(EplbError, match=match):
        WaterfillBalancer(**settings)


def test_inputs_are_validated(make_topk):
    b = WaterfillBalancer(32, 4, 0, TORCH)
    ids, weights = make_topk(8, 2, 32)
    with pytest.raises(EplbError, match="slot 32"):
        b.expand_topk(torch.full_like(ids, 32), weights)
    with pytest.raises(EplbError, match=r"\[tokens, k\]"):
        b.expand_topk(ids[:, 0], weights[:, 0])
    with pytest.raises(EplbError, match=r"\[tokens, k\]"):
        b.expand_topk(ids, weights[:, :1])
    with pytest.raises(EplbError, match="int32 or int64"):
        b.expand_topk(ids.float(), weights)
    with pytest.raises(EplbError, match="floating-point"):
        b.expand_topk(ids, ids)
    dynamic = WaterfillBalancer(32, 4, 0, replace(TORCH, mode="dynamic"))
    with pytest.raises(EplbError, match="init_process_group"):
        dynamic.expand_topk(ids, weights)
    with pytest.raises(EplbError, match="all-reduce of local_counts"):
        dynamic.expand_topk_global(ids, weights, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(EplbError, match="dynamic mode's step"):
        b.expand_topk_global(ids, weights, torch.zeros(5, dtype=torch.int64))
