"""Fixtures of the waterfill tests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from waterfill_inputs import random_topk  # noqa: E402

TopkFactory = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture
def make_topk() -> TopkFactory:
    """``random_topk``: seeded random top-k ids and weights (see ``waterfill_inputs``)."""
    return random_topk
