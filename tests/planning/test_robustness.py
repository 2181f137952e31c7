"""Regressions of issue 16: sparse layers, extreme floats and the size guard."""

from __future__ import annotations

import pytest
import torch

import eplb
from eplb import planning
from eplb.errors import EplbError
from eplb.runtime.dispatch import WeightedDispatch
from eplb.runtime.dispatch.solver import solve_weights


@pytest.mark.parametrize("algorithm", ["auto", "eplb", "deepseek"])
@pytest.mark.parametrize(("load", "cluster"), [
    ([[0, 5]], dict(num_gpus=2, num_slots=8)),
    ([[1, 1e30]], dict(num_gpus=3, num_slots=12)),
    ([[1, 1e30]], dict(num_gpus=2, num_slots=8, num_nodes=2)),
    ([[0, 0, 7, 0], [1, 0, 0, 0]], dict(num_gpus=4, num_slots=16, num_nodes=2)),
])
def test_sparse_layers_fill_every_slot(load, cluster, algorithm):
    placement = eplb.plan(load, algorithm=algorithm, **cluster)
    assert (placement.logcnt.sum(1) == cluster["num_slots"]).all()
    assert (placement.logcnt >= 1).all()


def test_subnormal_loads_plan_with_auto_and_never_report_a_negative_gap():
    load = torch.full((1, 3), 5e-324, dtype=torch.float64)
    placement = eplb.plan(load, num_gpus=2, num_slots=4)
    assert eplb.evaluate(placement, load).summary()["gap"] >= 0


def test_scaling_a_load_by_a_power_of_two_changes_no_plan(make_load):
    load = make_load(3, 16)
    for name in ("auto", "eplb", "deepseek"):
        plain = eplb.plan(load, num_gpus=4, num_slots=20, algorithm=name).phy2log
        assert torch.equal(eplb.plan(load * 2.0**-1070, num_gpus=4, num_slots=20, algorithm=name).phy2log, plain)
        assert torch.equal(eplb.plan(load * 2.0**900, num_gpus=4, num_slots=20, algorithm=name).phy2log, plain)


def test_auto_plans_layer_totals_above_float32():
    load = [[3e38, 3e38, 1e38, 2.0]]
    assert eplb.plan(load, num_gpus=2, num_slots=4).algorithm in planning.AUTO_ORDER


def test_python_lists_keep_float64():
    # 16777217 is not a float32; a float32 detour would tie it with 16777216.
    load = eplb.loads.as_history([[16777217.0, 16777216.0, 1e39]])
    assert load[0, 0, 0] == 16777217.0 and load[0, 0, 2] == 1e39


@pytest.mark.parametrize(("cluster", "match"), [
    (dict(num_gpus=2, num_slots=9223372036854775808), "size guard of 65536"),
    (dict(num_gpus=2, num_slots=2**70), "size guard of 65536"),
    (dict(num_gpus=32768, num_slots=32768), "size guard of 16384"),
    (dict(num_gpus=2, num_slots=4096), "size guard of 512"),
])
def test_size_guard_refuses_before_allocating(cluster, match):
    with pytest.raises(EplbError, match=match):
        eplb.plan(torch.ones(4, 16), **cluster)


def test_size_guard_on_the_load_shape():
    with pytest.raises(EplbError, match="4097 layers"):
        eplb.plan(torch.ones(4097, 2), num_gpus=1, num_slots=2)


def test_weighted_dispatch_from_subnormal_load():
    load = torch.tensor([[5e-324, 1e-320, 0.0, 1e-315]], dtype=torch.float64)
    placement = eplb.plan(load, num_gpus=2, num_slots=6)
    WeightedDispatch.from_load(placement, load)  # raised "all-zero replica weights" before
    probs = solve_weights(placement, load)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 4, dtype=torch.float64))
