"""Fixtures of the waterfill tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.runtime.waterfill.waterfill_inputs import random_topk

TopkFactory = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture
def make_topk() -> TopkFactory:
    """``random_topk``: seeded random top-k ids and weights (see ``waterfill_inputs``)."""
    return random_topk
