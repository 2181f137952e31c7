"""The cross-node traffic measure."""

from __future__ import annotations

import pytest
import torch

from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.traffic import expected_remote_nodes, remote_share


def _two_nodes() -> Placement:
    # 2 GPUs on 2 nodes; expert 0 on node 0, expert 1 on node 1.
    return Placement(torch.tensor([[0, 1]]), num_experts=2, num_gpus=2, num_nodes=2)


def test_one_node_has_no_traffic():
    p = Placement(torch.tensor([[0, 1, 2, 3]]), num_experts=4, num_gpus=2, num_nodes=1)
    assert float(expected_remote_nodes(p, torch.ones(1, 4))) == 0.0


def test_hand_computed_single_pick():
    load = torch.tensor([[3.0, 1.0]])
    # Source node 0 goes remote for expert 1 (share 1/4), node 1 for expert 0 (3/4): mean 1/2.
    assert float(expected_remote_nodes(_two_nodes(), load, top_k=1)) == pytest.approx(0.5)
    # Two independent picks from node 0 miss node 1 with probability (3/4)^2.
    two = (1 - 0.75**2 + 1 - 0.25**2) / 2
    assert float(expected_remote_nodes(_two_nodes(), load, top_k=2)) == pytest.approx(two)


def test_replicas_everywhere_are_local():
    p = Placement(torch.tensor([[0, 1, 0, 1]]), num_experts=2, num_gpus=2, num_nodes=2)
    assert float(expected_remote_nodes(p, torch.tensor([[5.0, 1.0]]))) == 0.0
    assert float(remote_share(p).sum()) == 0.0


def test_grouped_model_with_one_group_is_independent():
    p = Placement(torch.arange(8).view(1, 8), num_experts=8, num_gpus=4, num_nodes=4)
    load = torch.rand(1, 8, generator=torch.Generator().manual_seed(0)) + 0.1
    plain = expected_remote_nodes(p, load, top_k=4)
    grouped = expected_remote_nodes(p, load, top_k=4, num_groups=1, groups_per_token=1)
    assert torch.allclose(plain, grouped)


def test_group_on_one_node_lowers_traffic():
    load = torch.ones(1, 8)
    kept = Placement(torch.arange(8).view(1, 8), num_experts=8, num_gpus=4, num_nodes=4)  # group = node
    mixed = Placement(torch.tensor([[0, 2, 4, 6, 1, 3, 5, 7]]), num_experts=8, num_gpus=4, num_nodes=4)
    kw = dict(top_k=2, num_groups=4, groups_per_token=1)
    assert float(expected_remote_nodes(kept, load, **kw)) < float(expected_remote_nodes(mixed, load, **kw))


def test_coactivation_estimate():
    load = torch.tensor([[3.0, 1.0]])
    # Tokens never pick both experts, so each touches at most one node: P = E[X].
    got = expected_remote_nodes(_two_nodes(), load, top_k=1, coactivation=torch.zeros(1, 2, 2))
    assert float(got) == pytest.approx(0.5)
    always = torch.tensor([[[0.0, 2.0], [2.0, 0.0]]])
    assert 0 <= float(expected_remote_nodes(_two_nodes(), load, top_k=2, coactivation=always)) <= 1


@pytest.mark.parametrize(
    "kwargs,match",
    [({"top_k": 0}, "top_k must be a positive integer, got 0; pass"),
     ({"coactivation": torch.zeros(1, 3, 3)}, "coactivation"),
     ({"coactivation": -torch.ones(1, 2, 2)}, "coactivation"),
     ({"num_groups": 3, "groups_per_token": 1}, "groups"),
     ({"num_groups": 2, "groups_per_token": 3}, "groups_per_token must be an integer in \\[1, 2\\], got 3; pass")],
)
def test_bad_input(kwargs, match):
    with pytest.raises(EplbError, match=match):
        expected_remote_nodes(_two_nodes(), torch.ones(1, 2), **kwargs)
    with pytest.raises(EplbError, match="placement"):
        expected_remote_nodes(_two_nodes(), torch.ones(1, 3))


@pytest.mark.parametrize("mode", ["independent", "grouped", "pairwise"])
def test_chunks_of_layers_give_the_same_numbers(monkeypatch, mode):
    import eplb.traffic

    gen = torch.Generator().manual_seed(3)
    phy2log = torch.stack([torch.randperm(16, generator=gen) % 8 for _ in range(5)])
    p = Placement(phy2log, num_experts=8, num_gpus=8, num_nodes=4)
    load = torch.rand(5, 8, generator=gen, dtype=torch.float64)
    kwargs = {"independent": {}, "grouped": dict(num_groups=4, groups_per_token=2),
              "pairwise": dict(coactivation=torch.rand(5, 8, 8, generator=gen, dtype=torch.float64))}[mode]
    whole = expected_remote_nodes(p, load, top_k=4, **kwargs)
    monkeypatch.setattr(eplb.traffic, "_CHUNK_ELEMENTS", 8 * 16 * 2)  # two layers per chunk
    assert torch.equal(expected_remote_nodes(p, load, top_k=4, **kwargs), whole)
