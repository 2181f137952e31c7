"""SGLang flags and fit checks for eplb's placement files."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import eplb
from eplb.cli import run
from eplb.errors import EplbError
from eplb.integrations import sglang
from eplb.integrations.commands import sglang_args
from eplb.io.placements import write_placement

NOT_IMPORTABLE = "SGLang is not importable: run scripts/interop.py"


def _sglang(module: str):
    return pytest.importorskip(f"sglang.srt.eplb.{module}", reason=NOT_IMPORTABLE)


@pytest.fixture
def placement_file(tmp_path):
    placement = eplb.plan(torch.rand(4, 16, generator=torch.Generator().manual_seed(0)), num_gpus=4, num_slots=20)
    path = tmp_path / "init.pt"
    write_placement(placement, path, format="sglang", layer_ids=range(4))
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


def test_check_command(placement_file, capsys):
    _, path = placement_file
    assert run(["check", str(path), "--engine", "sglang", "--model-layers", "4", "--ep-size", "4"]) == 0
    assert "fits sglang with 4 layers on EP size 4 (4 redundant slots)" in capsys.readouterr().out
    assert run(["check", str(path), "--model-layers", "61", "--ep-size", "4", "--redundant-experts", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "61 layers" in err[0] and "pass --ep-num-redundant-experts 4" in err[0]


def test_sglang_args_refuses_a_file_sglang_rejects(tmp_path):
    path = write_placement(eplb.plan(torch.rand(2, 8), num_gpus=2, num_slots=8), tmp_path / "p.json")
    result = CliRunner().invoke(sglang_args, [str(path)])
    assert result.exit_code == 1 and "eplb file, which SGLang rejects" in result.output


def test_algorithm_names():
    assert sglang.algorithm_name("eplb") == "eplb"
    assert sglang.algorithm_name("eplb:auto") == "auto"
    assert sglang.algorithm_name("deepseek") is None


def test_rebalance_has_sglang_contract():
    tokens = torch.rand(3, 2, 16, generator=torch.Generator().manual_seed(1))
    phy2log, log2phy, logcnt = sglang.rebalance(tokens, 24, 6, 4, 2, "auto")
    placement = eplb.Placement(phy2log, num_experts=16, num_gpus=4)
    assert torch.equal(log2phy, placement.log2phy) and torch.equal(logcnt, placement.logcnt)


# SGLang's own code (scripts/interop.py makes it importable) --------------------------------------


def test_sglang_reads_the_file_as_eplb_placed_it(placement_file):
    location = _sglang("expert_location")
    placement, path = placement_file
    data = torch.load(path, weights_only=True, map_location="cpu")  # what SGLang does with a .pt file
    assert list(data) == ["physical_to_logical_map"]
    mapping = location._compute_logical_to_all_physical_map(data["physical_to_logical_map"], 16, 4, None)
    for layer in range(4):
        for expert in range(16):
            slots = [s for s in mapping[layer][expert] if s >= 0]
            assert slots == (placement.phy2log[layer] == expert).nonzero().flatten().tolist()


def test_install_routes_eplb_names_and_keeps_sglang_own():
    algorithms = _sglang("eplb_algorithms")
    own = algorithms.compute_algorithm, algorithms.rebalance_experts
    try:
        sglang.install()
        sglang.install()  # idempotent
        assert algorithms.compute_algorithm("deepseek", 8, 1) == algorithms.EplbAlgorithm.deepseek
        choice = algorithms.compute_algorithm("eplb:deepseek", 8, 2)
        assert isinstance(choice, sglang.EplbChoice)
        gen = torch.Generator().manual_seed(2)
        tokens = torch.randint(0, 1000, (4, 3, 32), generator=gen).float()
        ours = algorithms.rebalance_experts(tokens, 48, 6, 8, 1, choice)
        theirs = algorithms.rebalance_experts(tokens, 48, 6, 8, 1, algorithms.EplbAlgorithm.deepseek)
        assert torch.equal(ours[0], theirs[0])  # integer loads: no float-sum near-ties
        assert torch.equal(ours[2], theirs[2])
        best = algorithms.rebalance_experts(tokens, 48, 6, 8, 1, algorithms.compute_algorithm("eplb:auto", 8, 1))
        assert best[0].shape == (3, 48)
    finally:
        algorithms.compute_algorithm, algorithms.rebalance_experts = own
