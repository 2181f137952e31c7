"""``eplb.plan`` on random valid clusters and adversarial loads: a valid placement or one EplbError."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb import planning
from eplb.errors import EplbError

# Values that broke planners: zeros, ties, subnormals, a huge range.
_ADVERSARIAL = [0.0, 1.0, 5e-324, 1e-310, 1e-30, 3.0, 1e6, 1e30, 3.5e38, 1e300]
_SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    nodes = draw(st.sampled_from([1, 1, 2, 4]))
    gpus = nodes * draw(st.integers(1, 3))
    experts = draw(st.integers(1, 12))
    slots = gpus * draw(st.integers(-(-experts // gpus), -(-experts // gpus) + 4))
    layers, steps = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["mixed", "sparse", "hot", "ties"]))
    if kind == "mixed":
        values = st.sampled_from(_ADVERSARIAL) | st.floats(0, 1e4)
        load = torch.tensor(draw(st.lists(values, min_size=steps * layers * experts,
                                          max_size=steps * layers * experts)), dtype=torch.float64)
    else:
        load = torch.zeros(steps * layers * experts, dtype=torch.float64)
        if kind == "ties":
            load[:] = draw(st.sampled_from(_ADVERSARIAL))
        else:  # fewer loaded experts than GPUs (often one)
            loaded = draw(st.lists(st.integers(0, load.numel() - 1), max_size=1 if kind == "hot" else 3))
            load[loaded] = draw(st.sampled_from(_ADVERSARIAL[1:]))
    groups = draw(st.sampled_from([None, *[k for k in (1, 2, 4) if experts % k == 0]]))
    return load.reshape(steps, layers, experts), dict(num_gpus=gpus, num_slots=slots, num_nodes=nodes,
                                                       num_groups=groups)


def _check(placement: eplb.Placement, shape: tuple[int, int], slots: int) -> None:
    layers, experts = shape
    assert placement.phy2log.shape == (layers, slots)
    logcnt = placement.logcnt
    assert (logcnt >= 1).all() and (logcnt.sum(1) <= slots).all()
    if placement.algorithm != "round_robin":  # the one layout allowed empty slots
        assert (logcnt.sum(1) == slots).all()
    # log2phy lists exactly the slots of each expert.
    for layer in range(layers):
        for e in range(experts):
            listed = placement.log2phy[layer, e]
            listed = listed[listed >= 0]
            assert len(listed) == int(logcnt[layer, e])
            assert (placement.phy2log[layer, listed] == e).all()


@_SETTINGS
@given(cases(), st.sampled_from(planning.names()))
def test_plan_is_valid_and_deterministic_or_one_error(case, algorithm):
    load, cluster = case
    try:
        placement = eplb.plan(load, algorithm=algorithm, **cluster)
    except EplbError as exc:
        assert "\n" not in str(exc)
        return
    _check(placement, tuple(load.shape[1:]), cluster["num_slots"])
    assert torch.equal(eplb.plan(load, algorithm=algorithm, **cluster).phy2log, placement.phy2log)
    report = eplb.evaluate(placement, load)
    assert (report.gap[report.loaded] >= -1e-9).all()
