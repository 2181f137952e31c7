"""The eplb command: plan, compare, export, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from eplb import planning
from eplb.cli import run


def _write_stats(tmp_path, load: torch.Tensor, name: str = "stats.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"logical_count": load.tolist()}))
    return str(path)


@pytest.fixture
def stats(tmp_path) -> str:
    g = torch.Generator().manual_seed(0)
    load = torch.rand(4, 16, generator=g) ** 4 * 1000
    load[0] = 0  # a dense layer
    return _write_stats(tmp_path, load)


def test_plan_example_runs(capsys):
    assert run(["plan", "--no-layers"]) == 0
    text = capsys.readouterr().out
    assert "bundled example" in text and "max/mean GPU load" in text
    assert "dense layers" in text  # the example's layers 0-2 are dense


def test_plan_prints_every_layer_and_exports(stats, tmp_path, capsys):
    target = tmp_path / "init.json"
    code = run(["plan", stats, "--gpus", "4", "--slots", "20", "-a", "deepseek", "-o", str(target), "-f", "sglang"])
    assert code == 0
    text = capsys.readouterr().out
    assert "dense" in text and "per layer" in text
    data = json.loads(target.read_text())
    assert list(data) == ["physical_to_logical_map"]
    assert torch.tensor(data["physical_to_logical_map"]).shape == (4, 20)


def test_compare_with_eval_lists_every_algorithm(stats, tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    other = _write_stats(tmp_path, torch.rand(4, 16, generator=g) * 10, "other.json")
    code = run(["compare", stats, "--gpus", "4", "--slots", "16", "--eval", other])
    assert code == 0
    text = capsys.readouterr().out
    for name in ("deepseek", "linear", "round_robin", "held-out"):
        assert name in text


def test_compare_explains_each_algorithm_under_the_table(stats, capsys):
    assert run(["compare", stats, "--gpus", "4", "--slots", "20", "-a", "eplb,linear"]) == 0
    legend = capsys.readouterr().out.split("algorithms:")[1].splitlines()
    eplb_line = next(line for line in legend if line.split()[:1] == ["eplb"])
    linear_line = next(line for line in legend if line.split()[:1] == ["linear"])
    assert planning.get("eplb").summary in eplb_line and "static" not in eplb_line
    assert planning.get("linear").summary in linear_line and "(static, ignores the load)" in linear_line


def test_compare_rejects_mismatched_eval(stats, tmp_path, capsys):
    other = _write_stats(tmp_path, torch.ones(3, 16), "other.json")
    assert run(["compare", stats, "--gpus", "4", "--slots", "16", "--eval", other]) == 2
    assert "same model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["plan", "STATS", "--gpus", "3", "--slots", "20"], "multiple of 3"),
        (["plan", "STATS", "--gpus", "4", "--slots", "8"], "cannot hold 16 experts"),
        (["plan", "STATS", "--gpus", "4", "--slots", "16", "-a", "nope"], "choose one of"),
        (["plan", "STATS", "--gpus", "4", "--slots", "16", "--nodes", "3"], "multiple of the node count"),
        (["plan", "STATS", "--gpus", "4", "--slots", "16", "-a", "deepseek_hierarchical"], "num_groups"),
        (["plan", "STATS"], "--gpus and --slots"),
        (["plan", "missing.json", "--gpus", "4", "--slots", "16"], "missing.json"),
        (["plan", "--bogus"], "bogus"),
        (["plan", "STATS", "--gpus", "4", "--slots", "16", "-a", "deepseek", "--risk", "2"], "tune the eplb algorithm"),
        (["plan", "STATS", "--gpus", "4", "--slots", "16", "--risk", "-1"], "risk must be"),
        (["plan", "STATS", "--gpus", "4", "--slots", "16", "--max-moves", "2"], "--current"),
        (["plan", "--gpus", "0"], "num_gpus must be a positive integer, got 0"),  # not the example's 32
        (["plan", "--nodes", "0"], "num_nodes must be a positive integer, got 0"),
    ],
)
def test_bad_input_is_one_line_exit_2(stats, capsys, argv, needle):
    argv = [stats if a == "STATS" else a for a in argv]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_console_script_exit_code(stats):
    proc = subprocess.run([sys.executable, "-m", "eplb", "plan", stats, "--gpus", "3", "--slots", "20"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("eplb: error:") and "Traceback" not in proc.stderr


def test_plan_with_hedged_knobs_and_traffic(stats, capsys):
    argv = ["plan", stats, "--gpus", "4", "--slots", "20", "--nodes", "2", "--groups", "4", "--topk-groups", "2",
            "--top-k", "4", "-a", "eplb", "--locality", "0.5", "--risk", "0"]
    assert run(argv) == 0
    text = capsys.readouterr().out
    assert "remote nodes/token" in text and text.count("\n") > 5


def test_plan_from_current_within_budget(stats, tmp_path, capsys):
    first = tmp_path / "first.json"
    assert run(["plan", stats, "--gpus", "4", "--slots", "20", "-a", "linear", "-o", str(first)]) == 0
    capsys.readouterr()
    second = tmp_path / "second.json"
    argv = ["plan", stats, "--gpus", "4", "--slots", "20", "--current", str(first), "--max-moves", "2",
            "--bytes-per-expert", "1000", "-o", str(second)]
    assert run(argv) == 0
    assert "GB of weights" in capsys.readouterr().out
    before = json.loads(first.read_text())["phy2log"]
    after = json.loads(second.read_text())["phy2log"]
    changed = [sum(a != b for a, b in zip(old, new, strict=True)) for old, new in zip(before, after, strict=True)]
    assert max(changed) <= 2 and sum(changed) > 0
