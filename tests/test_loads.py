import numpy as np
import pytest
import torch

from eplb.errors import EplbError
from eplb.loads import as_history, dense_layers


def test_layer_load_becomes_a_one_step_history(make_load):
    load = make_load(3, 8)
    history = as_history(load)
    assert history.shape == (1, 3, 8)
    assert history.dtype == torch.float64
    assert torch.equal(history[0], load)


def test_history_is_kept_as_is(make_load):
    load = make_load(3, 8, steps=4)
    assert torch.equal(as_history(load), load)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32, np.uint8])
def test_numpy_input(dtype):
    arr = np.arange(12).reshape(3, 4).astype(dtype)
    history = as_history(arr)
    assert history.dtype == torch.float64
    assert history.tolist() == [arr.astype(float).tolist()]


def test_non_contiguous_numpy_input():
    arr = np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2]
    assert as_history(arr)[0].tolist() == arr.astype(float).tolist()


def test_nested_list_input():
    assert as_history([[1, 2], [3, 4]]).tolist() == [[[1.0, 2.0], [3.0, 4.0]]]


def test_integer_tensor_input():
    t = torch.tensor([[5, 0, 2]], dtype=torch.int32)
    assert as_history(t).tolist() == [[[5.0, 0.0, 2.0]]]


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4, 5), ()])
def test_wrong_ndim(shape):
    with pytest.raises(EplbError, match=r"dimensions.*pass \[layers, experts\]"):
        as_history(torch.ones(shape))


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (0, 3, 8), (2, 0, 8)])
def test_empty(shape):
    with pytest.raises(EplbError, match="empty.*at least one layer and one expert"):
        as_history(torch.ones(shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(bad):
    load = torch.ones(2, 4)
    load[1, 2] = bad
    with pytest.raises(EplbError, match="1 NaN or infinite.*clean"):
        as_history(load)


def test_negative():
    load = torch.ones(2, 4)
    load[0, :2] = -1
    with pytest.raises(EplbError, match="2 negative entries.*>= 0"):
        as_history(load)


@pytest.mark.parametrize("load", [torch.ones(2, 3, dtype=torch.bool), np.ones((2, 3), dtype=bool)])
def test_bool(load):
    with pytest.raises(EplbError, match="dtype.*bool.*real-valued token counts"):
        as_history(load)


def test_complex():
    with pytest.raises(EplbError, match="complex.*real-valued"):
        as_history(torch.ones(2, 3, dtype=torch.complex64))


@pytest.mark.parametrize(
    "load",
    [
        [["a", "b"]],
        np.array([["a", "b"]]),
        np.array([[1, None]], dtype=object),
        None,
        "load.json",
        [[1, 2], [3]],
        {"layer": [1, 2]},
    ],
    ids=["str-list", "str-array", "object-array", "none", "str", "ragged", "dict"],
)
def test_non_numeric(load):
    with pytest.raises(EplbError, match="not a numeric array.*pass a \\[layers, experts\\] tensor"):
        as_history(load)


def test_error_names_what():
    with pytest.raises(EplbError, match="^history has 1 negative"):
        as_history(torch.tensor([[-1.0]]), what="history")


def test_dense_layers_are_zero_in_every_step():
    history = torch.ones(3, 4, 5)
    history[:, 1] = 0  # dense in every step
    history[0, 2] = 0  # idle in one step only: not dense
    assert dense_layers(history).tolist() == [False, True, False, False]
