import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb
from eplb import planning
from eplb.cluster import Cluster
from eplb.errors import EplbError
from eplb.metrics import evaluate
from eplb.placement import EMPTY_SLOT, Placement
from eplb.planning.planner import auto_score


def accepts(name: str, spec: Cluster, num_experts: int) -> bool:
    """Whether algorithm ``name`` serves this spec (its own check; the common checks are assumed to pass)."""
    if name == "auto":
        return True
    try:
        planning.get(name).check(spec, num_experts)
    except EplbError:
        return False
    return True


def plan_spec(spec: Cluster, load, algorithm: str) -> Placement:
    return eplb.plan(load, num_gpus=spec.num_gpus, num_slots=spec.num_slots, num_nodes=spec.num_nodes,
                     num_groups=spec.num_groups, algorithm=algorithm)


def check_plan(placement: Placement, spec: Cluster, num_layers: int, num_experts: int, algorithm: str) -> None:
    assert isinstance(placement, Placement)
    assert placement.phy2log.shape == (num_layers, spec.num_slots)
    assert (placement.num_experts, placement.num_gpus, placement.num_nodes) == (
        num_experts, spec.num_gpus, spec.num_nodes
    )
    assert bool((placement.logcnt >= 1).all())
    empty = (placement.phy2log == EMPTY_SLOT).sum(1)
    # Only the static round_robin layout leaves slots empty (to spread a remainder).
    if placement.algorithm != "round_robin":
        assert int(empty.sum()) == 0
    assert torch.equal(placement.logcnt.sum(1), spec.num_slots - empty)
    if algorithm == "auto":
        assert placement.algorithm in planning.AUTO_ORDER
    else:
        assert placement.algorithm == algorithm


# Common checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"num_gpus": 3, "num_slots": 10}, "10 slots cannot be split evenly over 3 GPUs; use a multiple of 3, e.g. 12"),
        ({"num_gpus": 4, "num_slots": 6}, "6 slots cannot be split evenly over 4 GPUs; use a multiple of 4, e.g. 8"),
        ({"num_gpus": 2, "num_slots": 6}, "6 slots cannot hold 8 experts; use at least 8 slots"),
        ({"num_gpus": 4, "num_slots": 8, "num_nodes": 3},
         "4 GPUs cannot be split evenly over 3 nodes; use a GPU count"),
        ({"num_gpus": 2, "num_slots": 8, "num_groups": 3}, "8 experts cannot be split into 3 equal groups; pass"),
    ],
)
def test_spec_errors(make_load, sizes, message):
    with pytest.raises(EplbError, match=message):
        eplb.plan(make_load(2, 8), **sizes)


@pytest.mark.parametrize("name", ["num_gpus", "num_slots", "num_nodes"])
@pytest.mark.parametrize("value", [0, -2, 2.0, True, "4", None])
def test_non_positive_or_non_integer_sizes(make_load, name, value):
    sizes = {"num_gpus": 2, "num_slots": 8, "num_nodes": 1, name: value}
    with pytest.raises(EplbError, match=f"{name} must be a positive integer, got {value!r}"):
        eplb.plan(make_load(2, 8), **sizes)


@pytest.mark.parametrize("groups", [0, -1, 2.0, "8", True])
def test_bad_group_count(make_load, groups):
    with pytest.raises(EplbError, match=f"num_groups must be a positive integer or None, got {groups!r}"):
        eplb.plan(make_load(2, 8), num_gpus=2, num_slots=8, num_groups=groups)


def test_bad_load_is_rejected_before_planning():
    with pytest.raises(EplbError, match="negative"):
        eplb.plan(torch.tensor([[1.0, -1.0]]), num_gpus=1, num_slots=2)
    with pytest.raises(EplbError, match="dimensions"):
        eplb.plan(torch.ones(4), num_gpus=1, num_slots=4)


def test_unknown_algorithm_lists_the_valid_names(make_load):
    with pytest.raises(EplbError, match="unknown algorithm 'greedy'; choose one of: ") as info:
        eplb.plan(make_load(2, 8), num_gpus=2, num_slots=8, algorithm="greedy")
    listed = str(info.value).split("choose one of: ")[1].split(", ")
    assert listed == planning.names()
    assert "auto" in listed and "linear" in listed and "round_robin" in listed


def test_every_name_is_registered():
    assert planning.names()[0] == "auto"
    for name in planning.names()[1:]:
        assert planning.get(name).name == name
    for name in planning.AUTO_ORDER:
        assert name in planning.ALGORITHMS


# Group-aware (hierarchical) policies --------------------------------------------------------


def group_aware() -> list[str]:
    """The algorithms that need the router's group count: they reject a spec without one."""
    spec = Cluster(num_gpus=4, num_slots=16, num_nodes=2, num_groups=None)
    return [name for name in planning.ALGORITHMS if not accepts(name, spec, 16)]


def test_there_is_a_group_aware_policy():
    assert "deepseek_hierarchical" in group_aware()


@pytest.mark.parametrize("name", group_aware())
def test_hierarchical_needs_groups(make_load, name):
    with pytest.raises(EplbError, match="needs the router's expert-group count; pass num_groups"):
        eplb.plan(make_load(2, 16), num_gpus=4, num_slots=16, num_nodes=2, algorithm=name)


@pytest.mark.parametrize("name", group_aware())
def test_hierarchical_groups_must_split_over_nodes(make_load, name):
    with pytest.raises(EplbError, match="3 expert groups cannot be split evenly over 2 nodes"):
        eplb.plan(make_load(2, 12), num_gpus=4, num_slots=16, num_nodes=2, num_groups=3, algorithm=name)


def test_auto_skips_group_aware_policies_without_groups(make_load):
    placement = eplb.plan(make_load(2, 16), num_gpus=4, num_slots=20, num_nodes=2)
    assert placement.algorithm not in group_aware()


# Layers and dense layers ---------------------------------------------------------------------


@pytest.mark.parametrize("name", planning.names())
def test_dense_layers_are_planned_for_uniform_load(make_load, name):
    spec = Cluster(num_gpus=4, num_slots=16 if name == "round_robin" else 24, num_nodes=2, num_groups=4)
    load = make_load(4, 16, dense=(0, 2))
    if not accepts(name, spec, 16):
        pytest.skip(f"{name} does not serve {spec}")
    placement = plan_spec(spec, load, name)
    check_plan(placement, spec, 4, 16, name)
    # Redundant slots of a dense layer are spread over the experts, not piled on expert 0.
    counts = placement.logcnt[[0, 2]]
    assert int(counts.max() - counts.min()) <= 1


@pytest.mark.parametrize("name", planning.names())
def test_all_dense_load(name):
    spec = Cluster(num_gpus=2, num_slots=8 if name == "round_robin" else 12, num_groups=2)
    if not accepts(name, spec, 8):
        pytest.skip(f"{name} does not serve {spec}")
    placement = plan_spec(spec, torch.zeros(3, 8), name)
    check_plan(placement, spec, 3, 8, name)
    assert int(placement.logcnt.max() - placement.logcnt.min()) <= 1
    # Uniform load: every GPU gets the same number of replicas' worth of load.
    gpu = placement.gpu_load(torch.ones(3, 8))
    assert torch.allclose(gpu, gpu[:, :1].expand_as(gpu))


def test_one_row_per_layer_of_a_history(make_load):
    history = make_load(5, 8, steps=3, dense=(1,))
    placement = eplb.plan(history, num_gpus=2, num_slots=12)
    assert placement.phy2log.shape == (5, 12)


@pytest.mark.parametrize("convert", [np.asarray, lambda t: t.tolist(), lambda t: t.to(torch.int32)],
                         ids=["numpy", "list", "int32"])
def test_load_types(make_load, convert):
    load = make_load(3, 8)
    placement = eplb.plan(convert(load), num_gpus=2, num_slots=12, algorithm="deepseek")
    assert placement == eplb.plan(load, num_gpus=2, num_slots=12, algorithm="deepseek")


# auto ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        Cluster(num_gpus=4, num_slots=20, num_nodes=2, num_groups=4),
        Cluster(num_gpus=8, num_slots=40, num_nodes=2, num_groups=8),
        Cluster(num_gpus=4, num_slots=32, num_nodes=1, num_groups=None),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_auto_picks_the_best_measured_candidate(make_load, spec, seed):
    load = make_load(4, 16, steps=2, seed=seed)
    scores = {}
    for name in planning.AUTO_ORDER:
        if accepts(name, spec, 16):
            candidate = plan_spec(spec, load, name)
            scores[name] = (_per_step_max_over_mean(candidate, load), candidate)
    best = min(scores, key=lambda n: scores[n][0])  # min keeps the first of equal scores: the tie rule
    auto = plan_spec(spec, load, "auto")
    assert auto.algorithm == best
    assert auto == scores[best][1]
    assert auto_score(auto, load) == pytest.approx(min(s for s, _ in scores.values()), rel=1e-12)


def _per_step_max_over_mean(placement, history):
    # A loop over steps and layers: the criterion auto documents, written out plainly.
    ratios = []
    for step in history:
        gpu = placement.gpu_load(step)
        for row in gpu:
            if row.max() > 0:
                ratios.append(float(row.max() / row.mean()))
    return sum(ratios) / len(ratios)


def test_auto_ties_go_to_the_earlier_candidate():
    # A uniform load that every candidate balances perfectly: all scores tie at 1.
    spec = Cluster(num_gpus=4, num_slots=16, num_nodes=2, num_groups=4)
    load = torch.ones(2, 16)
    candidates = [name for name in planning.AUTO_ORDER if accepts(name, spec, 16)]
    assert len(candidates) >= 2
    for name in candidates:
        assert evaluate(plan_spec(spec, load, name), load).summary()["max_over_mean"] == 1.0
    assert plan_spec(spec, load, "auto").algorithm == candidates[0]


# Static layouts (vLLM semantics) --------------------------------------------------------------


def test_linear_layout(make_load):
    placement = eplb.plan(make_load(2, 6), num_gpus=4, num_slots=8, algorithm="linear")
    # Experts in contiguous blocks, then the redundant slots repeat experts 0, 1.
    assert placement.phy2log.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1]] * 2
    assert [placement.local_experts(r)[0].tolist() for r in range(4)] == [[0, 1], [2, 3], [4, 5], [0, 1]]


def test_linear_ignores_the_load(make_load):
    a = eplb.plan(make_load(2, 8, seed=0), num_gpus=2, num_slots=12, algorithm="linear")
    b = eplb.plan(make_load(2, 8, seed=1), num_gpus=2, num_slots=12, algorithm="linear")
    assert a == b


@pytest.mark.parametrize(("num_experts", "num_gpus"), [(8, 4), (10, 4), (7, 3), (5, 5), (3, 4), (256, 32)])
def test_round_robin_layout(num_experts, num_gpus):
    per_gpu = -(-num_experts // num_gpus)
    placement = eplb.plan(torch.ones(2, num_experts), num_gpus=num_gpus, num_slots=per_gpu * num_gpus,
                          algorithm="round_robin")
    for rank in range(num_gpus):
        local = placement.local_experts(rank)[0].tolist()
        held = [e for e in local if e != EMPTY_SLOT]
        # Rank r holds r, r + G, r + 2G, ...; the first E % G ranks hold one expert more.
        assert held == list(range(rank, num_experts, num_gpus))
        assert local == held + [EMPTY_SLOT] * (per_gpu - len(held))
        emap = placement.expert_map(rank)[1]
        assert [e for e in range(num_experts) if emap[e] >= 0] == held
        assert [int(emap[e]) for e in held] == list(range(len(held)))
    assert placement.logcnt.eq(1).all()


@pytest.mark.parametrize(("num_experts", "num_slots", "needed"), [(8, 12, 8), (10, 16, 12), (8, 16, 8)])
def test_round_robin_rejects_redundant_slots(num_experts, num_slots, needed):
    with pytest.raises(EplbError, match=f"round_robin places each expert exactly once, so it needs {needed} slots"
                                        ".*or a load-based algorithm"):
        eplb.plan(torch.ones(1, num_experts), num_gpus=4, num_slots=num_slots, algorithm="round_robin")


def test_auto_never_picks_a_static_layout():
    assert not set(planning.AUTO_ORDER) & {"linear", "round_robin"}


# Properties over random specs and loads --------------------------------------------------------


@st.composite
def plan_cases(draw):
    num_experts = draw(st.integers(1, 16))
    num_gpus = draw(st.integers(1, 6))
    num_nodes = draw(st.sampled_from([n for n in range(1, num_gpus + 1) if num_gpus % n == 0]))
    per_gpu = draw(st.integers(-(-num_experts // num_gpus), -(-num_experts // num_gpus) + 3))
    groups = draw(st.sampled_from([None] + [g for g in range(1, num_experts + 1) if num_experts % g == 0]))
    spec = Cluster(num_gpus=num_gpus, num_slots=per_gpu * num_gpus, num_nodes=num_nodes, num_groups=groups)
    num_layers = draw(st.integers(1, 3))
    steps = draw(st.sampled_from([None, 2]))
    dense = tuple(draw(st.sets(st.integers(0, num_layers - 1), max_size=1)))
    return spec, num_layers, num_experts, steps, dense, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=50, deadline=None)
@given(plan_cases())
def test_property_every_algorithm_gives_a_valid_placement(make_load, case):
    spec, num_layers, num_experts, steps, dense, seed = case
    load = make_load(num_layers, num_experts, steps=steps, seed=seed, dense=dense)
    for name in planning.names():
        if not accepts(name, spec, num_experts):
            continue
        placement = plan_spec(spec, load, name)
        check_plan(placement, spec, num_layers, num_experts, name)
        assert plan_spec(spec, load.clone(), name) == placement, f"{name} is not deterministic"


# Real data -----------------------------------------------------------------------------------


def test_real_deepseek_v3_load(real_data):
    path = real_data / "sglang-dsv3-ep-stats" / "prefill_in1024.json"
    load = torch.tensor(json.loads(path.read_text())["logical_count"], dtype=torch.float64)
    spec = Cluster(num_gpus=32, num_slots=288, num_nodes=4, num_groups=8)
    placement = plan_spec(spec, load, "auto")
    check_plan(placement, spec, 61, 256, "auto")
    report = evaluate(placement, load)
    assert report.loaded.tolist() == [False] * 3 + [True] * 58
    linear = evaluate(plan_spec(spec, load, "linear"), load).summary()
    # Replicating hot experts beats the static layout by far on a real, skewed load.
    assert report.summary()["max_over_mean"] < 1.1 < linear["max_over_mean"]
