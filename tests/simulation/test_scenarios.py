import pytest
import torch

from eplb.errors import EplbError
from eplb.simulation import Burst, build, replay
from eplb.simulation.scenarios import inclusion
from tests.simulation.helpers import phase_loads, small_scenario


def test_same_seed_same_steps_and_any_step_drawn_alone():
    a, b = small_scenario(seed=3), small_scenario(seed=3)
    assert torch.equal(a.load(), b.load())
    assert torch.equal(a.steps(5, 6)[0], a.load()[5])
    assert not torch.equal(a.load(), small_scenario(seed=4).load())


def test_each_step_is_tokens_times_top_k_picks_without_repeats():
    sc = small_scenario(tokens=300)
    load = sc.load()
    assert torch.allclose(load.sum(-1), torch.full(load.shape[:2], 600.0, dtype=torch.float64))
    assert float(load.max()) <= 300  # an expert is picked at most once per token
    assert torch.equal(load, load.round())


def test_sampled_counts_follow_the_phase_load():
    loads = phase_loads(1)
    sc = build(loads, steps_per_phase=400, tokens_per_step=1000, top_k=2, seed=1)
    share = sc.load().mean(0) / 2000
    expected = inclusion(loads[0] / loads[0].sum(-1, keepdim=True), 2) / 2
    assert torch.allclose(share, expected, atol=0.004)


def test_inclusion_caps_a_share_at_one_pick_per_token():
    pi = inclusion(torch.tensor([[0.7, 0.1, 0.1, 0.1]], dtype=torch.float64), 2)
    assert float(pi.max()) == pytest.approx(1.0)
    assert float(pi.sum()) == pytest.approx(2.0)


def test_phases_switches_and_gradual_ramps():
    sc = small_scenario(steps=10)
    assert sc.switches == [10, 20] and sc.num_steps == 30
    ramp = small_scenario(steps=10, switch="gradual", ramp_steps=4)
    assert ramp.switches == [10, 20]
    assert len(ramp.names) == 3 + 8 and "->" in ramp.names[int(ramp.index[10])]
    mid = ramp.expected[int(ramp.index[11])]
    assert torch.allclose(mid, 0.6 * ramp.expected[0] + 0.4 * ramp.expected[1])


def test_bursts_mix_in_another_phase():
    sc = small_scenario(steps=50, burst=Burst(rate=0.2, length=3, share=0.5))
    assert any("burst" in sc.names[int(i)] for i in sc.index)
    assert sc.switches == [50, 100]


def test_replay_returns_the_recorded_steps():
    rec = torch.stack(phase_loads(5)).round()
    rec[:, 0] = 0  # a dense layer is dropped
    sc = replay(rec, top_k=2)
    assert torch.equal(sc.load(), rec[:, 1:])
    assert sc.tokens_per_step is None and sc.num_steps == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"phases": []}, "non-empty list"),
        ({"phases": [torch.ones(2, 16), torch.ones(3, 16)]}, "one model"),
        ({"switch": "slow"}, "abrupt"),
        ({"top_k": 17}, "top_k"),
        ({"tokens_per_step": 0}, "tokens_per_step"),
        ({"steps_per_phase": [5]}, "one per phase"),
        ({"phases": [torch.zeros(2, 16)]}, "all zeros"),
        ({"phases": [-torch.ones(2, 16)]}, "negative"),
    ],
)
def test_bad_scenario_input_gets_one_clear_error(kwargs, match):
    args = {"phases": phase_loads(2), "steps_per_phase": 5, "tokens_per_step": 100, "top_k": 2} | kwargs
    with pytest.raises(EplbError, match=match):
        build(**args)


def test_step_range_outside_the_scenario_is_an_error():
    with pytest.raises(EplbError, match="outside"):
        small_scenario().steps(0, 1000)


def _former_sample(sc, step: int) -> torch.Tensor:
    """One step as the sampler drew it with numpy's along-axis helpers (before its flat-index rewrite)."""
    import numpy as np

    row = int(sc.index[step])
    expected = sc.expected[row]
    total = expected.sum(-1, keepdim=True)
    pi = inclusion(expected / torch.where(total > 0, total, 1.0), sc.top_k).numpy()
    rng = np.random.default_rng([sc.seed, step])
    order = np.argsort(rng.random(pi.shape), axis=-1)
    cum = np.cumsum(np.take_along_axis(pi, order, -1), -1)
    whole = np.floor(cum)
    frac = cum - whole
    by_cut = np.argsort(frac, axis=-1)
    gaps = np.diff(np.take_along_axis(frac, by_cut, -1), prepend=0.0, append=1.0, axis=-1).clip(min=0.0)
    hits = rng.multinomial(sc.tokens_per_step, gaps / gaps.sum(-1, keepdims=True))
    at = np.empty_like(frac)
    np.put_along_axis(at, by_cut, np.cumsum(hits, -1)[..., :-1], -1)
    out = np.empty_like(frac)
    np.put_along_axis(out, order, np.diff(whole * sc.tokens_per_step + at, prepend=0.0, axis=-1), -1)
    out[(total.squeeze(-1) == 0).numpy()] = 0.0
    return torch.from_numpy(out)


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_sampler_draws_exactly_what_the_along_axis_formula_drew(top_k):
    # Capped experts (pi = 1) give tied cut points; a zero layer samples nothing.
    loads = [load.clone() for load in phase_loads(2, layers=3, experts=16, seed=top_k)]
    loads[0][:, 0] = 1e6
    loads[1][1] = 0.0
    sc = build(loads, steps_per_phase=[4, 5], tokens_per_step=700, top_k=top_k, switch="gradual", ramp_steps=2,
               seed=11)
    drawn = sc.steps(2, 9)
    for i, step in enumerate(range(2, 9)):
        assert torch.equal(drawn[i], _former_sample(sc, step)), step
