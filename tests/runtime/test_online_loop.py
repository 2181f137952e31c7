"""The whole loop on gloo: EPMoE layers serve, record, and the async rebalancer moves their weights one
migration step per forward pass; every step's output equals the dense layer while layers commit one by one."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from eplb import ExpertLoadRecorder, WaterfillConfig, plan
from eplb.planning.online import OnlineConfig
from eplb.runtime.migration import ExpertWeights, MigrationConfig
from eplb.runtime.moe import EPMoE, EPMoEConfig, dense_moe, local_slot_weights, random_checkpoint
from eplb.runtime.rebalancer import Rebalancer, RebalancerConfig
from tests.runtime.migration.harness import spawn

LAYERS, SLOTS, STEPS, TOKENS = 2, 12, 30, 24
CONFIG = EPMoEConfig(hidden=16, intermediate=8, num_experts=8, top_k=2, router="softmax", routed_scaling_factor=2.5,
                     shared_expert=True, shared_intermediate=12, dispatch="hash", waterfill=True,
                     dtype=torch.float64)


def _tokens(gen: torch.Generator, gate: torch.Tensor, hot: int) -> torch.Tensor:
    """Hidden states that the router sends mostly to expert ``hot`` (its gate row, plus noise)."""
    direction = gate[hot] / gate[hot].norm()
    return torch.randn(TOKENS, CONFIG.hidden, generator=gen, dtype=torch.float64) + 6.0 * direction


def _serve(rank: int, world: int, out: dict) -> None:
    checkpoints = [random_checkpoint(CONFIG, seed=10 + layer) for layer in range(LAYERS)]
    start = plan(torch.ones(LAYERS, CONFIG.num_experts), num_gpus=world, num_slots=SLOTS, algorithm="linear")
    local = [local_slot_weights(experts, start, rank, layer) for layer, (_, experts, _) in enumerate(checkpoints)]
    weights = ExpertWeights(local)
    recorder = ExpertLoadRecorder(LAYERS, SLOTS, window=8, device="cpu", backend="torch")
    waterfill = WaterfillConfig(min_batch=0, backend="torch")
    layers = [EPMoE(CONFIG, start, layer, weights.tensors(layer), router, shared, recorder=recorder,
                    waterfill_config=waterfill)
              for layer, (router, _, shared) in enumerate(checkpoints)]
    config = RebalancerConfig(every=6, mode="async", plan_lag=2, history=4,
                              policy=OnlineConfig(window=2, max_moves=4, min_gain=0.02),
                              migration=MigrationConfig(timeout_s=30))
    rb = Rebalancer(recorder, start, weights, config=config,
                    on_commit=lambda layer, placement: layers[layer].set_placement(placement))
    gen = torch.Generator().manual_seed(rank)
    worst = 0.0
    for step in range(STEPS):
        hot = 0 if step < STEPS // 3 else 5
        for layer, (router, experts, shared) in enumerate(checkpoints):
            x = _tokens(gen, router["gate"], hot)
            got = layers[layer](x)
            want = dense_moe(x, router, experts, shared, CONFIG, layer=layer)
            worst = max(worst, float((got - want).abs().max()))
        recorder.step()
        rb.step()
    rb.close()
    if rank == 0:
        out.update(worst=worst, rebalances=len(rb.rebalances), moves=sum(r.report.moves for r in rb.rebalances),
                   errors=[r.error for r in rb.rebalances if r.error], moved=not torch.equal(rb.serving.phy2log,
                                                                                              start.phy2log))


@pytest.mark.slow
def test_outputs_stay_exact_while_layers_commit_one_by_one() -> None:
    with mp.Manager() as manager:
        out = manager.dict()
        spawn(_serve, 2, out)
        result = dict(out)
    assert not result["errors"]
    assert result["rebalances"] >= 1 and result["moves"] >= 1 and result["moved"]
    assert result["worst"] < 1e-9
