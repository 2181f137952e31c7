"""SGLang flags and fit checks for eplb's placement files."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import eplb
from eplb.errors import EplbError
from eplb.integrations import sglang
from eplb.integrations.commands import check, sglang_args
from eplb.io.placements import write_placement


@pytest.fixture
def placement_file(tmp_path):
    placement = eplb.plan(torch.rand(4, 16, generator=torch.Generator().manual_seed(0)), num_gpus=4, num_slots=20)
    path = tmp_path / "init.pt"
    write_placement(placement, path, format="sglang")
    return placement, path


def test_server_args_match_the_file(placement_file):
    placement, path = placement_file
    assert sglang.server_args(placement, path) == [
        "--init-expert-location", str(path), "--ep-num-redundant-experts", "4", "--ep-size", "4"]
    result = CliRunner().invoke(sglang_args, [str(path), "--ep-size", "4"])
    assert result.exit_code == 0 and "--ep-num-redundant-experts 4 --ep-size 4" in result.output


@pytest.mark.parametrize(("layers", "ep", "experts", "match"), [
    (61, 4, None, "4 rows but the model has 61 layers"),
    (4, 8, None, "--ep-size 8"),
    (4, 4, 32, "has 32"),
])
def test_check_refuses_a_file_that_does_not_fit(placement_file, layers, ep, experts, match):
    placement, _ = placement_file
    with pytest.raises(EplbError, match=match):
        sglang.check(placement, model_layers=layers, ep_size=ep, num_experts=experts)


def test_check_command(placement_file):
    _, path = placement_file
    ok = CliRunner().invoke(check, [str(path), "--engine", "sglang", "--model-layers", "4", "--ep-size", "4"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(check, [str(path), "--model-layers", "61", "--ep-size", "4"])
    assert bad.exit_code == 1 and "61 layers" in bad.output
