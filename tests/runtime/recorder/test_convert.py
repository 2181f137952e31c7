"""Conversions of recorded slot loads: ring order, physical -> logical, GPU balancedness."""

from __future__ import annotations

import pytest
import torch

from eplb import EplbError, Placement
from eplb.metrics import gpu_totals
from eplb.runtime.recorder.convert import (
    check_window_sizes,
    ring_order,
    step_balancedness,
    to_logical,
    windowed_balancedness,
)


@pytest.mark.parametrize("steps,window", [(0, 4), (3, 4), (4, 4), (5, 4), (11, 4), (9, 1)])
def test_ring_order_lists_the_last_steps_oldest_first(steps: int, window: int) -> None:
    expected = [s % window for s in range(max(0, steps - window), steps)]
    assert ring_order(steps, window).tolist() == expected


def test_to_logical_sums_replicas_and_drops_empty_slots() -> None:
    gen = torch.Generator().manual_seed(1)
    phy2log = torch.tensor([[0, 1, 2, 0, -1, 1], [2, 2, 1, 0, 0, -1]])
    loads = torch.randint(0, 100, (5, 2, 6), generator=gen, dtype=torch.int32)
    out = to_logical(loads, phy2log)
    assert out.shape == (5, 2, 3) and out.dtype == torch.int32
    expected = torch.zeros(5, 2, 3, dtype=torch.int32)
    for layer in range(2):
        for slot in range(6):
            expert = int(phy2log[layer, slot])
            if expert >= 0:
                expected[:, layer, expert] += loads[:, layer, slot]
    assert torch.equal(out, expected)


def test_to_logical_takes_a_placement_and_keeps_unrecorded_experts() -> None:
    placement = Placement(torch.tensor([[0, 1, 1, 0]]), num_experts=2, num_gpus=2)
    assert to_logical(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), placement).tolist() == [[5.0, 5.0]]
    # With E given, experts past the highest id held still get a (zero) column.
    assert to_logical(torch.tensor([[1, 2]]), torch.tensor([[0, 0]]), num_experts=3).tolist() == [[3, 0, 0]]


def test_to_logical_rejects_mismatched_shapes_and_float_maps() -> None:
    with pytest.raises(EplbError, match="do not match phy2log"):
        to_logical(torch.zeros(2, 3, 5), torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(EplbError, match="integer expert ids"):
        to_logical(torch.zeros(3, 4), torch.zeros(3, 4))


def test_gpu_totals_and_step_balancedness() -> None:
    slot = torch.tensor([[1, 3, 2, 2, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert gpu_totals(slot, 2).tolist() == [[4, 4, 0], [0, 0, 0]]
    bal = step_balancedness(slot, 2)
    assert bal.tolist() == pytest.approx([(8 / 3) / 4, 1.0])
    with pytest.raises(EplbError, match="divisor of 6"):
        gpu_totals(slot, 4)


def test_windowed_balancedness_averages_the_last_steps() -> None:
    gen = torch.Generator().manual_seed(2)
    window, layers, slots = 5, 2, 8
    history = torch.randint(0, 20, (13, layers, slots), generator=gen, dtype=torch.int32)
    ring = torch.zeros(window, layers, slots, dtype=torch.int32)
    for steps in range(0, 14):
        if steps:
            ring[(steps - 1) % window] = history[steps - 1]
        got = windowed_balancedness(ring, torch.tensor(steps), 4, sizes=(1, 3, 5))
        for size, value in got.items():
            last = history[max(0, steps - size) : steps]
            if len(last) == 0:
                assert torch.isnan(value).all()
            else:
                expected = step_balancedness(last, 4).mean(0)
                assert torch.allclose(value, expected)


def test_window_sizes_default_to_what_fits_and_reject_larger() -> None:
    assert check_window_sizes(None, 150) == (10, 100)
    assert check_window_sizes(None, 4) == (4,)
    with pytest.raises(EplbError, match="window >= 1000"):
        check_window_sizes((10, 1000), 128)
