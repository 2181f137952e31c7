from __future__ import annotations

import pytest
import torch

from eplb import EplbError, Placement
from eplb.runtime.waterfill.layout import (
    check_one_shared_expert,
    expand_routed_ids,
    expanded_phy2log,
    num_shared_experts,
    shared_slot,
    slots_per_rank,
)


def test_slots_per_rank_needs_an_even_split():
    assert slots_per_rank(288, 16) == 18
    with pytest.raises(EplbError, match="multiple of 7"):
        slots_per_rank(288, 7)
    for bad in (0, -4, 2.0, True):
        with pytest.raises(EplbError, match="num_routed_slots must be"):
            slots_per_rank(bad, 4)


def test_routed_ids_skip_one_slot_per_rank_and_shared_slots_fill_the_gaps():
    epr, ep = 3, 4
    routed = expand_routed_ids(torch.arange(epr * ep), epr)
    shared = shared_slot(torch.arange(ep), epr)
    # Together they number the expanded layout exactly once, routed first within each rank.
    assert sorted(routed.tolist() + shared.tolist()) == list(range(epr * ep + ep))
    assert torch.equal(routed // (epr + 1), torch.arange(epr * ep) // epr)
    assert torch.equal(shared % (epr + 1), torch.full((ep,), epr))
    assert shared_slot(2, epr) == 11
    assert torch.equal(expand_routed_ids(torch.tensor([-1, -5, 7]), epr), torch.tensor([-1, -5, 9]))


def test_expanded_phy2log_puts_the_shared_expert_last_on_every_rank():
    phy2log = torch.tensor([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 3]])
    placement = Placement(phy2log, num_experts=4, num_gpus=3)
    out = expanded_phy2log(placement.phy2log, 3, shared_expert=4)
    assert out.shape == (2, 9)
    epr = placement.slots_per_gpu
    for rank in range(3):
        local = out[:, rank * (epr + 1) : (rank + 1) * (epr + 1)]
        assert torch.equal(local[:, :epr], placement.local_experts(rank))
        assert (local[:, epr] == 4).all()
    # The routed columns sit where expand_routed_ids sends their slot ids.
    assert torch.equal(out[:, expand_routed_ids(torch.arange(6), epr)], phy2log)
    assert expanded_phy2log(phy2log[0], 3, 4).shape == (9,)
    with pytest.raises(EplbError, match="multiple of 4"):
        expanded_phy2log(phy2log, 4, 4)
    with pytest.raises(EplbError, match="integer"):
        expanded_phy2log(phy2log.float(), 3, 4)


@pytest.mark.parametrize(
    ("config", "count"),
    [
        ({"n_shared_experts": 1, "n_routed_experts": 256}, 1),  # DeepSeek-V3
        ({"n_shared_experts": 2}, 2),  # DeepSeek-V2-Lite
        ({"shared_expert_intermediate_size": 5632}, 1),  # Qwen2-MoE
        ({"shared_expert_intermediate_size": 0}, 0),
        ({"num_local_experts": 8}, 0),  # Mixtral
        ({"num_shared_experts": 1}, 1),
    ],
)
def test_num_shared_experts_reads_the_config(config, count):
    assert num_shared_experts(config) == count


def test_only_one_shared_expert_is_accepted():
    check_one_shared_expert({"n_shared_experts": 1})
    check_one_shared_expert(1)
    with pytest.raises(EplbError, match="no shared expert"):
        check_one_shared_expert({"num_local_experts": 8})
    with pytest.raises(EplbError, match="2 shared experts.*fuse them"):
        check_one_shared_expert({"n_shared_experts": 2})
