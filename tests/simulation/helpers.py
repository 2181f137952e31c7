"""Small scenarios and a test-only GEMM cost table for the simulation tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from eplb.simulation import build

CLUSTER = {"num_gpus": 4, "num_slots": 20, "num_nodes": 2}


def phase_loads(num_phases: int = 3, layers: int = 2, experts: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Skewed ``[L, E]`` loads, a different hot set per phase."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(layers, experts, generator=g, dtype=torch.float64) ** 4 * 1000 + 1 for _ in range(num_phases)]


def small_scenario(steps: int = 12, tokens: int = 512, seed: int = 0, **kwargs):
    return build(phase_loads(), steps_per_phase=steps, tokens_per_step=tokens, top_k=2, seed=seed, **kwargs)


def write_fixture_table(path: Path, noisy: bool = False) -> Path:
    """A TEST FIXTURE, not a measurement: a made-up GEMM table (time = 20 us per expert + 0.05 us per token),
    optionally with a non-monotone dip that loading must remove."""
    experts, tokens = [1, 2, 4, 8], [1, 16, 256, 4096]
    time_us = [[20.0 * a + 0.05 * a * t for t in tokens] for a in experts]
    if noisy:
        time_us[1][1] = 5.0  # faster with more tokens than with fewer: timing noise
    data = {"device": "test fixture (not measured)", "torch": "-", "command": "-", "date": "-", "experts": experts,
            "tokens_per_expert": tokens, "dtypes": {"bf16": {"time_us": time_us}}}
    path.write_text(json.dumps(data))
    return path
