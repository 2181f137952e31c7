"""Parity of the DeepSeek policies with deepseek-ai/EPLB's published semantics.

The oracle below is a deliberately slow, literal restatement of the reference's algorithm:
one layer, one node, one item at a time, in float32 as the reference computes. Its only
vectorised pieces are the two torch calls the reference's semantics are defined by (the
float32 group sums and torch's default sort, whose order of equal weights is part of the output).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import eplb
from eplb import EplbError, Placement, rebalance_experts
from eplb.planning import ALGORITHMS, AUTO_ORDER
from eplb.planning.deepseek import balanced_packing, replicate_experts

F32 = np.float32


# --- the oracle ------------------------------------------------------------------------------


def oracle_packing(weights: list, num_packs: int) -> tuple[list[int], list[int]]:
    """Heaviest item first into the lightest pack with room (lowest index on ties)."""
    n = len(weights)
    capacity = n // num_packs
    if capacity == 1:
        return list(range(n)), [0] * n
    order = torch.sort(torch.tensor(np.array(weights, dtype=F32)), descending=True).indices.tolist()
    pack_load = [F32(0)] * num_packs
    pack_items = [0] * num_packs
    pack, rank = [-1] * n, [-1] * n
    for item in order:
        best = None
        for p in range(num_packs):
            if pack_items[p] < capacity and (best is None or pack_load[p] < pack_load[best]):
                best = p
        pack[item], rank[item] = best, pack_items[best]
        pack_load[best] = F32(pack_load[best] + weights[item])
        pack_items[best] += 1
    return pack, rank


def oracle_replicate(weights: list, num_phy: int) -> tuple[list[int], list[int], list[int]]:
    """Each redundant slot to the expert with the highest float32 load per replica (first on ties)."""
    n = len(weights)
    phy2log, rank, count = list(range(n)), [0] * n, [1] * n
    for _ in range(num_phy - n):
        best = 0
        for e in range(1, n):
            if weights[e] / F32(count[e]) > weights[best] / F32(count[best]):
                best = e
        phy2log.append(best)
        rank.append(count[best])
        count[best] += 1
    return phy2log, rank, count


def oracle_hierarchical(weight: torch.Tensor, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int):
    """The reference's hierarchical routine, layer by layer and node by node."""
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_experts // num_nodes
    slots_per_node = num_slots // num_nodes
    slots_per_gpu = num_slots // num_gpus
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1).numpy()
    w = weight.numpy()
    phy2log = [[-1] * num_slots for _ in range(num_layers)]
    phyrank = [[-1] * num_slots for _ in range(num_layers)]
    logcnt = [[0] * num_experts for _ in range(num_layers)]
    for layer in range(num_layers):
        gpack, grank = oracle_packing(list(group_load[layer]), num_nodes)
        mlog2log = [0] * num_experts
        for e in range(num_experts):
            g = e // group_size
            mlog2log[(gpack[g] * groups_per_node + grank[g]) * group_size + e % group_size] = e
        for node in range(num_nodes):
            experts = mlog2log[node * experts_per_node:(node + 1) * experts_per_node]
            node_w = [w[layer, e] for e in experts]
            rep, rank, count = oracle_replicate(node_w, slots_per_node)
            replica_w = [node_w[m] / F32(count[m]) for m in rep]
            gpu, pos = oracle_packing(replica_w, num_gpus // num_nodes)
            for p in range(slots_per_node):
                slot = node * slots_per_node + gpu[p] * slots_per_gpu + pos[p]
                phy2log[layer][slot] = experts[rep[p]]
                phyrank[layer][slot] = rank[p]
            for m, e in enumerate(experts):
                logcnt[layer][e] = count[m]
    return phy2log, phyrank, logcnt


def oracle_rebalance(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """The reference's entry point: policy choice, then log2phy ordered by replica rank."""
    weight = weight.float()
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = oracle_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = oracle_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    width = max(max(row) for row in logcnt)
    log2phy = [[[-1] * width for _ in row] for row in logcnt]
    for layer, row in enumerate(phy2log):
        for slot, expert in enumerate(row):
            log2phy[layer][expert][phyrank[layer][slot]] = slot
    return phy2log, log2phy, logcnt


# --- random cases ----------------------------------------------------------------------------

NUM_CASES = 210


def random_case(seed: int, *, zero_layers: bool = False, any_groups: bool = False):
    """A random (weight [L, E] float32, num_slots, num_groups, num_nodes, num_gpus).

    Weights are small integers (many ties and zeros), heavy-tailed floats, floats with many
    zeros, large integers, or near-multiples of one large base (so that loads per replica nearly
    tie, and only float32 rounding tells them apart, as in the reference). With ``any_groups``
    the group count need not be a multiple of the node count.
    """
    rng = np.random.default_rng(seed)
    num_layers = int(rng.integers(1, 9))
    num_groups = int(rng.choice([1, 2, 3, 4, 6, 8]))
    group_size = int(rng.choice([1, 2, 3, 4, 8]))
    num_experts = num_groups * group_size
    divisors = [d for d in range(1, num_groups + 1) if num_groups % d == 0]
    num_nodes = int(rng.choice([1, 2, 3, 4] if any_groups else divisors))
    num_gpus = num_nodes * int(rng.integers(1, 5))
    if any_groups and num_groups % num_nodes != 0:
        # The reference then falls back to the global policy, which needs neither divisibility.
        num_experts += int(rng.integers(0, 3))
        num_gpus = int(rng.integers(1, 9))
    per_gpu = -(-num_experts // num_gpus) + int(rng.integers(0, 3))
    kind = seed % 5
    if kind == 0:
        weight = rng.integers(0, 4, (num_layers, num_experts)).astype(F32)
    elif kind == 1:
        weight = rng.lognormal(3.0, 2.0, (num_layers, num_experts)).astype(F32)
    elif kind == 2:
        weight = (rng.lognormal(0.0, 1.0, (num_layers, num_experts)) * (rng.random((num_layers, num_experts)) < 0.6))
        weight = weight.astype(F32)
    elif kind == 3:
        weight = rng.integers(0, 2_000_000, (num_layers, num_experts)).astype(F32)
    else:
        multiple = rng.choice([1, 2, 3, 4, 6], (num_layers, num_experts))
        weight = (multiple * 4_194_304 + rng.integers(0, 8, (num_layers, num_experts))).astype(F32)
    if zero_layers and num_layers > 1:
        weight[rng.integers(0, num_layers)] = 0
    if not zero_layers:
        weight[weight.sum(1) == 0] = 1  # eplb.plan plans an all-zero (dense) layer as uniform
    return torch.from_numpy(weight), num_gpus * per_gpu, num_groups, num_nodes, num_gpus


def _plan(weight, num_slots, num_groups, num_nodes, num_gpus, algorithm):
    return eplb.plan(weight, num_gpus=num_gpus, num_slots=num_slots, num_nodes=num_nodes,
                     num_groups=num_groups, algorithm=algorithm)


@pytest.mark.parametrize("seed", range(NUM_CASES))
def test_global_policy_matches_reference(seed):
    weight, num_slots, num_groups, num_nodes, num_gpus = random_case(seed)
    got = _plan(weight, num_slots, num_groups, num_nodes, num_gpus, "deepseek")
    want, _, _ = oracle_hierarchical(weight, num_slots, 1, 1, num_gpus)
    assert got.phy2log.tolist() == want
    assert got.algorithm == "deepseek"


@pytest.mark.parametrize("seed", range(NUM_CASES))
def test_hierarchical_policy_matches_reference(seed):
    weight, num_slots, num_groups, num_nodes, num_gpus = random_case(seed + 10_000)
    got = _plan(weight, num_slots, num_groups, num_nodes, num_gpus, "deepseek_hierarchical")
    want, _, _ = oracle_hierarchical(weight, num_slots, num_groups, num_nodes, num_gpus)
    assert got.phy2log.tolist() == want


@pytest.mark.parametrize("seed", range(NUM_CASES))
def test_rebalance_experts_matches_reference(seed):
    weight, num_slots, num_groups, num_nodes, num_gpus = random_case(seed + 20_000, zero_layers=True, any_groups=True)
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_slots, num_groups, num_nodes, num_gpus)
    want_phy2log, want_log2phy, want_logcnt = oracle_rebalance(weight, num_slots, num_groups, num_nodes, num_gpus)
    assert phy2log.tolist() == want_phy2log
    assert log2phy.tolist() == want_log2phy
    assert logcnt.tolist() == want_logcnt
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64


def test_history_is_planned_on_its_sum():
    gen = torch.Generator().manual_seed(3)
    history = torch.randint(0, 50, (5, 4, 16), generator=gen).double()
    got = _plan(history, 24, 4, 2, 8, "deepseek_hierarchical")
    want, _, _ = oracle_hierarchical(history.sum(0).float(), 24, 4, 2, 8)
    assert got.phy2log.tolist() == want


def test_readme_example():
    weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert logcnt.tolist() == Placement(phy2log, num_experts=12, num_gpus=8).logcnt.tolist()
    assert log2phy.shape == (2, 12, 2)
    for layer in range(2):
        for expert in range(12):
            slots = [s for s in log2phy[layer, expert].tolist() if s >= 0]
            assert sorted(slots) == [s for s in range(16) if phy2log[layer, s] == expert]


def test_policy_choice_falls_back_to_global_when_groups_do_not_split_over_nodes():
    weight = torch.arange(1.0, 25.0).reshape(2, 12) ** 2
    fallback = rebalance_experts(weight, 16, 3, 2, 8)
    global_policy = rebalance_experts(weight, 16, 1, 1, 8)
    assert all(torch.equal(a, b) for a, b in zip(fallback, global_policy, strict=False))
    hierarchical = rebalance_experts(weight, 16, 4, 2, 8)
    assert not torch.equal(hierarchical[0], global_policy[0])


@pytest.mark.parametrize("args", [(12, 3, 2, 4), (16, 1, 3, 4), (15, 7, 2, 5), (20, 5, 3, 4)])
def test_fallback_accepts_what_the_reference_accepts(args):
    # groups % nodes != 0: the reference plans globally, whether or not groups divide the experts
    # or nodes divide the GPUs.
    weight = torch.arange(1.0, 25.0).reshape(2, 12) ** 2
    num_slots, _, _, num_gpus = args
    got = rebalance_experts(weight, *args)
    want = oracle_rebalance(weight, *args)
    assert [got[0].tolist(), got[1].tolist(), got[2].tolist()] == [want[0], want[1], want[2]]
    assert torch.equal(got[0], rebalance_experts(weight, num_slots, 1, 1, num_gpus)[0])


def test_no_groups_counts_as_one_group():
    weight = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(rebalance_experts(weight, 20, None, 2, 4),
                                                 rebalance_experts(weight, 20, 1, 1, 4), strict=False))


def test_hierarchical_keeps_each_group_on_one_node(make_load):
    load = make_load(4, 32, seed=1)
    placement = _plan(load, 48, 8, 4, 16, "deepseek_hierarchical")
    node_of_slot = placement.slot_node
    for layer in range(4):
        for group in range(8):
            in_group = (placement.phy2log[layer] // 4) == group
            assert node_of_slot[in_group].unique().numel() == 1


def test_pieces_match_oracle_on_ties():
    weight = np.array([[3, 3, 1, 1, 0, 0, 3, 1], [0] * 8, [2] * 8], dtype=F32)
    pack, rank = balanced_packing(weight, 4)
    phy2log, phyrank, logcnt = replicate_experts(weight, 13)
    for row in range(3):
        assert (pack[row].tolist(), rank[row].tolist()) == oracle_packing(list(weight[row]), 4)
        assert (phy2log[row].tolist(), phyrank[row].tolist(), logcnt[row].tolist()) == \
            oracle_replicate(list(weight[row]), 13)


def test_registered_algorithms():
    assert {"deepseek", "deepseek_hierarchical"} <= set(AUTO_ORDER)
    assert set(AUTO_ORDER) <= set(ALGORITHMS)
    with pytest.raises(EplbError, match="num_groups"):
        _plan(torch.ones(2, 8), 8, None, 1, 4, "deepseek_hierarchical")
    with pytest.raises(EplbError, match="multiple of the node count"):
        _plan(torch.ones(2, 12), 12, 3, 2, 4, "deepseek_hierarchical")


@pytest.mark.parametrize(
    ("weight", "args", "match"),
    [
        (torch.ones(8), (8, 1, 1, 4), "dimensions"),
        (torch.ones(2, 2, 8), (8, 1, 1, 4), r"\[layers, experts\]"),
        (torch.ones(1, 2, 8), (8, 1, 1, 4), r"\[layers, experts\]"),
        (torch.tensor([[1.0, float("nan")] * 4]), (8, 1, 1, 4), "NaN"),
        (-torch.ones(2, 8), (8, 1, 1, 4), "negative"),
        (torch.ones(2, 0), (8, 1, 1, 4), "empty"),
        ("not a load", (8, 1, 1, 4), "numeric"),
        (torch.ones(2, 8), (10, 1, 1, 4), "multiple of 4"),
        (torch.ones(2, 8), (4, 1, 1, 4), "at least 8 slots"),
        (torch.ones(2, 8), (12, 2, 2, 3), "multiple of the node count"),
        (torch.ones(2, 8), (8, 3, 1, 4), "equal groups"),
        (torch.ones(2, 8), (8, 1, 1, 0), "num_gpus must be a positive integer"),
        (torch.ones(2, 8), (8, 0, 1, 4), "num_groups must be a positive integer"),
        (torch.full((2, 8), 1e38, dtype=torch.float64), (8, 1, 1, 4), "float32"),
    ],
)
def test_rebalance_experts_rejects_bad_input(weight, args, match):
    with pytest.raises(EplbError, match=match):
        rebalance_experts(weight, *args)
