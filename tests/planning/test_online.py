"""The online rebalancing decision: it acts on a load shift, stays put on a steady load, respects the budget."""

from __future__ import annotations

import math

import pytest
import torch

from eplb import EplbError, plan
from eplb.planning.online import (
    OnlineConfig,
    ShiftDetector,
    decide,
    lower_bound_max_over_mean,
    predicted_max_over_mean,
    same_workload,
)


def _shifted(make_load):
    before = make_load(2, 16, steps=4, seed=1)
    after = make_load(2, 16, steps=4, seed=2)
    return before, after


def test_acts_on_a_shift_within_the_budget(make_load) -> None:
    before, after = _shifted(make_load)
    serving = plan(before, num_gpus=4, num_slots=20)
    decision = decide(after, serving, OnlineConfig(window=4, max_moves=3, min_gain=0.01))
    assert decision.act
    assert decision.after < decision.before
    assert int(decision.moves.max()) <= 3
    assert torch.equal(decision.moves, (decision.placement.phy2log != serving.phy2log).sum(1))
    assert decision.after == pytest.approx(predicted_max_over_mean(decision.placement, after))


def test_stays_put_when_the_gain_is_small(make_load) -> None:
    load = make_load(2, 16, steps=4, seed=3)
    serving = plan(load, num_gpus=4, num_slots=20)
    decision = decide(load, serving, OnlineConfig(window=4, min_gain=0.05))
    assert not decision.act
    assert decision.placement is serving
    assert int(decision.moves.sum()) == 0


def test_plans_from_the_recent_windows_only(make_load) -> None:
    old, new = _shifted(make_load)
    serving = plan(old, num_gpus=4, num_slots=20)
    history = torch.cat([old, new])
    full = decide(history, serving, OnlineConfig(window=4, max_moves=None, min_gain=0.0))
    recent = decide(new, serving, OnlineConfig(window=4, max_moves=None, min_gain=0.0))
    assert torch.equal(full.placement.phy2log, recent.placement.phy2log)


def test_bad_input_is_named(make_load) -> None:
    serving = plan(make_load(2, 16), num_gpus=4, num_slots=20)
    with pytest.raises(EplbError, match="min_gain"):
        OnlineConfig(min_gain=1.5)
    with pytest.raises(EplbError, match="window"):
        OnlineConfig(window=0)
    with pytest.raises(EplbError, match="shift_noise"):
        OnlineConfig(shift_noise=0)
    with pytest.raises(EplbError, match="min_windows"):
        OnlineConfig(min_windows=0)
    with pytest.raises(EplbError, match="3 layers"):
        decide(make_load(3, 16), serving)


# The workload-shift detector and the lower-bound skip (one home for the Rebalancer and the simulator).

def _probs(seed: int, layers: int = 2, experts: int = 16) -> torch.Tensor:
    """A skewed routing distribution ``[L, E]`` per layer (a workload)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(layers, experts, generator=gen, dtype=torch.float64) ** 4 + 0.01
    return p / p.sum(-1, keepdim=True)


def _windows(probs: torch.Tensor, count: int, seed: int, tokens: int = 4000) -> torch.Tensor:
    """``[count, L, E]`` windows of ``tokens`` token-expert pairs per layer drawn from ``probs``: windows of one
    workload differ by sampling noise only."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(probs.repeat(count, 1), tokens, replacement=True, generator=gen)
    counts = torch.zeros(draws.shape[0], probs.shape[1], dtype=torch.float64)
    counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    return counts.view(count, *probs.shape)


def _config(**kwargs) -> OnlineConfig:
    return OnlineConfig(**{"window": 16, "max_moves": None, "min_gain": 0.0, "algorithm": "deepseek"} | kwargs)


def test_after_a_shift_the_plan_ignores_the_old_workload() -> None:
    old, new = _windows(_probs(1), 6, seed=10), _windows(_probs(2), 3, seed=11)
    serving = plan(old.sum(0), num_gpus=4, num_slots=20, algorithm="deepseek")
    history = torch.cat([old, new])
    decision = decide(history, serving, _config())
    assert decision.windows == 3
    assert decision.before == pytest.approx(predicted_max_over_mean(serving, new))
    assert torch.equal(decision.placement.phy2log, decide(new, serving, _config()).placement.phy2log)
    # Without the detector all 9 windows are planned from, and the old workload pulls the plan elsewhere.
    blind = decide(history, serving, _config(shift_noise=None))
    assert blind.windows == 9
    assert not torch.equal(blind.placement.phy2log, decision.placement.phy2log)


def test_without_a_shift_every_window_is_used() -> None:
    history = _windows(_probs(3), 8, seed=12)
    serving = plan(_probs(4), num_gpus=4, num_slots=20, algorithm="deepseek")
    decision = decide(history, serving, _config(window=6))
    assert decision.windows == 6 and decision.act
    assert decision.before == pytest.approx(predicted_max_over_mean(serving, history[-6:]))
    assert decision.after == pytest.approx(predicted_max_over_mean(decision.placement, history[-6:]))


def test_too_few_windows_of_the_new_workload_wait(monkeypatch) -> None:
    old, new = _windows(_probs(1), 6, seed=10), _windows(_probs(2), 1, seed=11)
    serving = plan(old.sum(0), num_gpus=4, num_slots=20, algorithm="deepseek")
    monkeypatch.setattr("eplb.planning.online.plan", _no_plan)
    decision = decide(torch.cat([old, new]), serving, _config(min_windows=2))
    assert decision.windows == 1 and not decision.planned and not decision.act
    assert decision.placement is serving


def test_one_window_is_enough_when_the_window_is_one() -> None:
    history = _windows(_probs(3), 1, seed=12)
    serving = plan(_probs(4), num_gpus=4, num_slots=20, algorithm="deepseek")
    assert decide(history, serving, _config(window=1, min_windows=2)).planned


def _shifting_history(seed: int, steps: int = 48) -> torch.Tensor:
    """``[steps, 3, 12]`` windows of three workloads in turn (shifts), some layers without load."""
    gen = torch.Generator().manual_seed(seed)
    phase = (torch.rand(steps, generator=gen) < 0.15).long().cumsum(0) % 3
    probs = torch.stack([_probs(seed * 3 + i, layers=3, experts=12) for i in range(3)])
    history = torch.stack([_windows(probs[int(p)], 1, seed=seed * 1000 + t, tokens=300)[0]
                           for t, p in enumerate(phase)])
    history[torch.rand(steps, 3, generator=gen) < 0.1] = 0.0  # zero-load layers
    return history


def _reference_run(recent: torch.Tensor, noise: float) -> int:
    """``same_workload`` written out over the whole window at once (how it was before ``ShiftDetector``)."""
    total = recent.sum(-1, keepdim=True)
    share, loaded = recent / total.clamp(min=1e-300), total.squeeze(-1) > 0

    def tv(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, 0.5 * (a - b).abs().sum(-1), 0.0).sum(-1) / mask.sum(-1).clamp(min=1)

    spread = recent[-1].sqrt().sum(-1) / total[-1, :, 0].clamp(min=1e-300) / math.sqrt(math.pi)
    scale = float(torch.where(loaded[-1], spread, 0.0).sum() / loaded[-1].sum().clamp(min=1))
    if len(recent) > 2:
        scale = max(scale, float(tv(share[1:], share[:-1], loaded[1:] & loaded[:-1]).median()))
    outside = (tv(share, share[-1], loaded) > noise * max(scale, 1e-12)).nonzero().flatten()
    return len(recent) - (int(outside[-1]) + 1 if outside.numel() else 0)


@pytest.mark.parametrize("bound", [1, 2, 3, 7])
@pytest.mark.parametrize("blocks", [False, True])
def test_the_shift_detector_follows_same_workload_step_by_step(bound: int, blocks: bool) -> None:
    history = _shifting_history(seed=bound + 10 * blocks)
    gen = torch.Generator().manual_seed(bound)
    detector, seen, cuts = ShiftDetector(bound, 1.5), 0, 0
    while seen < len(history):
        # Several steps at once as the simulator catches up after an async move, more than the bound too.
        n = int(torch.randint(1, bound + 3, (1,), generator=gen)) if blocks else 1
        got = detector.push(history[seen : seen + n])
        seen = min(seen + n, len(history))
        recent = history[max(0, seen - bound) : seen]  # shorter than the bound at the start
        assert got == same_workload(recent, 1.5) == _reference_run(recent, 1.5), f"step {seen}"
        cuts += got < len(recent)
    assert bound < 3 or cuts > 2  # the shifts cut the window


def test_the_shift_detector_keeps_each_steps_distance_to_the_one_before_exactly() -> None:
    # A step with every layer loaded reads it from the window's distances; one with a zero layer computes it.
    from eplb.planning.online import _distance

    history = _shifting_history(seed=4)
    total = history.sum(-1, keepdim=True)
    share, loaded = history / total.clamp(min=1e-300), total.squeeze(-1) > 0
    detector = ShiftDetector(5, 1.5)
    for t in range(len(history)):
        detector.push(history[t : t + 1])
        for back in range(min(t, 4)):  # every kept step but the oldest
            s = t - back
            expected = float(_distance(share[s], share[s - 1], loaded[s] & loaded[s - 1]))
            assert detector._step[s % 5] == expected, (t, s)
    assert not bool(loaded.all(-1).all()) and bool(loaded.all(-1).any())  # both ways were taken


@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_window_distances_taken_a_few_rows_at_a_time_equal_the_whole_stack(rows: int) -> None:
    from eplb.planning.online import _distance, _distances

    gen = torch.Generator().manual_seed(rows)
    share = torch.rand(rows, 5, 33, generator=gen, dtype=torch.float64) ** 3
    share /= share.sum(-1, keepdim=True)
    mask = torch.rand(rows, 5, generator=gen) > 0.2
    whole = _distance(share, share[-1], mask)
    for k in (1, 2, 4):
        assert torch.equal(_distances(share, share[-1], mask, torch.empty(k, 5, 33, dtype=torch.float64)), whole)


def _no_plan(*args, **kwargs):
    raise AssertionError("decide planned although the lower bound rules out the gain")


def test_no_plan_when_the_lower_bound_rules_out_the_gain(monkeypatch) -> None:
    history = _windows(_probs(5), 4, seed=13)
    fitted = decide(history, plan(_probs(6), num_gpus=4, num_slots=20, algorithm="deepseek"), _config()).placement
    floor = lower_bound_max_over_mean(history, num_gpus=4, num_slots=20)
    before = predicted_max_over_mean(fitted, history)
    assert floor <= before < floor * 1.05  # the fitted placement is close to the bound
    monkeypatch.setattr("eplb.planning.online.plan", _no_plan)
    decision = decide(history, fitted, _config(min_gain=1 - floor / before + 0.01))
    assert not decision.planned and not decision.act and decision.placement is fitted
    assert decision.floor == pytest.approx(floor) and decision.before == pytest.approx(before)
    with pytest.raises(AssertionError, match="lower bound"):  # a reachable gain still plans
        decide(history, fitted, _config(min_gain=max(0.0, 1 - floor / before - 0.01)))


def test_the_lower_bound_is_below_every_placement() -> None:
    history = _windows(_probs(7), 4, seed=14)
    floor = lower_bound_max_over_mean(history, num_gpus=4, num_slots=20)
    for seed in range(4):
        placement = plan(_probs(seed), num_gpus=4, num_slots=20, algorithm="deepseek")
        assert floor <= predicted_max_over_mean(placement, history) + 1e-12


def test_layers_land_largest_gain_first() -> None:
    old, new = _windows(_probs(1), 4, seed=10), _windows(_probs(2, layers=4), 4, seed=11)
    serving = plan(old.sum(0).repeat(2, 1), num_gpus=4, num_slots=20, algorithm="deepseek")
    decision = decide(new, serving, _config())
    assert decision.act and decision.gains is not None
    changed = decision.moves.nonzero().flatten()
    assert sorted(decision.order.tolist()) == changed.tolist()
    assert decision.gains[decision.order].diff().le(0).all()
