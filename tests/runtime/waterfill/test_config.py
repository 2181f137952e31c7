"""WaterfillConfig: its knobs are checked when it is built, and it resolves once into a Strategy."""

from __future__ import annotations

import pytest
import torch

from eplb import EplbError, WaterfillBalancer, WaterfillConfig
from eplb.runtime.waterfill.config import HostInput
from eplb.runtime.waterfill.reference import Source


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        (dict(routed_scaling_factor=-1.0), "routed_scaling_factor"),
        (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor"),
        (dict(mode="async"), "mode must be one of"),
        (dict(candidates="some"), "candidates must be one of"),
        (dict(min_batch=-1), "min_batch"),
        (dict(min_tile_tokens=1.5), "min_tile_tokens"),
        (dict(local_preference=0.9), "local_preference"),
        (dict(seed=-1), "seed"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(check_inputs="yes"), "check_inputs"),
        (dict(prior_tokens=-1), "prior_tokens must be"),
        (dict(move="some"), "move must be one of"),
        (dict(mode="dynamic", move="excess"), "needs fixed recorded loads"),
        (dict(min_tile_tokens=8, move="excess"), "without prior_tokens"),
        (dict(estimate="batch", move="excess"), "estimate='recorded'"),
        (dict(estimate="some"), "estimate must be one of"),
        (dict(estimate="batch", prior_tokens=10), "drop prior_tokens"),
    ],
)
def test_config_knobs_are_validated(knobs, match):
    with pytest.raises(EplbError, match=match):
        WaterfillConfig(**knobs)


@pytest.mark.parametrize(
    ("knobs", "recorded", "source", "host", "estimate", "move"),
    [
        ({}, False, Source.BATCH, HostInput.NONE, None, "all"),
        ({"mode": "dynamic"}, False, Source.GLOBAL, HostInput.NONE, None, "all"),
        ({}, True, Source.BATCH_OFFSET, HostInput.EXCESS, "batch", "all"),
        ({"prior_tokens": 10}, True, Source.BATCH, HostInput.LOADS, "recorded", "all"),
        ({"estimate": "recorded"}, True, Source.PRIOR, HostInput.TABLES, "recorded", "excess"),
        ({"estimate": "recorded", "move": "all"}, True, Source.PRIOR, HostInput.TABLES, "recorded", "all"),
        ({"estimate": "recorded", "min_tile_tokens": 8}, True, Source.PRIOR, HostInput.LOADS, "recorded", "all"),
    ],
)
def test_the_config_resolves_once_into_a_strategy(knobs, recorded, source, host, estimate, move):
    b = WaterfillBalancer(32, 4, 0, WaterfillConfig(**knobs), rank_load=torch.ones(4) if recorded else None)
    assert (b.strategy.source, b.strategy.host, b.estimate, b.move) == (source, host, estimate, move)
    assert b.strategy.fixed_tables == (host is HostInput.TABLES)
