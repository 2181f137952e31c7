"""Placement writers and readers: round trips of every format, the engines' exact keys, refusals."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.errors import EplbError
from eplb.io import PLACEMENT_FORMATS, read_placement, read_placement_file, write_placement
from eplb.placement import Placement

# Most tests write engine files without layer ids on purpose; the warning itself is tested below.
pytestmark = pytest.mark.filterwarnings("ignore:no layer ids:UserWarning")

SUFFIX = {"eplb": ".json", "sglang": ".json", "trtllm": ".yaml", "vllm": ".json"}


def make_placement(num_layers=3, num_experts=8, num_gpus=4, redundant=4, num_nodes=1, seed=0) -> Placement:
    """Every expert once plus ``redundant`` random replicas, shuffled over the slots of each layer."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_layers):
        row = torch.cat([torch.arange(num_experts), torch.randint(num_experts, (redundant,), generator=gen)])
        rows.append(row[torch.randperm(row.numel(), generator=gen)])
    return Placement(torch.stack(rows), num_experts=num_experts, num_gpus=num_gpus, num_nodes=num_nodes,
                     algorithm="test")


def with_empty_slot() -> Placement:
    return Placement(torch.tensor([[0, 1, 2, -1], [2, 1, 0, -1]]), num_experts=3, num_gpus=2, algorithm="round_robin")


# Round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", PLACEMENT_FORMATS)
def test_round_trip_every_format(tmp_path, fmt):
    placement = make_placement(num_nodes=2)
    target = tmp_path / f"placement{SUFFIX[fmt]}"
    assert write_placement(placement, target, format=fmt, layer_ids=[3, 4, 5] if fmt != "sglang" else None) == target
    back = read_placement_file(target, num_gpus=4, num_nodes=2)
    assert back.format == fmt
    assert back.placement == placement
    assert back.layer_ids == ([0, 1, 2] if fmt == "sglang" else [3, 4, 5])


@settings(max_examples=20, deadline=None)
@given(
    fmt=st.sampled_from(PLACEMENT_FORMATS),
    num_layers=st.integers(1, 4),
    num_experts=st.integers(1, 12),
    num_gpus=st.integers(1, 4),
    redundant_per_gpu=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(fmt, num_layers, num_experts, num_gpus, redundant_per_gpu, seed):
    # Slots: the smallest multiple of G that holds every expert, plus some redundant ones per GPU.
    redundant = -num_experts % num_gpus + redundant_per_gpu * num_gpus
    placement = make_placement(num_layers, num_experts, num_gpus, redundant, seed=seed)
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / f"p{SUFFIX[fmt]}"
        write_placement(placement, target, format=fmt)
        assert read_placement(target, num_gpus=num_gpus) == placement


def test_format_inferred_from_extension(tmp_path):
    placement = make_placement()
    for name, fmt in (("a.json", "eplb"), ("a.pt", "sglang"), ("a.yaml", "trtllm"), ("a.yml", "trtllm")):
        write_placement(placement, tmp_path / name)
        assert read_placement_file(tmp_path / name, num_gpus=4).format == fmt


def test_eplb_file_keeps_metadata_algorithm_and_empty_slots(tmp_path):
    placement = with_empty_slot()
    target = write_placement(placement, tmp_path / "p.json", layer_ids=[1, 2],
                             metadata={"stats": tmp_path / "stats.json", "spec": {"gpus": 2}, "load": torch.ones(2)})
    data = json.loads(target.read_text())
    assert data["format"] == "eplb.placement" and data["eplb_version"] and data["created"].endswith("+00:00")
    assert data["metadata"] == {"stats": str(tmp_path / "stats.json"), "spec": {"gpus": 2}, "load": [1.0, 1.0]}
    back = read_placement_file(target)
    assert back.placement == placement and back.placement.algorithm == "round_robin"
    assert back.layer_ids == [1, 2] and back.metadata["spec"] == {"gpus": 2}
    # One line per layer row: a changed layer is a one-line diff.
    assert "    [0, 1, 2, -1],\n    [2, 1, 0, -1]\n" in target.read_text()


def test_sglang_json_and_pt_hold_exactly_the_map(tmp_path):
    placement = make_placement()
    as_json = write_placement(placement, tmp_path / "init.json", format="sglang", metadata={"ignored": 1})
    data = json.loads(as_json.read_text())
    assert list(data) == ["physical_to_logical_map"]
    assert data["physical_to_logical_map"] == placement.phy2log.tolist()
    as_pt = write_placement(placement, tmp_path / "init.pt")
    data = torch.load(as_pt, weights_only=True)  # as SGLang loads it
    assert list(data) == ["physical_to_logical_map"]
    assert torch.equal(data["physical_to_logical_map"], placement.phy2log)


def test_trtllm_yaml_has_exactly_the_config_keys(tmp_path):
    placement = make_placement()
    target = write_placement(placement, tmp_path / "lb.yaml", layer_ids=[3, 5, 60])
    data = yaml.safe_load(target.read_text())
    assert list(data) == ["num_slots", "initial_global_assignments", "layer_updates_per_iter"]
    assert data["num_slots"] == 12 and data["layer_updates_per_iter"] == 0
    assignments = data["initial_global_assignments"]
    assert list(assignments) == [3, 5, 60]  # int keys, as TensorRT-LLM's Dict[int, List[int]] wants
    assert [assignments[k] for k in (3, 5, 60)] == placement.phy2log.tolist()
    assert f"  60: {placement.phy2log[2].tolist()}\n" in target.read_text()  # one line per layer


def test_vllm_layout(tmp_path):
    placement = make_placement()
    data = json.loads(write_placement(placement, tmp_path / "map.json", format="vllm").read_text())
    assert data == {
        "num_layers": 3,
        "num_physical_experts": 12,
        "num_logical_experts": 8,
        "ep_size": 4,
        "layer_ids": [0, 1, 2],
        "physical_to_logical_map": placement.phy2log.tolist(),
    }


# Refusals when writing -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt, engine", [("sglang", "SGLang"), ("trtllm", "TensorRT-LLM"), ("vllm", "vLLM")])
def test_engines_refuse_empty_slots(tmp_path, fmt, engine):
    with pytest.raises(EplbError, match=f"{engine} cannot load a placement with empty slots"):
        write_placement(with_empty_slot(), tmp_path / f"p{SUFFIX[fmt]}", format=fmt)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "name, kwargs, needle",
    [
        ("p.txt", {}, "cannot infer the placement format"),
        ("p.json", {"format": "deepspeed"}, "unknown placement format 'deepspeed'"),
        ("p.yaml", {"format": "sglang"}, "name p.yaml \\*.json or \\*.pt"),
        ("p.json", {"format": "sglang", "layer_ids": [3, 4, 5]}, "SGLang reads row l as model layer l"),
        ("p.json", {"layer_ids": [0, 1]}, "2 layer ids for a placement of 3 layers"),
        ("p.json", {"layer_ids": [0, 1, 1]}, "distinct and non-negative"),
        ("p.json", {"layer_ids": [-1, 0, 1]}, "distinct and non-negative"),
        ("p.json", {"layer_ids": [0, 1.5, 2]}, "must be integers"),
        ("p.json", {"metadata": {"x": object()}}, "metadata cannot be written as JSON"),
        ("p.json", {"metadata": {"x": float("nan")}}, "metadata cannot be written as JSON"),
    ],
)
def test_bad_write_requests(tmp_path, name, kwargs, needle):
    with pytest.raises(EplbError, match=needle):
        write_placement(make_placement(), tmp_path / name, **kwargs)
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_old_placement(tmp_path):
    target = write_placement(make_placement(seed=1), tmp_path / "p.json")
    before = target.read_bytes()
    with pytest.raises(EplbError):
        write_placement(make_placement(seed=2), target, metadata={"bad": object()})
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.json"]


def test_missing_pyyaml_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(EplbError, match="pip install pyyaml"):
        write_placement(make_placement(), tmp_path / "p.yaml")


# Refusals when reading -----------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name, content, kwargs, needle",
    [
        ("init.json", {"physical_to_logical_map": [[0, 1]], "extra": 1}, {"num_gpus": 1}, "which SGLang rejects"),
        ("init.json", {"physical_to_logical_map": [[0, 1]]}, {}, "does not record the GPU count; pass num_gpus"),
        ("init.json", {"physical_to_logical_map": [[0, -1]]}, {"num_gpus": 1}, "negative expert ids"),
        ("init.json", {"physical_to_logical_map": [[0, 1], [0]]}, {"num_gpus": 1}, "not a \\[layers, slots\\] table"),
        ("init.json", {"physical_to_logical_map": [[0, 2, 2]]}, {"num_gpus": 1}, "no replica"),
        ("stats.json", {"logical_count": [[1, 2]]}, {}, "read it with eplb.io.read_load"),
        ("other.json", {"hello": 1}, {}, "not a placement file \\(found hello\\)"),
        ("other.json", [[0, 1]], {}, "not a placement file \\(found list\\)"),
        ("map.json", {"physical_to_logical_map": [[0, 1]], "num_logical_experts": 2}, {}, "lacks num_layers"),
        ("eplb.json", {"phy2log": [[0, 1]], "num_experts": 2}, {}, "lacks the key 'num_gpus'"),
    ],
)
def test_bad_placement_files(tmp_path, name, content, kwargs, needle):
    path = _write(tmp_path / name, json.dumps(content))
    with pytest.raises(EplbError, match=needle):
        read_placement(path, **kwargs)


def test_reader_checks_what_the_file_records(tmp_path):
    placement = make_placement()
    eplb_file = write_placement(placement, tmp_path / "p.json")
    with pytest.raises(EplbError, match="written for num_gpus=4, not 2"):
        read_placement(eplb_file, num_gpus=2)
    vllm_file = write_placement(placement, tmp_path / "v.json", format="vllm")
    with pytest.raises(EplbError, match="written for num_gpus=4, not 3"):
        read_placement(vllm_file, num_gpus=3)
    data = json.loads(vllm_file.read_text())
    data["num_layers"] = 7
    with pytest.raises(EplbError, match="says num_layers=7 but its map gives 3"):
        read_placement(_write(tmp_path / "v2.json", json.dumps(data)))


def test_sglang_pt_with_extra_keys_is_refused(tmp_path):
    path = tmp_path / "init.pt"
    torch.save({"physical_to_logical_map": torch.zeros(1, 2, dtype=torch.long), "note": "x"}, path)
    with pytest.raises(EplbError, match="note"):
        read_placement(path, num_gpus=1)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("num_slots: 2\ninitial_global_assignments:\n  0: [0, 1]\nextra: 1\n", "rejects \\(extra\\)"),
        ("num_slots: 3\ninitial_global_assignments:\n  0: [0, 1]\n", "assigns 2 slots but num_slots is 3"),
        ("num_slots: 2\ninitial_global_assignments:\n  layer0: [0, 1]\n", "not integers"),
        ("num_slots: 2\n", "no initial_global_assignments"),
        ("num_slots: [2\n", "not valid YAML"),
    ],
)
def test_bad_trtllm_files(tmp_path, text, needle):
    with pytest.raises(EplbError, match=needle):
        read_placement(_write(tmp_path / "lb.yaml", text), num_gpus=1)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(EplbError, match="nope.json does not exist"):
        read_placement(tmp_path / "nope.json")
    with pytest.raises(EplbError, match="not valid JSON"):
        read_placement(_write(tmp_path / "cut.json", '{"phy2log": [[0, 1'))
    with pytest.raises(EplbError, match="cannot read .* as a torch file"):
        read_placement(_write(tmp_path / "bad.pt", "not a pickle"), num_gpus=1)


# Model layers, updates per iteration, the layer-id warning -------------------------------------


def test_engine_file_without_layer_ids_warns(tmp_path):
    with pytest.warns(UserWarning, match="3 rows as model layers 0..2"):
        write_placement(make_placement(), tmp_path / "a.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_placement(make_placement(), tmp_path / "a.json")  # eplb records its layer ids itself
        write_placement(make_placement(), tmp_path / "b.pt", layer_ids=[0, 1, 2])


def test_vllm_file_has_the_moe_rows_only(tmp_path):
    placement = make_placement(num_layers=5)
    target = write_placement(placement, tmp_path / "v.json", format="vllm", layer_ids=[0, 1, 2, 3, 4],
                             dense_rows=[0, 1])
    file = read_placement_file(target)
    assert file.layer_ids == [2, 3, 4] and torch.equal(file.placement.phy2log, placement.phy2log[2:])
    sglang = read_placement_file(write_placement(placement, tmp_path / "s.pt", layer_ids=range(5), dense_rows=[0, 1]),
                                 num_gpus=4)
    assert sglang.placement.num_layers == 5  # SGLang keeps a row per model layer
    with pytest.raises(EplbError, match="every row is a dense layer"):
        write_placement(placement, tmp_path / "w.json", format="vllm", layer_ids=range(5), dense_rows=range(5))


def test_trtllm_gets_every_moe_layer_up_to_model_layers(tmp_path):
    placement = make_placement()
    target = write_placement(placement, tmp_path / "lb.yaml", layer_ids=[3, 4, 5], model_layers=8,
                             updates_per_iter=2)
    data = yaml.safe_load(target.read_text())
    assert list(data["initial_global_assignments"]) == [3, 4, 5, 6, 7]
    assert data["initial_global_assignments"][7] == [p % 8 for p in range(12)]
    assert data["initial_global_assignments"][3] == placement.phy2log[0].tolist()
    assert data["layer_updates_per_iter"] == 2


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"path": "a.pt", "model_layers": 61}, "61 rows, these are 3"),
    ({"path": "a.yaml", "model_layers": 2, "layer_ids": [0, 1, 2]}, "beyond a model of 2 layers"),
    ({"path": "a.pt", "updates_per_iter": 1}, "TensorRT-LLM setting"),
    ({"path": "a.yaml", "updates_per_iter": -1}, "updates_per_iter must be"),
])
def test_model_layers_and_updates_refusals(tmp_path, kwargs, match):
    path = tmp_path / kwargs.pop("path")
    with pytest.raises(EplbError, match=match):
        write_placement(make_placement(), path, **kwargs)
