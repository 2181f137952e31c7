"""The dense reference against a per-token loop, and the weight loader."""

from __future__ import annotations

import math

import pytest
import torch

from eplb import EplbError, Placement
from eplb.runtime.moe import EPMoEConfig, dense_moe, local_slot_weights, random_checkpoint, route, swiglu

CONFIG = EPMoEConfig(hidden=6, intermediate=4, num_experts=8, top_k=2, routed_scaling_factor=2.5,
                     shared_expert=True, shared_intermediate=5, dtype=torch.float64)


def _silu(v: float) -> float:
    return v / (1 + math.exp(-v))


def _expert(row: list[float], w13: torch.Tensor, w2: torch.Tensor) -> list[float]:
    inter = w13.shape[0] // 2
    gate = [sum(a * float(b) for a, b in zip(row, w13[j], strict=True)) for j in range(inter)]
    up = [sum(a * float(b) for a, b in zip(row, w13[inter + j], strict=True)) for j in range(inter)]
    act = [_silu(g) * u for g, u in zip(gate, up, strict=True)]
    return [sum(a * float(b) for a, b in zip(act, w2[h], strict=True)) for h in range(w2.shape[0])]


def test_swiglu_matches_its_formula() -> None:
    _, experts, _ = random_checkpoint(CONFIG, seed=1)
    x = torch.randn(3, 6, dtype=torch.float64)
    got = swiglu(x, experts["w13"][2], experts["w2"][2])
    want = [_expert(x[m].tolist(), experts["w13"][2], experts["w2"][2]) for m in range(3)]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("with_shared", [True, False])
def test_dense_moe_matches_a_per_token_loop(with_shared: bool) -> None:
    config = CONFIG if with_shared else EPMoEConfig(hidden=6, intermediate=4, num_experts=8, top_k=2,
                                                    routed_scaling_factor=2.5, dtype=torch.float64)
    router, experts, shared = random_checkpoint(config, seed=2)
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ids, weights = route(x, router, config)
    got = dense_moe(x, router, experts, shared, config)
    for m in range(9):
        want = [0.0] * 6
        for k in range(2):
            e = int(ids[m, k])
            out = _expert(x[m].tolist(), experts["w13"][e], experts["w2"][e])
            want = [w + 2.5 * float(weights[m, k]) * o for w, o in zip(want, out, strict=True)]
        if with_shared:
            want = [w + s for w, s in zip(want, _expert(x[m].tolist(), shared["w13"], shared["w2"]), strict=True)]
        assert torch.allclose(got[m], torch.tensor(want, dtype=torch.float64)), f"token {m}"
    assert dense_moe(x[:0], router, experts, shared, config).shape == (0, 6)


def test_dense_moe_checks_the_weights() -> None:
    router, experts, shared = random_checkpoint(CONFIG)
    x = torch.zeros(2, 6, dtype=torch.float64)
    with pytest.raises(EplbError, match=r"experts\['w2'\]"):
        dense_moe(x, router, {"w13": experts["w13"], "w2": experts["w2"][:, :, :3]}, shared, CONFIG)
    with pytest.raises(EplbError, match="shared"):
        dense_moe(x, router, experts, None, CONFIG)


def test_random_checkpoint_shapes_and_dtype() -> None:
    config = EPMoEConfig(hidden=6, intermediate=4, num_experts=8, top_k=2, shared_expert=True,
                         shared_intermediate=5, dtype=torch.bfloat16)
    router, experts, shared = random_checkpoint(config)
    assert router["gate"].shape == (8, 6) and router["bias"].shape == (8,)
    assert experts["w13"].shape == (8, 8, 6) and experts["w2"].shape == (8, 6, 4)
    assert shared["w13"].shape == (10, 6) and shared["w2"].shape == (6, 5)
    assert all(t.dtype == torch.bfloat16 for t in (*router.values(), *experts.values(), *shared.values()))
    assert torch.equal(random_checkpoint(config, seed=4)[1]["w2"], random_checkpoint(config, seed=4)[1]["w2"])


def test_local_slot_weights_follow_the_placement() -> None:
    placement = Placement(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [7, 0, 6, 5, 4, 3, 2, 1]]), num_experts=8, num_gpus=2)
    _, experts, _ = random_checkpoint(CONFIG)
    scales = torch.arange(8.0)  # any named tensor with a leading expert dim travels too
    local = local_slot_weights({**experts, "scale": scales}, placement, rank=1, layer=1)
    for slot, expert in enumerate([4, 3, 2, 1]):
        assert torch.equal(local["w13"][slot], experts["w13"][expert])
        assert torch.equal(local["w2"][slot], experts["w2"][expert])
    assert local["scale"].tolist() == [4.0, 3.0, 2.0, 1.0]

    empty = Placement(torch.tensor([[0, 1, 2, -1, 3, 4, 5, 6, 7, -1]]), num_experts=8, num_gpus=2)
    local = local_slot_weights(experts, empty, rank=1, layer=0)
    assert torch.equal(local["w2"][:4], experts["w2"][4:])
    assert not local["w2"][4].any() and not local["w13"][4].any()


def test_local_slot_weights_checks_its_inputs() -> None:
    placement = Placement(torch.arange(8).view(1, 8), num_experts=8, num_gpus=2)
    _, experts, _ = random_checkpoint(CONFIG)
    with pytest.raises(EplbError, match="leading dim"):
        local_slot_weights({"w2": experts["w2"][:4]}, placement, rank=0, layer=0)
    with pytest.raises(EplbError, match="rank"):
        local_slot_weights(experts, placement, rank=2, layer=0)
    with pytest.raises(EplbError, match="layer"):
        local_slot_weights(experts, placement, rank=0, layer=1)
