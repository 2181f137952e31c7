"""``EPMoE`` over a real gloo group (spawned CPU processes) equals ``dense_moe``, for every placement,
dispatch policy and router, with and without waterfill, before and after a placement change.

One spawn per group size runs every case, to pay the process start-up once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eplb
from eplb import EplbError, ExpertLoadRecorder, Placement, WaterfillConfig
from eplb.runtime.moe import EPMoE, EPMoEConfig, dense_moe, local_slot_weights, random_checkpoint, route

E, K, LAYERS, LAYER, SLOTS = 8, 2, 2, 1, 12
# Tokens per rank: uneven, and one rank with none (it must still join every exchange).
TOKENS = {2: (13, 0), 4: (9, 0, 21, 4)}
PLACEMENTS = ("linear", "eplb", "random")
DISPATCHES = ("static", "hash", "weighted")
ROUTERS = ("softmax", "grouped", "hash")
# min_batch=0: waterfill balances even these tiny batches, so shared experts do move.
WATERFILLS = (
    WaterfillConfig(min_batch=0, backend="torch"),
    WaterfillConfig(mode="dynamic", candidates="all", min_batch=0, backend="torch"),
)


@dataclass(frozen=True)
class Case:
    placement: str
    next_placement: str
    dispatch: str
    router: str
    waterfill: WaterfillConfig | None
    seed: int

    @property
    def name(self) -> str:
        wf = "none" if self.waterfill is None else self.waterfill.mode
        return f"{self.placement}->{self.next_placement}/{self.dispatch}/{self.router}/waterfill={wf}"

    def config(self) -> EPMoEConfig:
        return EPMoEConfig(hidden=16, intermediate=8, num_experts=E, top_k=K, router=self.router, num_groups=4,
                           topk_groups=2, routed_scaling_factor=2.5, shared_expert=True, shared_intermediate=12,
                           dispatch=self.dispatch, waterfill=self.waterfill is not None, dtype=torch.float64,
                           seed=self.seed)


def all_cases() -> list[Case]:
    cases = []
    for p, placement in enumerate(PLACEMENTS):
        for dispatch in DISPATCHES:
            for waterfill in (None, *WATERFILLS):
                seed = len(cases)
                cases.append(Case(placement, PLACEMENTS[(p + 1) % 3], dispatch, ROUTERS[seed % 3], waterfill, seed))
    return cases


def step_tokens(world: int, step: int) -> list[int]:
    """Tokens per rank in a step: the second step has other sizes, and the empty rank stays empty."""
    return [t + step if t else 0 for t in TOKENS[world]]


def skewed_load(seed: int) -> torch.Tensor:
    """``[T, L, E]`` recorded loads, equal on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return torch.round(1000 * torch.rand(3, LAYERS, E, generator=gen, dtype=torch.float64) ** 3) + 1


def random_placement(world: int, seed: int) -> Placement:
    """Random phy2log: every expert at least once, the other slots random experts, one slot empty."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(LAYERS):
        fill = torch.cat([torch.arange(E), torch.randint(0, E, (SLOTS - E - 1,), generator=gen), torch.tensor([-1])])
        rows.append(fill[torch.randperm(SLOTS, generator=gen)])
    return Placement(torch.stack(rows), num_experts=E, num_gpus=world)


def make_placement(kind: str, world: int, load: torch.Tensor, seed: int) -> Placement:
    if kind == "random":
        return random_placement(world, seed)
    return eplb.plan(load, num_gpus=world, num_slots=SLOTS, algorithm=kind)


def run_case(case: Case, rank: int, world: int) -> dict:
    """Two steps of the layer (the second after a placement change), each checked against dense_moe."""
    config = case.config()
    router, experts, shared = random_checkpoint(config, seed=case.seed)
    load = skewed_load(case.seed)
    placement = make_placement(case.placement, world, load, case.seed)
    recorder = ExpertLoadRecorder(LAYERS, SLOTS, window=4, device="cpu")
    layer = EPMoE(config, placement, LAYER, local_slot_weights(experts, placement, rank, LAYER), router, shared,
                  load=load, recorder=recorder, waterfill_config=case.waterfill)
    shared_done = []
    for step in range(2):
        if step == 1:
            new_load = skewed_load(case.seed + 100)
            new = make_placement(case.next_placement, world, new_load, case.seed + 100)
            layer.set_placement(new, new_load, weights=local_slot_weights(experts, new, rank, LAYER))
            placement = new
        gen = torch.Generator().manual_seed(1000 * case.seed + 10 * step + rank)
        m = step_tokens(world, step)[rank]
        x = torch.randn(m, config.hidden, generator=gen, dtype=torch.float64)
        token_ids = torch.randint(0, 1000, (m,), generator=gen)
        got = layer(x, token_ids)
        want = dense_moe(x, router, experts, shared, config, layer=LAYER, token_ids=token_ids)
        where = f"{case.name} step {step}"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda s, where=where: f"{where}: {s}")
        recorder.step()
        ids = route(x, router, config, layer=LAYER, token_ids=token_ids)[0]
        recorded = recorder.logical_loads(placement)[-1, LAYER]
        assert torch.equal(recorded.long(), torch.bincount(ids.reshape(-1), minlength=E)), case.name
        recorder.reset()
        shared_done.append(int(layer.last_slot_tokens[-1]) if config.waterfill else m)
    return {"name": case.name, "tokens": [int(t) for t in layer.last_slot_tokens.tolist()], "shared": shared_done}


def check_errors(rank: int, world: int) -> None:
    config = all_cases()[0].config()
    router, experts, shared = random_checkpoint(config)
    placement = eplb.plan(skewed_load(0), num_gpus=world, num_slots=SLOTS, algorithm="linear")
    local = local_slot_weights(experts, placement, rank, LAYER)
    wrong_gpus = eplb.plan(skewed_load(0), num_gpus=2 * world, num_slots=2 * SLOTS, algorithm="linear")
    with pytest.raises(EplbError, match="EP group has"):
        EPMoE(config, wrong_gpus, LAYER, local, router, shared)
    weighted = dataclasses.replace(config, dispatch="weighted")
    with pytest.raises(EplbError, match="pass load"):
        EPMoE(weighted, placement, LAYER, local, router, shared)
    layer = EPMoE(config, placement, LAYER, local, router, shared)
    bigger = eplb.plan(skewed_load(0), num_gpus=world, num_slots=SLOTS + world, algorithm="linear")
    with pytest.raises(EplbError, match="slots per GPU"):
        layer.set_placement(bigger)
    with pytest.raises(EplbError, match="cast x"):
        layer(torch.zeros(2, config.hidden, dtype=torch.float32))
    with pytest.raises(EplbError, match="shared_expert is False"):
        EPMoE(dataclasses.replace(config, shared_expert=False), placement, LAYER, local, router, shared)


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if world == 2:
            check_errors(rank, world)
        results = [run_case(case, rank, world) for case in all_cases()]
        Path(folder, f"{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ep_layer_equals_the_dense_reference(world: int, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(world)]
    moved = False
    for c, case in enumerate(all_cases()):
        per_rank = [results[r][c] for r in range(world)]
        assert all(res["name"] == case.name for res in per_rank)
        if case.waterfill is None:
            continue
        for step in range(2):
            done = [res["shared"][step] for res in per_rank]
            tokens = step_tokens(world, step)
            # Every token's shared expert ran exactly once, somewhere.
            assert sum(done) == sum(tokens), f"{case.name} step {step}: {done} vs {tokens}"
            moved |= done != tokens
    assert moved, "waterfill never moved a shared expert: the test does not exercise the remote shared slot"


def test_ep_layer_needs_a_process_group() -> None:
    config = all_cases()[0].config()
    router, experts, shared = random_checkpoint(config)
    placement = eplb.plan(skewed_load(0), num_gpus=2, num_slots=SLOTS, algorithm="linear")
    with pytest.raises(EplbError, match="init_process_group"):
        EPMoE(config, placement, LAYER, local_slot_weights(experts, placement, 0, LAYER), router, shared)
