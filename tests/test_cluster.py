"""cluster.py: the one positive-integer check and the one set of cluster-size rules."""

from __future__ import annotations

import numpy as np
import pytest

from eplb.cluster import check_sizes, is_count, require_count
from eplb.errors import EplbError


def test_is_count_takes_integers_of_any_kind_but_bool():
    assert is_count(3) and is_count(np.int64(3)) and is_count(0, minimum=0)
    assert not any(is_count(v) for v in (0, -1, 2.0, "3", None, True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"value": 0}, "n must be a positive integer, got 0; pass n"),
        ({"value": -1, "minimum": 0}, "n must be a non-negative integer, got -1; pass n"),
        ({"value": 1, "minimum": 2}, "n must be an integer >= 2, got 1; pass n"),
        ({"value": 5, "minimum": 0, "maximum": 3}, r"n must be an integer in \[0, 3\], got 5; pass n"),
        ({"value": True}, "n must be a positive integer, got True; pass n"),
    ],
)
def test_require_count_names_the_value_and_the_fix(kwargs, message):
    with pytest.raises(EplbError, match=f"^{message}$"):
        require_count("n", fix="pass n", **kwargs)


def test_require_count_returns_an_int():
    value = require_count("n", np.int32(4), maximum=4)
    assert value == 4 and type(value) is int


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((0, 8, 1, None), "num_gpus must be a positive integer, got 0; pass the cluster's GPU count"),
        ((2, 8, 0, None), "num_nodes must be a positive integer, got 0; pass the cluster's node count"),
        ((3, 10, 1, None), "10 slots cannot be split evenly over 3 GPUs; use a multiple of 3, e.g. 12"),
        ((3, 10, 1, 14), "e.g. 15"),
        ((2, 6, 1, 8), "6 slots cannot hold 8 experts; use at least 8 slots"),
        ((4, 8, 3, None), "4 GPUs cannot be split evenly over 3 nodes"),
    ],
)
def test_check_sizes(sizes, message):
    with pytest.raises(EplbError, match=message):
        check_sizes(*sizes)
    check_sizes(4, 8, 2, 8)  # a valid cluster passes
