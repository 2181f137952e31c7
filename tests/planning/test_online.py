"""The online rebalancing decision: it acts on a load shift, stays put on a steady load, respects the budget."""

from __future__ import annotations

import pytest
import torch

from eplb import EplbError, plan
from eplb.planning.online import OnlineConfig, decide, predicted_max_over_mean


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
    with pytest.raises(EplbError, match="3 layers"):
        decide(make_load(3, 16), serving)
