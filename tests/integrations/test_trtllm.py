"""eplb's load-balancer YAML in TensorRT-LLM: the fit check always; TensorRT-LLM's own config classes where
they are importable (``python scripts/interop.py --trtllm-src DIR`` makes them so)."""

from __future__ import annotations

import json
import types

import pytest
import torch
import yaml

import eplb
from eplb.cli import run
from eplb.errors import EplbError
from eplb.integrations import trtllm
from eplb.io.placements import read_placement_file, write_placement

NOT_IMPORTABLE = "TensorRT-LLM's config classes are not importable: run scripts/interop.py --trtllm-src DIR"
# A DeepSeek-V3-like model, small: 3 dense layers, 6 MoE layers, 1 MTP layer; 16 experts on 4 ranks.
DENSE, LAYERS, MTP, EXPERTS, RANKS, SLOTS = 3, 9, 1, 16, 4, 20


def _llm_args():
    return pytest.importorskip("tensorrt_llm.llmapi.llm_args", reason=NOT_IMPORTABLE)


@pytest.fixture
def stats(tmp_path):
    """SGLang-style statistics: a row per model layer (MTP not recorded), the dense rows all zero."""
    load = torch.rand(LAYERS, EXPERTS, generator=torch.Generator().manual_seed(0)) * 1000
    load[:DENSE] = 0
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"logical_count": load.tolist()}))
    return path


def _plan_yaml(stats, tmp_path, *extra: str):
    target = tmp_path / "lb.yaml"
    argv = ["plan", str(stats), "--gpus", str(RANKS), "--slots", str(SLOTS), "--no-layers", "-o", str(target), *extra]
    assert run(argv) == 0
    return target


def test_check_accepts_a_file_with_every_moe_layer(stats, tmp_path, capsys):
    target = _plan_yaml(stats, tmp_path, "--model-layers", str(LAYERS + MTP), "--updates-per-iter", "2")
    argv = ["check", str(target), "--engine", "trtllm", "--model-layers", str(LAYERS + MTP), "--ep-size", str(RANKS),
            "--dense-layers", str(DENSE), "--experts", str(EXPERTS)]
    assert run(argv) == 0
    assert "fits trtllm" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model-layers", str(LAYERS + MTP)], f"MoE layer(s) [{LAYERS}] (TensorRT-LLM raises KeyError"),
    (["--model-layers", "5"], "beyond a model of 5 layers"),
    (["--model-layers", str(LAYERS), "--experts", "32"], "the model has 32"),
    (["--model-layers", str(LAYERS), "--ep-size", "3"], "20 slots cannot be split evenly over 3 GPUs"),
])
def test_check_refuses_what_trtllm_would_reject(stats, tmp_path, capsys, argv, needle):
    target = _plan_yaml(stats, tmp_path)  # no --model-layers: the MTP layer is missing
    argv = ["check", str(target), "--engine", "trtllm", "--dense-layers", str(DENSE), *argv]
    if "--ep-size" not in argv:
        argv += ["--ep-size", str(RANKS)]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_check_refuses_other_formats(tmp_path):
    placement = eplb.plan(torch.rand(2, 8), num_gpus=2, num_slots=8)
    file = read_placement_file(write_placement(placement, tmp_path / "p.json"))
    with pytest.raises(EplbError, match="a eplb file is not a TensorRT-LLM load-balancer config"):
        trtllm.check(file, model_layers=2, ep_size=2)


def test_vllm_check(stats, tmp_path, capsys):
    target = tmp_path / "v.json"
    argv = ["plan", str(stats), "--gpus", str(RANKS), "--slots", str(SLOTS), "--no-layers", "-o", str(target),
            "-f", "vllm"]
    assert run(argv) == 0
    check = ["check", str(target), "--engine", "vllm", "--ep-size", str(RANKS), "--dense-layers", str(DENSE)]
    assert run([*check, "--model-layers", str(LAYERS), "--redundant-experts", "4"]) == 0
    capsys.readouterr()
    assert run([*check, "--model-layers", str(LAYERS + 1)]) == 2
    assert "vLLM's map has 7 (one per MoE layer" in capsys.readouterr().err
    assert run([*check, "--model-layers", str(LAYERS), "--redundant-experts", "0"]) == 2
    assert "num_redundant_experts is 0" in capsys.readouterr().err
    assert run([*check, "--model-layers", str(LAYERS), "--ep-size", "2"]) == 2
    assert "was written for num_gpus=4, not 2" in capsys.readouterr().err


# TensorRT-LLM's own code --------------------------------------------------------------------------


def _load_through_trtllm(llm_args, path):
    """TensorRT-LLM's own YAML path: ``TorchLlmArgs.validate_load_balancer`` on the file's name."""
    args = types.SimpleNamespace(moe_config=types.SimpleNamespace(load_balancer=str(path)))
    llm_args.TorchLlmArgs.validate_load_balancer(args)
    config = args.moe_config.load_balancer
    assert isinstance(config, llm_args.MoeLoadBalancerConfig)
    return config


def test_trtllm_loads_every_rank_slots_as_eplb_placed_them(stats, tmp_path):
    llm_args = _llm_args()
    target = _plan_yaml(stats, tmp_path, "--model-layers", str(LAYERS + MTP), "--updates-per-iter", "2")
    file = read_placement_file(target, num_gpus=RANKS)
    config = _load_through_trtllm(llm_args, target)
    assert config.num_slots == SLOTS and config.layer_updates_per_iter == 2
    width = SLOTS // RANKS
    for rank in range(RANKS):
        config.setup(ep_rank=rank, ep_size=RANKS)
        for layer in range(DENSE, LAYERS + MTP):  # every MoE layer TensorRT-LLM builds, the MTP one included
            row = config.get_layer_initial_global_assignments(layer)
            assert sorted(set(row)) == list(range(EXPERTS))  # what its MoE layer asserts
            eplb_row = file.placement.phy2log[file.layer_ids.index(layer)]
            assert row[config.slot_start:config.slot_end] == eplb_row[rank * width:(rank + 1) * width].tolist()


def test_trtllm_fails_where_eplb_check_refuses(stats, tmp_path):
    llm_args = _llm_args()
    config = _load_through_trtllm(llm_args, _plan_yaml(stats, tmp_path))  # no --model-layers
    config.setup(ep_rank=0, ep_size=RANKS)
    with pytest.raises(KeyError):
        config.get_layer_initial_global_assignments(LAYERS)  # the MTP layer
    with pytest.raises(ValueError, match="divisible"):
        config.setup(ep_rank=0, ep_size=3)


def test_trtllm_rejects_other_keys(tmp_path):
    llm_args = _llm_args()
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"num_slots": 4, "initial_global_assignments": {0: [0, 1, 2, 3]}, "format": "x"}))
    with pytest.raises(ValueError, match="Failed to load MoE load balancer config"):
        _load_through_trtllm(llm_args, path)
