"""`eplb plan -o` for the engines: SGLang flags printed, TensorRT-LLM model layers and updates per iteration."""

from __future__ import annotations

import json

import torch
import yaml

from eplb.cli import run


def _stats(tmp_path) -> str:
    path = tmp_path / "stats.json"
    load = torch.rand(4, 16, generator=torch.Generator().manual_seed(0)) * 1000
    path.write_text(json.dumps({"logical_count": load.tolist()}))
    return str(path)


def test_plan_to_sglang_prints_the_matching_flags(tmp_path, capsys):
    target = tmp_path / "init.pt"
    assert run(["plan", _stats(tmp_path), "--gpus", "4", "--slots", "20", "--no-layers", "-o", str(target)]) == 0
    text = capsys.readouterr().out
    assert f"SGLang flags: --init-expert-location {target} --ep-num-redundant-experts 4 --ep-size 4" in text


def test_plan_to_sglang_refuses_a_row_count_unlike_the_model(tmp_path, capsys):
    target = tmp_path / "init.pt"
    argv = ["plan", _stats(tmp_path), "--gpus", "4", "--slots", "20", "--no-layers", "-o", str(target)]
    assert run([*argv, "--model-layers", "61"]) == 2
    assert "61 rows, these are 4" in capsys.readouterr().err
    assert not target.exists()


def test_plan_to_trtllm_with_mtp_layer_and_updates(tmp_path, capsys):
    target = tmp_path / "lb.yaml"
    argv = ["plan", _stats(tmp_path), "--gpus", "4", "--slots", "20", "--no-layers", "-o", str(target),
            "--model-layers", "5", "--updates-per-iter", "1"]
    assert run(argv) == 0
    data = yaml.safe_load(target.read_text())
    assert list(data["initial_global_assignments"]) == [0, 1, 2, 3, 4]
    assert data["layer_updates_per_iter"] == 1


def test_plan_warns_once_when_the_statistics_have_no_layer_ids(tmp_path, capsys):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps((torch.rand(4, 16, generator=torch.Generator().manual_seed(0)) * 1000).tolist()))
    argv = ["--gpus", "4", "--slots", "20", "--no-layers", "-o", str(tmp_path / "init.pt")]
    assert run(["plan", str(bare), *argv]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eplb: warning: no layer ids: init.pt (sglang) takes its 4 rows")
    assert run(["plan", _stats(tmp_path), *argv]) == 0  # an SGLang dump: a row per model layer
    assert "warning" not in capsys.readouterr().err


def test_plan_to_vllm_writes_the_moe_rows_only(tmp_path):
    path = tmp_path / "stats.json"
    load = torch.rand(6, 16, generator=torch.Generator().manual_seed(0)) * 1000
    load[:2] = 0  # dense layers, as SGLang records them
    path.write_text(json.dumps({"logical_count": load.tolist()}))
    target = tmp_path / "v.json"
    assert run(["plan", str(path), "--gpus", "4", "--slots", "20", "--no-layers", "-o", str(target), "-f", "vllm"]) == 0
    data = json.loads(target.read_text())
    assert data["layer_ids"] == [2, 3, 4, 5] and len(data["physical_to_logical_map"]) == data["num_layers"] == 4
