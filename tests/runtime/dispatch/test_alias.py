"""The alias tables: exact in expectation, zero weights unreachable, any replica count."""

import pytest
import torch

from eplb.placement import Placement
from eplb.runtime.dispatch.alias import alias_table
from eplb.runtime.hashing import UNIFORM_ONE


def _random_probs(placement, seed, zeros=0.3):
    g = torch.Generator().manual_seed(seed)
    held = placement.log2phy >= 0
    probs = torch.rand(held.shape, generator=g, dtype=torch.float64) ** 3  # skewed
    probs[torch.rand(held.shape, generator=g) < zeros] = 0.0
    probs[..., 0] += 1e-3  # every expert keeps a positive weight
    return probs * held


def _drawn(placement, threshold, alias):
    """``[L, E, X]``: each replica's probability under the table, summed bucket by bucket:
    bucket b (chosen with 1 / cnt) keeps threshold / 2**24 for its own replica and sends the
    rest to the replica whose slot is its alias."""
    log2phy = placement.log2phy
    cnt = placement.logcnt.unsqueeze(-1).double()
    held = log2phy >= 0
    keep = torch.where(held, threshold.double() / UNIFORM_ONE, 0.0)
    give = torch.where(held, 1.0 - keep, 0.0)
    target = (alias.long().unsqueeze(-1) == log2phy.unsqueeze(-2)) & held.unsqueeze(-2)  # [L, E, b, x]
    assert bool((target.sum(-1)[give > 0] == 1).all())  # an alias in use is a replica of the expert
    return (keep + (give.unsqueeze(-1) * target).sum(-2)) / cnt


@pytest.mark.parametrize("seed", range(6))
def test_table_reproduces_probs_exactly_in_expectation(seed, make_placement):
    placement = make_placement(seed, layers=3, experts=6 + seed, gpus=4, slots_per_gpu=4 + 2 * seed)
    probs = _random_probs(placement, seed)
    threshold, alias = alias_table(placement, probs)
    assert threshold.dtype == alias.dtype == torch.int32
    expected = probs / probs.sum(-1, keepdim=True)
    error = (_drawn(placement, threshold, alias) - expected).abs()
    assert float(error.max()) < 1e-6
    # The rounding to integer masses moves each replica by at most one unit of 2**-24 / cnt.
    unit = 1.0 / (placement.logcnt.unsqueeze(-1) * UNIFORM_ONE)
    assert bool((error <= unit * (1 + 1e-9)).all())


@pytest.mark.parametrize("seed", range(3))
def test_zero_weights_are_never_drawn(seed, make_placement):
    placement = make_placement(seed, experts=5, gpus=4, slots_per_gpu=5)
    probs = _random_probs(placement, seed, zeros=0.5)
    threshold, alias = alias_table(placement, probs)
    held = placement.log2phy >= 0
    zero = held & (probs == 0)
    assert bool((threshold[zero] == 0).all())
    # No bucket that gives anything away names a zero-weight replica of its expert as alias.
    names = alias.long().unsqueeze(-1) == placement.log2phy.unsqueeze(-2)  # [L, E, bucket, x]
    gives = held & (threshold < UNIFORM_ONE)
    assert not bool((names & zero.unsqueeze(-2) & gives.unsqueeze(-1)).any())
    assert bool((threshold >= 0).all()) and bool((threshold <= UNIFORM_ONE).all())
    assert bool((threshold[~held] == 0).all()) and bool((alias[~held] == -1).all())


def test_equal_and_one_hot_weights(make_placement):
    placement = make_placement(2, experts=6, gpus=4, slots_per_gpu=6)
    held = placement.log2phy >= 0
    threshold, alias = alias_table(placement, held.double())
    assert bool((threshold[held] == UNIFORM_ONE).all())
    last = (placement.logcnt - 1).unsqueeze(-1)
    one_hot = torch.zeros(held.shape, dtype=torch.float64).scatter_(-1, last, 1.0)
    threshold, alias = alias_table(placement, one_hot)
    assert torch.equal(_drawn(placement, threshold, alias), one_hot)


def test_counts_beyond_int32_masses():
    # Expert 0 holds 317 of 320 slots: 317 * 2**24 > 2**32, so the masses need int64.
    row = torch.zeros(320, dtype=torch.int64)
    row[[5, 100, 250]] = torch.tensor([1, 2, 3])
    placement = Placement(row.view(1, -1), num_experts=4, num_gpus=4)
    probs = _random_probs(placement, 0)
    threshold, alias = alias_table(placement, probs)
    expected = probs / probs.sum(-1, keepdim=True)
    assert float((_drawn(placement, threshold, alias) - expected).abs().max()) < 1e-6
