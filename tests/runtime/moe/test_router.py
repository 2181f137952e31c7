"""The three routers against a direct per-token computation, and the config's checks."""

from __future__ import annotations

import math

import pytest
import torch

from eplb import EplbError
from eplb.runtime.hashing import layer_key, mix32_int
from eplb.runtime.moe import EPMoEConfig, grouped_topk, hash_topk, route, softmax_topk

M, H, E, K = 7, 5, 8, 3


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, H, generator=gen, dtype=torch.float64)
    gate = torch.randn(E, H, generator=gen, dtype=torch.float64)
    bias = torch.randn(E, generator=gen, dtype=torch.float64) * 0.3
    return x, gate, bias


def _logits(x: torch.Tensor, gate: torch.Tensor, m: int) -> list[float]:
    return [sum(float(x[m, h]) * float(gate[e, h]) for h in range(H)) for e in range(E)]


@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_topk_matches_a_direct_computation(normalize: bool) -> None:
    x, gate, _ = _inputs()
    ids, weights = softmax_topk(x, gate, K, normalize)
    assert ids.shape == weights.shape == (M, K) and ids.dtype == torch.int64
    for m in range(M):
        exp = [math.exp(v) for v in _logits(x, gate, m)]
        probs = [v / sum(exp) for v in exp]
        best = sorted(range(E), key=lambda e: -probs[e])[:K]
        want = [probs[e] for e in best]
        if normalize:
            want = [w / sum(want) for w in want]
        assert ids[m].tolist() == best
        assert torch.allclose(weights[m], torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize(("groups", "topk_groups"), [(4, 2), (8, 3), (2, 1)])
def test_grouped_topk_matches_a_direct_computation(groups: int, topk_groups: int) -> None:
    x, gate, bias = _inputs(1)
    ids, weights = grouped_topk(x, gate, bias, K if groups != 2 else 2, groups, topk_groups)
    k = ids.shape[1]
    size = E // groups
    for m in range(M):
        scores = [1 / (1 + math.exp(-v)) for v in _logits(x, gate, m)]
        biased = [s + float(b) for s, b in zip(scores, bias, strict=True)]
        group_score = []
        for g in range(groups):
            members = sorted((biased[e] for e in range(g * size, (g + 1) * size)), reverse=True)
            group_score.append(sum(members[:2]))
        kept = sorted(range(groups), key=lambda g: -group_score[g])[:topk_groups]
        candidates = [e for e in range(E) if e // size in kept]
        best = sorted(candidates, key=lambda e: -biased[e])[:k]
        want = [scores[e] / sum(scores[c] for c in best) for e in best]
        assert ids[m].tolist() == best, f"token {m}"
        assert torch.allclose(weights[m], torch.tensor(want, dtype=torch.float64))


def test_grouped_topk_weights_ignore_the_bias() -> None:
    x, gate, bias = _inputs(2)
    ids, weights = grouped_topk(x, gate, bias, K, 4, 2, normalize=False)
    assert torch.allclose(weights, torch.sigmoid(x @ gate.T).gather(1, ids))
    # A large bias on one expert forces it into every token's choice.
    forced = bias.clone()
    forced[5] = 100.0
    assert (grouped_topk(x, gate, forced, K, 4, 2)[0] == 5).any(1).all()


def test_hash_topk_matches_a_direct_computation() -> None:
    token_ids = torch.tensor([3, 17, 3, 0, 99999, 17])
    key = layer_key(7, 2)
    ids, weights = hash_topk(token_ids, E, K, key)
    for m, t in enumerate(token_ids.tolist()):
        token = mix32_int(t ^ key)
        values = [mix32_int(token ^ e) for e in range(E)]
        assert ids[m].tolist() == sorted(range(E), key=lambda e: -values[e])[:K]
    assert torch.equal(ids[0], ids[2]) and torch.equal(ids[1], ids[5])
    assert torch.equal(weights, torch.full((6, K), 1 / K))
    assert not torch.equal(hash_topk(token_ids, E, K, layer_key(7, 3))[0], ids)


def test_route_picks_the_configured_router() -> None:
    x, gate, bias = _inputs(3)
    params = {"gate": gate, "bias": bias}
    soft = EPMoEConfig(hidden=H, intermediate=4, num_experts=E, top_k=K)
    assert torch.equal(route(x, params, soft)[0], softmax_topk(x, gate, K)[0])
    grouped = EPMoEConfig(hidden=H, intermediate=4, num_experts=E, top_k=K, router="grouped", num_groups=4,
                          topk_groups=2)
    assert torch.equal(route(x, params, grouped)[0], grouped_topk(x, gate, bias, K, 4, 2)[0])
    hashed = EPMoEConfig(hidden=H, intermediate=4, num_experts=E, top_k=K, router="hash", seed=5)
    token_ids = torch.arange(M)
    got = route(x, {}, hashed, layer=1, token_ids=token_ids)
    assert torch.equal(got[0], hash_topk(token_ids, E, K, layer_key(5, 1))[0])
    assert got[1].dtype == torch.float64  # the routing dtype of x
    with pytest.raises(EplbError, match="token_ids"):
        route(x, {}, hashed)
    with pytest.raises(EplbError, match="bias"):
        route(x, {"gate": gate}, grouped)
    with pytest.raises(EplbError, match=r"\[tokens, 5\]"):
        route(x[:, :4], params, soft)


def test_routing_runs_in_float32_for_low_precision_inputs() -> None:
    x, gate, _ = _inputs(4)
    ids, weights = softmax_topk(x.bfloat16(), gate.bfloat16(), K)
    assert weights.dtype == torch.float32 and ids.shape == (M, K)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"router": "top1"}, "router must be one of"),
        ({"dispatch": "random"}, "dispatch must be one of"),
        ({"top_k": 9}, "top_k"),
        ({"router": "grouped", "num_groups": 3}, "does not divide"),
        ({"router": "grouped", "num_groups": 4, "topk_groups": 1}, "raise topk_groups"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
        ({"waterfill": True}, "shared_expert"),
        ({"dtype": torch.int32}, "dtype"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(EplbError, match=match):
        EPMoEConfig(**{"hidden": H, "intermediate": 4, "num_experts": E, "top_k": K, **kwargs})
