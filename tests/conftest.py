"""Fixtures shared by the whole suite: the real expert-load data and small random loads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# CI has 2 cores and the planners work on small tensors: torch's intra-op threads only contend.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
# The data lives beside the repository, never in it (one set has no stated license).
REAL_DATA = REPO_ROOT.parent / "shared" / "eplb_real_data"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The folder of real expert-load sets; the test is skipped where it is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real expert-load data not found at {REAL_DATA}")
    return REAL_DATA


LoadFactory = Callable[..., torch.Tensor]


# Session scope: the factory holds no state, so hypothesis tests may share it.
@pytest.fixture(scope="session")
def make_load() -> LoadFactory:
    """A factory of skewed random loads ``[L, E]`` (or ``[T, L, E]`` with ``steps``), seeded.

    Loads are integer-valued token counts with a heavy tail, as routers produce, so that
    replicating hot experts matters; ``dense`` lists layers to zero out (dense layers).
    """

    def make(
        num_layers: int = 3,
        num_experts: int = 16,
        *,
        steps: int | None = None,
        seed: int = 0,
        dense: tuple[int, ...] = (),
    ) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        shape = (num_layers, num_experts) if steps is None else (steps, num_layers, num_experts)
        skew = torch.rand(shape, generator=gen, dtype=torch.float64) ** 4
        load = torch.round(1000.0 * skew) + 1.0
        load[..., list(dense), :] = 0.0
        return load

    return make
