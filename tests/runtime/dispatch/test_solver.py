import json
from pathlib import Path

import pytest
import torch

import eplb
from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.runtime.dispatch import WeightedDispatch, solve_weights, split_gpu_load

REAL = Path(__file__).resolve().parents[2] / "../shared/eplb_real_data/sglang-dsv3-ep-stats"


def lp_optimum(placement: Placement, load: torch.Tensor) -> list[float]:
    """The min max GPU load per layer by scipy's HiGHS LP (variables: one fraction per replica, T)."""
    linprog = pytest.importorskip("scipy.optimize").linprog
    import numpy as np

    out = []
    log2phy = placement.log2phy
    for layer in range(placement.num_layers):
        replicas = (log2phy[layer] >= 0).nonzero().tolist()  # [(expert, x)]
        n = len(replicas)
        a_ub = np.zeros((placement.num_gpus, n + 1))
        a_ub[:, -1] = -1.0
        a_eq = np.zeros((placement.num_experts, n + 1))
        for i, (e, x) in enumerate(replicas):
            a_ub[int(log2phy[layer, e, x]) // placement.slots_per_gpu, i] += float(load[layer, e])
            a_eq[e, i] = 1.0
        cost = np.zeros(n + 1)
        cost[-1] = 1.0
        res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(placement.num_gpus), A_eq=a_eq,
                      b_eq=np.ones(placement.num_experts), bounds=(0, None), method="highs")
        assert res.status == 0
        out.append(res.fun)
    return out


def _random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    experts = int(torch.randint(3, 14, (1,), generator=g))
    gpus = int(torch.randint(2, 6, (1,), generator=g))
    slots = gpus * (-(-experts // gpus) + int(torch.randint(0, 3, (1,), generator=g)))
    rows = []
    for _ in range(2):
        row = torch.cat([torch.arange(experts), torch.randint(0, experts, (slots - experts,), generator=g)])
        rows.append(row[torch.randperm(slots, generator=g)])
    placement = Placement(torch.stack(rows), num_experts=experts, num_gpus=gpus)
    load = torch.rand(2, experts, generator=g, dtype=torch.float64) ** 4 * 1000  # skewed
    load[1, 0] = 0.0  # an expert without load
    return placement, load


@pytest.mark.parametrize("seed", range(24))
def test_solver_reaches_the_lp_optimum(seed):
    placement, load = _random_case(seed)
    optimum = torch.tensor(lp_optimum(placement, load), dtype=torch.float64)
    for sweeps in (0, 16):
        probs = solve_weights(placement, load, sweeps=sweeps)
        solved = split_gpu_load(placement, load, probs).amax(1)
        even = placement.gpu_load(load).amax(1)
        assert bool((solved <= even * (1 + 1e-12)).all())
        assert torch.allclose(solved, optimum, rtol=1e-6, atol=0)
        assert torch.allclose(probs.sum(-1), torch.ones(()).double())
        assert bool((probs >= 0).all()) and bool((probs[placement.log2phy < 0] == 0).all())


def test_unloaded_experts_and_layers_get_the_even_split(placement):
    load = torch.zeros(placement.num_layers, placement.num_experts)
    load[0, 1] = 5.0
    probs = solve_weights(placement, load)
    even = (placement.log2phy >= 0) / placement.logcnt.unsqueeze(-1)
    assert torch.allclose(probs[1], even[1].double())
    assert torch.allclose(probs[0, 2:], even[0, 2:].double())


def test_solved_weights_drive_the_dispatch(placement):
    load = torch.rand(placement.num_layers, placement.num_experts, dtype=torch.float64) * 100
    dispatch = WeightedDispatch.from_load(placement, load, sweeps=4)
    ids = torch.arange(placement.num_experts).repeat(1000)
    out = dispatch.remap(0, ids)
    assert torch.equal(placement.phy2log[0][out], ids)


def test_bad_input_raises_eplb_error(placement):
    with pytest.raises(EplbError, match="shape"):
        solve_weights(placement, torch.ones(placement.num_layers, placement.num_experts + 1))
    with pytest.raises(EplbError, match="negative"):
        solve_weights(placement, -torch.ones(placement.num_layers, placement.num_experts))
    with pytest.raises(EplbError, match="sweeps"):
        solve_weights(placement, torch.ones(placement.num_layers, placement.num_experts), sweeps=-1)


@pytest.mark.skipif(not REAL.is_dir(), reason="real DeepSeek-V3 statistics not present")
def test_real_deepseek_loads_reach_the_lp_optimum():
    def read(name):
        return torch.tensor(json.loads((REAL / name).read_text())["logical_count"], dtype=torch.float64)[3:]

    fit, recent = read("prefill_in4096.json"), read("prefill_in1024.json")
    placement = eplb.plan(fit, num_gpus=32, num_slots=288, num_nodes=4, algorithm="deepseek")
    probs = solve_weights(placement, recent)
    solved = split_gpu_load(placement, recent, probs).amax(1)
    assert bool((solved <= placement.gpu_load(recent).amax(1) * (1 + 1e-12)).all())
    layers = [0, 17, 40]
    sub = Placement(placement.phy2log[layers], placement.num_experts, placement.num_gpus, placement.num_nodes)
    optimum = torch.tensor(lp_optimum(sub, recent[layers]), dtype=torch.float64)
    assert torch.allclose(solved[layers], optimum, rtol=1e-6, atol=0)
