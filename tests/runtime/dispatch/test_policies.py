import math
import subprocess
import sys

import pytest
import torch

from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.runtime.dispatch import HashDispatch, StaticDispatch, WeightedDispatch, static_tables

DTYPES = (torch.int32, torch.int64)


def _policies(placement, rank=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(placement.log2phy.shape, generator=g, dtype=torch.float64) * (placement.log2phy >= 0)
    return [
        StaticDispatch(placement, rank),
        HashDispatch(placement, seed=seed),
        WeightedDispatch(placement, probs, seed=seed),
    ]


def _ids(placement, dtype, tokens=200, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, placement.num_experts, (tokens, k), generator=g)
    ids[torch.rand(tokens, k, generator=g) < 0.1] = -1  # padding
    return ids.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(3))
def test_every_id_maps_to_a_replica_of_its_expert(dtype, seed, make_placement):
    placement = make_placement(seed)
    ids = _ids(placement, dtype, seed=seed)
    for policy in _policies(placement, rank=seed % placement.num_gpus, seed=seed):
        for layer in range(placement.num_layers):
            out = policy.remap(layer, ids)
            assert out.dtype == dtype and out.shape == ids.shape
            pad = ids < 0
            assert bool((out[pad] == -1).all())
            held = placement.phy2log[layer][out[~pad].long()]
            assert torch.equal(held, ids[~pad].long())


def test_static_prefers_same_gpu_then_same_node(make_placement):
    placement = make_placement(1, layers=3, experts=16, gpus=8, nodes=2, slots_per_gpu=3)
    tables = static_tables(placement)  # [G, L, E]
    gpu_of = placement.slot_gpu
    for rank in range(placement.num_gpus):
        node = rank // placement.gpus_per_node
        for layer in range(placement.num_layers):
            for expert in range(placement.num_experts):
                replicas = placement.log2phy[layer, expert]
                replicas = replicas[replicas >= 0]
                chosen = int(tables[rank, layer, expert])
                assert chosen in replicas.tolist()
                if (gpu_of[replicas] == rank).any():
                    assert int(gpu_of[chosen]) == rank
                elif (gpu_of[replicas] // placement.gpus_per_node == node).any():
                    assert int(gpu_of[chosen]) // placement.gpus_per_node == node


def test_static_spreads_fallback_ranks_evenly():
    # 16 GPUs on 4 nodes. Expert 0 has replicas on GPUs 0, 1, 2 (node 0) and GPU 5 (node 1).
    gpus, experts = 16, 16
    row = torch.arange(gpus * 2) % experts  # GPU g holds experts 2g % 16 and (2g + 1) % 16
    row[[3, 5, 11]] = 0  # GPUs 1, 2 and 5 get a replica of expert 0 (GPU 0 already has one)
    row[16] = 8  # and GPU 8 loses its replica
    placement = Placement(row.view(1, -1), num_experts=experts, num_gpus=gpus, num_nodes=4)
    chosen = static_tables(placement)[:, 0, 0]
    replicas = placement.log2phy[0, 0][placement.log2phy[0, 0] >= 0]
    gpu = placement.slot_gpu
    assert torch.equal(gpu[chosen[[0, 1, 2, 5]]], torch.tensor([0, 1, 2, 5]))
    assert bool((gpu[chosen[[3]]] < 4).all())  # node 0's rank 3 stays on node 0
    assert bool((gpu[chosen[[4, 6, 7]]] == 5).all())  # node 1's only replica
    # Nodes 2 and 3 (8 ranks) have no replica: 2 per replica.
    share = torch.stack([(chosen[8:] == s).sum() for s in replicas])
    assert share.tolist() == [2, 2, 2, 2]


def test_hash_is_rank_invariant_and_even(make_placement):
    placement = make_placement(2, experts=8, gpus=4, slots_per_gpu=6)
    expert = int(placement.logcnt[0].argmax())
    count = int(placement.logcnt[0, expert])
    n = 60_000
    ids = torch.full((n // 3, 3), expert)
    a = HashDispatch(placement, seed=5).remap(0, ids)
    b = HashDispatch(placement, seed=5).remap(0, ids)
    assert torch.equal(a, b)  # built independently (another rank) -> same choice
    freq = torch.stack([(a == s).sum() for s in placement.log2phy[0, expert, :count]]).double() / n
    # h is a bijection of the entry index, so h mod c is uniform up to binomial noise.
    bound = 5 * math.sqrt(0.25 / n)
    assert float((freq - 1 / count).abs().max()) < bound
    assert not torch.equal(a, HashDispatch(placement, seed=6).remap(0, ids))


@pytest.mark.parametrize("seed", range(2))
def test_weighted_follows_its_probabilities(seed, make_placement):
    placement = make_placement(seed, experts=6, gpus=4, slots_per_gpu=5)
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(placement.log2phy.shape, generator=g, dtype=torch.float64) * (placement.log2phy >= 0)
    probs[..., 0] = 0.0  # a zero-weight replica must never be drawn
    probs[placement.logcnt == 1, 0] = 1.0
    dispatch = WeightedDispatch(placement, probs, seed=seed)
    n = 100_000
    layer = 1
    ids = torch.arange(placement.num_experts).repeat(n)
    hits = torch.bincount(dispatch.remap(layer, ids), minlength=placement.num_slots).double() / n
    for expert in range(placement.num_experts):
        cnt = int(placement.logcnt[layer, expert])
        p = probs[layer, expert, :cnt] / probs[layer, expert, :cnt].sum()
        # Slots hold one expert each, so a slot's hit count is its replica's count.
        freq = hits[placement.log2phy[layer, expert, :cnt]]
        # 5 binomial standard deviations at p = 1/2 (the worst case), plus the alias table's
        # rounding (< 2**-24 / cnt per replica, see eplb.runtime.dispatch.alias).
        assert float((freq - p).abs().max()) < 5 * math.sqrt(0.25 / n) + 2**-24
        assert bool((freq[p == 0] == 0).all())


def test_set_probs_rewrites_in_place(make_placement):
    placement = make_placement(3, experts=4, gpus=2, slots_per_gpu=4)
    held = (placement.log2phy >= 0).double()
    dispatch = WeightedDispatch(placement, held)
    tables = (dispatch._threshold, dispatch._alias)
    addresses = [t.data_ptr() for t in tables]
    first_only = torch.zeros_like(held)
    first_only[..., 0] = 1.0
    dispatch.set_probs(first_only)
    # A captured graph holds these addresses: the new weights must land in the same storage.
    assert (dispatch._threshold, dispatch._alias) == tables
    assert [t.data_ptr() for t in tables] == addresses
    out = dispatch.remap(0, torch.arange(4).repeat(50))
    assert torch.equal(out, placement.log2phy[0, torch.arange(4).repeat(50), 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_with_equal_weights_is_the_hash_policy(dtype, make_placement):
    # Equal weights give every bucket its own replica (threshold 2**24), so the alias draw
    # reduces to bucket = h mod logcnt, which is HashDispatch's choice entry by entry.
    placement = make_placement(7, experts=8, gpus=4, slots_per_gpu=6)
    ids = _ids(placement, dtype, tokens=500, k=8)
    weighted = WeightedDispatch(placement, (placement.log2phy >= 0).double() * 3.0, seed=9)
    hashed = HashDispatch(placement, seed=9)
    for layer in range(placement.num_layers):
        assert torch.equal(weighted.remap(layer, ids), hashed.remap(layer, ids))


def test_bad_input_raises_eplb_error(placement):
    dispatch = HashDispatch(placement)
    with pytest.raises(EplbError, match="outside"):
        dispatch.remap(placement.num_layers, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(EplbError, match="int32 or int64"):
        dispatch.remap(0, torch.zeros(2, 2))
    with pytest.raises(EplbError, match="backend"):
        dispatch.remap(0, torch.zeros(2, 2, dtype=torch.int64), backend="cuda")
    with pytest.raises(EplbError, match="rank"):
        StaticDispatch(placement, placement.num_gpus)
    with pytest.raises(EplbError, match="Placement"):
        HashDispatch(placement.phy2log)
    with pytest.raises(EplbError, match="shape"):
        WeightedDispatch(placement, torch.ones(3))
    bad = (placement.log2phy >= 0).double()
    bad[0, 0] = 0.0
    with pytest.raises(EplbError, match="all-zero"):
        WeightedDispatch(placement, bad)
    with pytest.raises(EplbError, match="padding"):
        WeightedDispatch(placement, torch.ones(placement.log2phy.shape, dtype=torch.float64))
    neg = (placement.log2phy >= 0).double()
    neg[0, 0, 0] = -1.0
    with pytest.raises(EplbError, match="negative"):
        WeightedDispatch(placement, neg)


def test_imports_and_remaps_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, eplb\n"
        "from eplb.runtime.dispatch import HashDispatch\n"
        "p = eplb.Placement(torch.tensor([[0, 1, 0, 1]]), num_experts=2, num_gpus=2)\n"
        "print(HashDispatch(p).remap(0, torch.tensor([[0, 1], [-1, 1]])).tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = eval(done.stdout)
    assert out[1][0] == -1 and out[0][0] in (0, 2) and out[0][1] in (1, 3)
