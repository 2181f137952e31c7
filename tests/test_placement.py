import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.cluster import Cluster
from eplb.errors import EplbError
from eplb.placement import EMPTY_SLOT, Placement
from eplb.planning.static import round_robin

# 2 layers, 4 experts, 6 slots on 3 GPUs (2 slots each); expert 1 is replicated on GPU 0 and
# expert 2 twice on GPU 2 (a duplicate).
PHY2LOG = [[1, 0, 1, 3, 2, 2], [3, 2, 1, 0, 0, 1]]


@pytest.fixture
def small() -> Placement:
    return Placement(torch.tensor(PHY2LOG), num_experts=4, num_gpus=3)


# Reference implementations: plain loops over phy2log, to check the vectorized maps against.


def ref_logcnt(phy2log: list[list[int]], num_experts: int) -> list[list[int]]:
    return [[row.count(e) for e in range(num_experts)] for row in phy2log]


def ref_slots(phy2log: list[list[int]], num_experts: int) -> list[list[list[int]]]:
    """``[L][E]``: the slots of each expert, ascending."""
    return [[[p for p, x in enumerate(row) if x == e] for e in range(num_experts)] for row in phy2log]


def check_invariants(placement: Placement) -> None:
    """Every derived map agrees with phy2log (the properties below run this on random placements)."""
    rows = placement.phy2log.tolist()
    num_layers, num_slots, num_experts = placement.num_layers, placement.num_slots, placement.num_experts
    slots_per_gpu = placement.slots_per_gpu

    logcnt = placement.logcnt
    assert logcnt.tolist() == ref_logcnt(rows, num_experts)
    assert bool((logcnt >= 1).all())
    num_empty = (placement.phy2log == EMPTY_SLOT).sum(1)
    assert torch.equal(logcnt.sum(1), num_slots - num_empty)

    log2phy = placement.log2phy
    assert log2phy.shape == (num_layers, num_experts, int(logcnt.max()))
    width = log2phy.shape[-1]
    expected = [[s + [EMPTY_SLOT] * (width - len(s)) for s in layer] for layer in ref_slots(rows, num_experts)]
    assert log2phy.tolist() == expected
    held = log2phy >= 0
    layer_idx = torch.arange(num_layers)[:, None, None].expand_as(log2phy)
    expert_idx = torch.arange(num_experts)[None, :, None].expand_as(log2phy)
    assert torch.equal(placement.phy2log[layer_idx[held], log2phy[held]], expert_idx[held])
    assert torch.equal(held.sum(-1), logcnt)

    assert placement.slot_gpu.tolist() == [p // slots_per_gpu for p in range(num_slots)]
    gpus_per_node = placement.num_gpus // placement.num_nodes
    assert placement.slot_node.tolist() == [p // slots_per_gpu // gpus_per_node for p in range(num_slots)]

    loaded = []
    for rank in range(placement.num_gpus):
        loaded.append(load_weights(placement, rank))
        # A router sends expert e to rank * S + expert_map[l, e]: the first replica of e on that rank.
        emap = placement.expert_map(rank)
        for layer in range(num_layers):
            for expert in range(num_experts):
                on_rank = [p for p in log2phy[layer, expert].tolist() if p >= 0 and p // slots_per_gpu == rank]
                want = on_rank[0] - rank * slots_per_gpu if on_rank else EMPTY_SLOT
                assert int(emap[layer, expert]) == want
    assert torch.equal(torch.cat(loaded, dim=1), placement.phy2log)


def load_weights(placement: Placement, rank: int) -> torch.Tensor:
    """A simulated weight loader for GPU ``rank``: ``[L, S]``, the expert whose weights fill each local slot.

    It walks the checkpoint expert by expert, as real loaders do: ``expert_map`` says whether the rank
    needs expert ``e`` at all, ``local_experts`` says every local slot that takes a copy.
    """
    weights = torch.full((placement.num_layers, placement.slots_per_gpu), EMPTY_SLOT)
    emap, local = placement.expert_map(rank), placement.local_experts(rank)
    for layer in range(placement.num_layers):
        for expert in range(placement.num_experts):
            if emap[layer, expert] < 0:
                assert expert not in local[layer].tolist()
                continue
            copies = (local[layer] == expert).nonzero().flatten()
            assert int(copies[0]) == int(emap[layer, expert])
            weights[layer, copies] = expert
    return weights


# Construction and validation ---------------------------------------------------------------


def test_sizes(small):
    assert (small.num_layers, small.num_experts, small.num_slots) == (2, 4, 6)
    assert (small.num_gpus, small.num_nodes, small.slots_per_gpu, small.gpus_per_node) == (3, 1, 2, 3)


def test_known_maps(small):
    assert small.logcnt.tolist() == [[1, 2, 2, 1], [2, 2, 1, 1]]
    assert small.log2phy.tolist() == [
        [[1, -1], [0, 2], [4, 5], [3, -1]],
        [[3, 4], [2, 5], [1, -1], [0, -1]],
    ]
    assert small.expert_map(2).tolist() == [[-1, -1, 0, -1], [0, 1, -1, -1]]
    check_invariants(small)


@pytest.mark.parametrize(
    "data",
    [torch.tensor(PHY2LOG, dtype=torch.int32), np.array(PHY2LOG), PHY2LOG],
    ids=["int32", "numpy", "list"],
)
def test_phy2log_is_stored_as_cpu_int64(data):
    placement = Placement(data, num_experts=4, num_gpus=3)
    assert placement.phy2log.dtype == torch.int64
    assert placement.phy2log.device.type == "cpu"
    assert placement.phy2log.tolist() == PHY2LOG


def test_phy2log_is_a_private_copy():
    source = torch.tensor(PHY2LOG)
    placement = Placement(source, num_experts=4, num_gpus=3)
    logcnt = placement.logcnt.clone()
    source[0, 0] = 0
    assert placement.phy2log.tolist() == PHY2LOG
    assert torch.equal(placement.logcnt, logcnt)


def test_non_contiguous_phy2log():
    wide = torch.tensor([[0, 9, 1, 9, 0, 9, 1, 9]])
    placement = Placement(wide[:, ::2], num_experts=2, num_gpus=2)
    assert placement.phy2log.is_contiguous()
    check_invariants(placement)


def test_frozen(small):
    with pytest.raises(dataclasses.FrozenInstanceError):
        small.num_gpus = 6  # type: ignore[misc]


@pytest.mark.parametrize(
    "phy2log",
    [torch.tensor([0, 1, 2]), torch.zeros(1, 2, 3, dtype=torch.int64), torch.zeros(0, 4, dtype=torch.int64),
     torch.zeros(2, 0, dtype=torch.int64)],
    ids=["1d", "3d", "no-layers", "no-slots"],
)
def test_wrong_shape(phy2log):
    with pytest.raises(EplbError, match=r"non-empty \[layers, slots\]"):
        Placement(phy2log, num_experts=3, num_gpus=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_dtype(dtype):
    with pytest.raises(EplbError, match="integer expert ids.*pass an integer tensor"):
        Placement(torch.tensor(PHY2LOG).to(dtype), num_experts=4, num_gpus=3)


@pytest.mark.parametrize("bad", [4, 7, -2])
def test_ids_out_of_range(bad):
    phy2log = torch.tensor(PHY2LOG)
    phy2log[1, 3] = bad
    with pytest.raises(EplbError, match=r"outside \[-1, 4\).*logical expert id or -1"):
        Placement(phy2log, num_experts=4, num_gpus=3)


def test_expert_without_replica():
    phy2log = torch.tensor(PHY2LOG)
    phy2log[1] = torch.tensor([3, 2, 1, 1, 1, 1])  # layer 1 loses expert 0
    with pytest.raises(EplbError, match="expert 0 of layer 1 has no replica.*at least one slot"):
        Placement(phy2log, num_experts=4, num_gpus=3)


def test_experts_missing_counted():
    with pytest.raises(EplbError, match=r"expert 2 of layer 0.*\(4 \(layer, expert\) pairs"):
        Placement(torch.tensor([[0, 1, 0, 1], [1, 0, 1, 1]]), num_experts=4, num_gpus=1)


def test_fewer_slots_than_experts():
    with pytest.raises(EplbError, match="2 slots cannot hold 4 experts; use at least 4 slots"):
        Placement(torch.tensor([[0, 1], [1, 0]]), num_experts=4, num_gpus=1)


def test_slots_not_divisible_by_gpus():
    with pytest.raises(EplbError, match="6 slots cannot be split evenly over 4 GPUs; use a multiple of 4, e.g. 8"):
        Placement(torch.tensor(PHY2LOG), num_experts=4, num_gpus=4)


def test_gpus_not_divisible_by_nodes():
    with pytest.raises(EplbError, match="3 GPUs cannot be split evenly over 2 nodes; use a GPU count"):
        Placement(torch.tensor(PHY2LOG), num_experts=4, num_gpus=3, num_nodes=2)


@pytest.mark.parametrize("name", ["num_experts", "num_gpus", "num_nodes"])
def test_non_positive_sizes(name):
    sizes = {"num_experts": 4, "num_gpus": 3, "num_nodes": 1, name: 0}
    with pytest.raises(EplbError, match=f"{name} must be a positive integer, got 0; pass the"):
        Placement(torch.tensor(PHY2LOG), **sizes)


@pytest.mark.parametrize("rank", [-1, 3])
def test_expert_map_rank_out_of_range(small, rank):
    with pytest.raises(EplbError, match=rf"rank must be an integer in \[0, 2\], got {rank}; pass a GPU index"):
        small.expert_map(rank)


def test_nodes():
    placement = Placement(torch.arange(8).repeat(2, 1), num_experts=8, num_gpus=4, num_nodes=2)
    assert placement.gpus_per_node == 2
    assert placement.slot_gpu.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert placement.slot_node.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


# Loads ---------------------------------------------------------------------------------------


def test_slot_and_gpu_load(small):
    load = torch.tensor([[10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]])
    # Each expert's load is split evenly over its replicas.
    assert small.slot_load(load).tolist() == [[10.0, 10.0, 10.0, 40.0, 15.0, 15.0], [4.0, 3.0, 1.0, 0.5, 0.5, 1.0]]
    assert small.gpu_load(load).tolist() == [[20.0, 50.0, 30.0], [7.0, 1.5, 1.5]]


def test_history_load(small, make_load):
    history = make_load(2, 4, steps=5)
    slot = small.slot_load(history)
    gpu = small.gpu_load(history)
    assert slot.shape == (5, 2, 6)
    assert gpu.shape == (5, 2, 3)
    for step in range(5):
        assert torch.equal(slot[step], small.slot_load(history[step]))
        assert torch.equal(gpu[step], small.gpu_load(history[step]))


def test_integer_load_is_read_as_float(small):
    load = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    assert small.gpu_load(load).dtype == torch.float64
    assert small.gpu_load(load).sum().item() == 20.0


@pytest.mark.parametrize("shape", [(2, 5), (3, 4), (4,), (5, 4, 2)])
def test_load_shape_mismatch(small, shape):
    with pytest.raises(EplbError, match=r"placement is for 2 layers x 4 experts; pass a \[\.\.\., L, E\] load"):
        small.slot_load(torch.ones(shape))


# Empty slots (round_robin) -------------------------------------------------------------------


def test_round_robin_empty_slots():
    # 10 experts on 4 GPUs: ranks 2 and 3 hold one expert fewer and leave their last slot empty.
    phy2log = round_robin(torch.ones(1, 2, 10), Cluster(num_gpus=4, num_slots=12))
    placement = Placement(phy2log, num_experts=10, num_gpus=4)
    assert placement.phy2log[0].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, -1, 3, 7, -1]
    assert placement.logcnt.tolist() == [[1] * 10] * 2
    assert placement.log2phy.shape == (2, 10, 1)
    assert placement.expert_map(3).tolist()[0] == [-1, -1, -1, 0, -1, -1, -1, 1, -1, -1]
    load = torch.arange(1.0, 11.0).expand(2, -1)
    slot = placement.slot_load(load)
    assert slot[:, [8, 11]].eq(0).all()
    assert placement.gpu_load(load)[0].tolist() == [1 + 5 + 9, 2 + 6 + 10, 3 + 7, 4 + 8]
    check_invariants(placement)


# Plain data and equality ---------------------------------------------------------------------


def test_dict_round_trip_through_json(small):
    placement = Placement(small.phy2log, 4, 3, algorithm="deepseek")
    data = json.loads(json.dumps(placement.to_dict()))
    assert data["num_layers"] == 2 and data["num_slots"] == 6
    back = Placement.from_dict(data)
    assert back == placement
    assert back.algorithm == "deepseek"
    assert back.num_nodes == 1


def test_from_dict_defaults():
    back = Placement.from_dict({"phy2log": PHY2LOG, "num_experts": 4, "num_gpus": 3})
    assert (back.num_nodes, back.algorithm) == (1, "")


@pytest.mark.parametrize("key", ["phy2log", "num_experts", "num_gpus"])
def test_from_dict_missing_key(small, key):
    data = small.to_dict()
    del data[key]
    with pytest.raises(EplbError, match=f"lacks the key '{key}'; write it with Placement.to_dict"):
        Placement.from_dict(data)


@pytest.mark.parametrize(("key", "value"), [("num_layers", 3), ("num_slots", 12)])
def test_from_dict_size_mismatch(small, key, value):
    data = {**small.to_dict(), key: value}
    with pytest.raises(EplbError, match=f"says {key}={value} but phy2log gives .*; fix the file"):
        Placement.from_dict(data)


@pytest.mark.parametrize(
    "change",
    [{"phy2log": [[0, 1, 2, 3, 0, 1], [0, 1]]}, {"num_experts": "four"}, {"num_gpus": None}],
    ids=["ragged", "text-size", "none-size"],
)
def test_from_dict_malformed(small, change):
    with pytest.raises(EplbError, match="malformed.*write it with Placement.to_dict"):
        Placement.from_dict({**small.to_dict(), **change})


def test_from_dict_rejects_float_ids(small):
    data = {**small.to_dict(), "phy2log": [[0.5, 1, 2, 3, 0, 1]] * 2}
    with pytest.raises(EplbError, match="integer expert ids"):
        Placement.from_dict(data)


def test_from_dict_not_a_dict():
    with pytest.raises(EplbError, match="is a list, not a dict"):
        Placement.from_dict([[0, 1]])  # type: ignore[arg-type]


def test_from_dict_validates(small):
    data = {**small.to_dict(), "num_gpus": 4}
    with pytest.raises(EplbError, match="cannot be split evenly over 4 GPUs"):
        Placement.from_dict(data)


def test_equality(small):
    same = Placement(torch.tensor(PHY2LOG), num_experts=4, num_gpus=3, algorithm="other")
    assert small == same  # the algorithm is metadata
    assert small != Placement(torch.tensor(PHY2LOG), num_experts=4, num_gpus=1)
    assert small != Placement(torch.tensor(PHY2LOG), num_experts=4, num_gpus=3, num_nodes=3)
    assert small != Placement(torch.tensor([row + [0, 1, 2] for row in PHY2LOG]), num_experts=4, num_gpus=3)
    swapped = torch.tensor(PHY2LOG)[:, [1, 0, 2, 3, 4, 5]]
    assert small != Placement(swapped, num_experts=4, num_gpus=3)
    assert small != "placement"
    with pytest.raises(TypeError):
        hash(small)


def test_repr(small):
    assert repr(small) == "Placement(layers=2, experts=4, slots=6, gpus=3, nodes=1, algorithm='')"


# Properties over random placements -----------------------------------------------------------


@st.composite
def placements(draw) -> Placement:
    """A random valid placement: every expert >= 1 replica, optional empty slots, any G, N, P."""
    num_layers = draw(st.integers(1, 3))
    num_experts = draw(st.integers(1, 12))
    num_gpus = draw(st.integers(1, 6))
    num_nodes = draw(st.sampled_from([n for n in range(1, num_gpus + 1) if num_gpus % n == 0]))
    per_gpu = draw(st.integers(-(-num_experts // num_gpus), -(-num_experts // num_gpus) + 3))
    num_slots = per_gpu * num_gpus
    rows = []
    for _ in range(num_layers):
        extra = draw(st.lists(st.integers(EMPTY_SLOT, num_experts - 1), min_size=num_slots - num_experts,
                              max_size=num_slots - num_experts))
        rows.append(draw(st.permutations(list(range(num_experts)) + extra)))
    return Placement(torch.tensor(rows), num_experts=num_experts, num_gpus=num_gpus, num_nodes=num_nodes)


@settings(max_examples=80, deadline=None)
@given(placements())
def test_property_maps_agree_with_phy2log(placement):
    check_invariants(placement)


@settings(max_examples=60, deadline=None)
@given(placements(), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_property_loads_split_evenly_and_sum(placement, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    load = torch.rand(steps, placement.num_layers, placement.num_experts, generator=gen, dtype=torch.float64)
    slot = placement.slot_load(load)
    # Every replica of an expert carries the same share; shares add up to the expert's load.
    held = placement.phy2log.clamp(min=0).expand_as(slot)
    logcnt = placement.logcnt.expand_as(load)
    share = torch.where(placement.phy2log >= 0, load.gather(-1, held) / logcnt.gather(-1, held), 0.0)
    torch.testing.assert_close(slot, share)
    torch.testing.assert_close(slot.sum(-1), load.sum(-1))
    gpu = placement.gpu_load(load)
    assert gpu.shape == (steps, placement.num_layers, placement.num_gpus)
    torch.testing.assert_close(gpu.sum(-1), load.sum(-1))


@settings(max_examples=50, deadline=None)
@given(placements())
def test_property_dict_round_trip(placement):
    back = Placement.from_dict(json.loads(json.dumps(placement.to_dict())))
    assert back == placement
    assert torch.equal(back.log2phy, placement.log2phy)
