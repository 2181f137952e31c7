"""The online loop on gloo: a load shift is recorded, decided on, and the weights follow, with every slot
holding its expert's bytes after every step (so dispatch never points at a slot still being filled)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from eplb import EplbError, Placement, plan
from eplb.planning.online import OnlineConfig
from eplb.runtime.migration import ExpertWeights, MigrationConfig
from eplb.runtime.rebalancer import Rebalancer, RebalancerConfig
from eplb.runtime.recorder import ExpertLoadRecorder
from tests.runtime.migration.harness import canonical, corrupted_slots, make_weights, spawn

LAYERS, EXPERTS, SLOTS, TOKENS, TOPK = 2, 8, 12, 64, 2


def _phase_probs(phase: int) -> torch.Tensor:
    """Phase 0 loads experts 0-1 hardest, phase 1 expert 7 alone: a workload switch that overloads the
    GPU holding the one replica of expert 7."""
    p = torch.ones(EXPERTS)
    if phase == 0:
        p[[0, 1]] = 12.0
    else:
        p[7] = 30.0
    return p / p.sum()


def _record(recorder: ExpertLoadRecorder, serving, gen: torch.Generator, phase: int) -> None:
    for layer in range(LAYERS):
        logical = torch.multinomial(_phase_probs(phase).expand(TOKENS, -1), TOPK, generator=gen)
        # Each token goes to a replica of its expert, spread by token index.
        cnt = serving.logcnt[layer, logical]
        replica = torch.arange(TOKENS)[:, None] % cnt
        recorder.record_topk(layer, serving.log2phy[layer, logical, replica])
    recorder.step()


def _land(rb: Rebalancer, recorder: ExpertLoadRecorder, gen: torch.Generator, phase: int, check) -> int:
    """Steps on (recording ``phase``, asserting ``check()`` after each) until no rebalance is moving; how
    many. A commit waits until every rank has staged, which a loaded machine may put off past a test's last
    step; every rank sees the same commits, so all take the same number of steps."""
    steps = 0
    while rb.migrating and steps < 100:
        _record(recorder, rb.serving, gen, phase)
        rb.step()
        assert check(), f"landing step {steps}"
        steps += 1
    return steps


def _loop(rank: int, world: int, mode: str, steps: int, out: dict, layers_per_step: int = 1) -> None:
    canon = canonical(LAYERS, EXPERTS)
    start = plan(_phase_probs(0).expand(LAYERS, -1) * 1000, num_gpus=world, num_slots=SLOTS)
    weights, _ = make_weights(canon, start, rank)
    recorder = ExpertLoadRecorder(LAYERS, SLOTS, window=16, device="cpu", backend="torch")
    commits: list[int] = []
    config = RebalancerConfig(every=4, mode=mode, plan_lag=2, history=4, layers_per_step=layers_per_step,
                              policy=OnlineConfig(window=2, max_moves=4, min_gain=0.01),
                              migration=MigrationConfig(timeout_s=30))
    rb = Rebalancer(recorder, start, weights, config=config, on_commit=lambda layer, p: commits.append(layer))
    gen = torch.Generator().manual_seed(rank)
    for step in range(steps):
        _record(recorder, rb.serving, gen, phase=int(step >= steps // 3))
        rb.step()
        assert corrupted_slots(weights, canon, rb.serving, rank) == 0, f"step {step}"
    extra = _land(rb, recorder, gen, phase=1, check=lambda: corrupted_slots(weights, canon, rb.serving, rank) == 0)
    rb.close()
    assert rb.rebalances and all(r.error is None and r.done for r in rb.rebalances)
    if rank == 0:
        first = rb.rebalances[0]
        out.update(moved=not torch.equal(rb.serving.phy2log, start.phy2log), commits=len(commits),
                   moves=sum(r.report.moves for r in rb.rebalances), realised=first.realised,
                   predicted=first.decision.after, state=rb.state_dict()["steps"] - extra)


@pytest.mark.parametrize("mode,layers_per_step", [("sync", 1), ("async", 1), ("async", 2)])
def test_a_load_shift_is_followed_without_a_corrupted_step(mode: str, layers_per_step: int) -> None:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        spawn(_loop, 2, mode, 36, out, layers_per_step)
        result = dict(out)
    assert result["moved"], "the rebalancer never acted on the load shift"
    assert result["commits"] >= 1 and result["moves"] >= 1
    # The first rebalance answers the switch: measured on the next window, it is close to what was predicted.
    assert result["realised"] is not None and result["realised"] < 1.1
    assert result["state"] == 36


def test_state_dict_round_trip_and_bad_config() -> None:
    canon = canonical(LAYERS, EXPERTS)
    start = plan(_phase_probs(0).expand(LAYERS, -1) * 1000, num_gpus=1, num_slots=SLOTS)
    weights, _ = make_weights(canon, start, 0)
    recorder = ExpertLoadRecorder(LAYERS, SLOTS, window=8, device="cpu", backend="torch")
    rb = Rebalancer(recorder, start, weights, config=RebalancerConfig(every=2, mode="sync", plan_lag=1))
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        _record(recorder, rb.serving, gen, phase=0)
        rb.step()
    state = rb.state_dict()
    again = Rebalancer(recorder, start, weights, config=RebalancerConfig(every=2, mode="sync", plan_lag=1))
    again.load_state_dict(state)
    assert torch.equal(again.history, rb.history) and again.steps == 4
    with pytest.raises(EplbError, match="plan_lag"):
        RebalancerConfig(every=4, plan_lag=4)
    with pytest.raises(EplbError, match="mode"):
        RebalancerConfig(mode="later")
    with pytest.raises(EplbError, match="malformed"):
        again.load_state_dict({"history": []})


def _faulty(rank: int, world: int, out: dict) -> None:
    from eplb.runtime.migration import transfer

    canon = canonical(LAYERS, EXPERTS)
    start = plan(_phase_probs(0).expand(LAYERS, -1) * 1000, num_gpus=world, num_slots=SLOTS)
    weights, _ = make_weights(canon, start, rank)
    recorder = ExpertLoadRecorder(LAYERS, SLOTS, window=16, device="cpu", backend="torch")
    config = RebalancerConfig(every=4, mode="async", plan_lag=1, history=4,
                              policy=OnlineConfig(window=1, max_moves=4, min_gain=0.01),
                              migration=MigrationConfig(timeout_s=10))
    rb = Rebalancer(recorder, start, weights, config=config)
    stage = transfer.stage
    failures = {"left": 1}

    def flaky(*args, **kwargs):  # rank 1 fails the first migration step it stages
        if rank == 1 and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("injected staging fault")
        return stage(*args, **kwargs)

    transfer.stage = flaky
    gen = torch.Generator().manual_seed(rank)
    served = []
    for step in range(24):
        _record(recorder, rb.serving, gen, phase=1)
        rb.step()
        assert corrupted_slots(weights, canon, rb.serving, rank) == 0, f"step {step}"
        served.append(rb.serving.phy2log.clone())
    _land(rb, recorder, gen, phase=1, check=lambda: corrupted_slots(weights, canon, rb.serving, rank) == 0)
    rb.close()
    errors = [r.error for r in rb.rebalances if r.error]
    assert errors and "injected staging fault" in errors[0] and "rank 1" in errors[0], errors
    assert any(r.done and r.error is None and r.report.moves for r in rb.rebalances), "no retry succeeded"
    if rank == 0:
        out["errors"] = len(errors)


def test_a_failed_step_keeps_the_old_placement_everywhere_and_the_next_decision_retries() -> None:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        spawn(_faulty, 2, out)
        assert out["errors"] == 1


def _ordered(world: int = 1):
    """A start placement and a target in which every redundant slot takes another expert."""
    start = plan(torch.ones(LAYERS, EXPERTS), num_gpus=world, num_slots=SLOTS, algorithm="linear")
    shifted = start.phy2log.clone()
    shifted[:, EXPERTS:] = (shifted[:, EXPERTS:] + 3) % EXPERTS
    return start, Placement(shifted, EXPERTS, world)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_move_to_an_ordered_placement(mode: str) -> None:
    canon = canonical(LAYERS, EXPERTS)
    start, target = _ordered()
    weights, _ = make_weights(canon, start, 0)
    recorder = ExpertLoadRecorder(LAYERS, SLOTS, window=4, device="cpu", backend="torch")
    config = RebalancerConfig(every=100, plan_lag=1, mode=mode, layers_per_step=LAYERS)
    commits: list[tuple[int, int]] = []
    rb = Rebalancer(recorder, start, weights, config=config,
                    on_commit=lambda layer, _: commits.append((rb.steps, layer)))
    rb.move_to(target)
    assert rb.migrating == (mode == "async")
    if mode == "async":
        with pytest.raises(EplbError, match="under way"):
            rb.move_to(target)
    for _ in range(200):  # async: every layer staged at once (layers_per_step=LAYERS), then committed together
        if not rb.migrating:
            break
        recorder.step()
        rb.step()
        assert corrupted_slots(weights, canon, rb.serving, 0) == 0
        time.sleep(0.01)
    rb.close()
    assert torch.equal(rb.serving.phy2log, target.phy2log) and not rb.migrating
    assert rb.rebalances[-1].report.moves == int((start.phy2log != target.phy2log).sum())
    assert sorted(layer for _, layer in commits) == list(range(LAYERS)) and len({at for at, _ in commits}) == 1


def test_a_step_never_waits_for_staging(monkeypatch) -> None:
    # Staging held back: step() returns at once and keeps serving the old placement; once staging is done, the
    # next boundary commits.
    from eplb.runtime.migration import transfer

    canon = canonical(LAYERS, EXPERTS)
    start, target = _ordered()
    weights, _ = make_weights(canon, start, 0)
    recorder = ExpertLoadRecorder(LAYERS, SLOTS, window=4, device="cpu", backend="torch")
    rb = Rebalancer(recorder, start, weights, config=RebalancerConfig(every=100, plan_lag=1))
    gate, stage = threading.Event(), transfer.stage

    def held(*args, **kwargs):
        assert gate.wait(30), "the test never released staging"
        return stage(*args, **kwargs)

    monkeypatch.setattr(transfer, "stage", held)
    rb.move_to(target)
    for _ in range(3):
        recorder.step()
        rb.step()
        assert rb.migrating and torch.equal(rb.serving.phy2log, start.phy2log)
    gate.set()
    for _ in range(200):
        if not rb.migrating:
            break
        time.sleep(0.01)
        recorder.step()
        rb.step()
    rb.close()
    assert torch.equal(rb.serving.phy2log, target.phy2log)
    assert corrupted_slots(weights, canon, rb.serving, 0) == 0


def _lockstep(rank: int, world: int, out: dict) -> None:
    # Rank 1 stages slowly: rank 0, ready first, must not commit alone; both commit at the same boundaries.
    from eplb.runtime.migration import transfer

    canon = canonical(LAYERS, EXPERTS)
    start, target = _ordered(world)
    weights, _ = make_weights(canon, start, rank)
    recorder = ExpertLoadRecorder(LAYERS, SLOTS, window=4, device="cpu", backend="torch")
    rb = Rebalancer(recorder, start, weights, config=RebalancerConfig(every=100, plan_lag=1))
    stage = transfer.stage

    def slow(*args, **kwargs):
        if rank == 1:
            time.sleep(0.3)
        return stage(*args, **kwargs)

    transfer.stage = slow
    rb.move_to(target)
    served = []
    for _ in range(400):
        if not rb.migrating:
            break
        recorder.step()
        rb.step()
        assert corrupted_slots(weights, canon, rb.serving, rank) == 0
        served.append(rb.serving.phy2log.tolist())
        time.sleep(0.02)
    rb.close()
    out[rank] = served
    assert torch.equal(rb.serving.phy2log, target.phy2log)


def test_ranks_commit_at_the_same_boundary_when_one_stages_late() -> None:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        spawn(_lockstep, 2, out)
        served = dict(out)
    assert served[0] == served[1], "the ranks served different placements at some step"
    changes = [i for i in range(1, len(served[0])) if served[0][i] != served[0][i - 1]]
    assert len(changes) == LAYERS and changes[0] > 2, "no boundary waited for the late rank"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_async_steps_neither_wait_for_the_serving_stream_nor_take_fresh_device_memory() -> None:
    # Every slot of every layer changes, so one layer's staging fills the whole reserve: the next layer's
    # staging must wait for the commit that reads the last one instead of taking fresh device memory. And
    # step() must not wait for the forward pass queued on the serving stream (an engine runs ahead), nor for
    # staging.
    layers, experts = 3, 8
    start = Placement(torch.arange(experts).repeat(layers, 1), experts, 1)
    target = Placement((start.phy2log + 1) % experts, experts, 1)
    slots = [torch.arange(experts, dtype=torch.float32, device="cuda")[:, None, None].repeat(1, 512, 1024)
             for _ in range(layers)]  # 2 MB a slot, slot s holding the value s
    recorder = ExpertLoadRecorder(layers, experts, window=4, device="cuda", backend="torch")
    rb = Rebalancer(recorder, start, ExpertWeights([{"w": w} for w in slots]),
                    config=RebalancerConfig(every=100, plan_lag=1))
    torch.cuda.synchronize()
    allocations = torch.cuda.memory_stats()["num_device_alloc"]
    rb.move_to(target)
    recorder.step()
    rb.step()  # stages the first layer
    for _ in range(100):
        if not rb.migrating:
            break
        torch.cuda._sleep(50_000_000)  # a forward pass still running on the serving stream (~25 ms)
        recorder.step()
        rb.step()  # commits the staged layer once it is staged, and stages the next
        assert not torch.cuda.current_stream().query(), "step() waited for the serving stream"
        torch.cuda.current_stream().synchronize()  # the next forward pass starts after this one
    assert not rb.migrating
    torch.cuda.synchronize()
    rb.close()
    assert torch.cuda.memory_stats()["num_device_alloc"] == allocations
    for layer, w in enumerate(slots):
        assert torch.equal(w[:, 0, 0].cpu(), target.phy2log[layer].float())
