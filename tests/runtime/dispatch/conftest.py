"""Fixtures of the dispatch tests: random placements with redundant replicas."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from eplb.placement import Placement
from tests.runtime.dispatch.dispatch_inputs import make_placement as _make_placement


@pytest.fixture
def make_placement() -> Callable[..., Placement]:
    """``dispatch_inputs.make_placement``: a seeded random placement."""
    return _make_placement


@pytest.fixture
def placement() -> Placement:
    return _make_placement(0)
