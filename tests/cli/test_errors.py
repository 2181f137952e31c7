"""Issue 16's probes, in process: every bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

import eplb
from eplb import io
from tests.cli.helpers import cli, one_error_line, stats_file


@pytest.fixture
def stats(tmp_path):
    return str(stats_file(tmp_path))


@pytest.mark.parametrize(("argv", "needle"), [
    (["plan", "{stats}", "-g", "2", "-p", "9223372036854775808"], "size guard of 65536"),
    (["plan", "{stats}", "-g", "2", "-p", "100000000"], "size guard of 65536"),
    (["plan", "{stats}", "-g", "2", "-p", "8", "--nodes", "0"], "num_nodes must be a positive integer"),
    (["plan", "--gpus", "0"], "num_gpus must be a positive integer"),
    (["plan", "--nodes", "0"], "num_nodes must be a positive integer"),
    (["plan", "--groups", "0"], "num_groups must be a positive integer"),
    (["compare", "{stats}", "-g", "2", "-p", "2"], "2 slots cannot hold 4 experts"),
    (["compare", "{stats}", "-g", "7", "-p", "72"], "72 slots cannot be split evenly over 7 GPUs"),
    (["plan", "{stats}", "-g", "2", "-p", "8", "--top-k", "0"], "--top-k must be a positive integer"),
])
def test_bad_options_fail_up_front(stats, argv, needle):
    code, out, err = cli(*[a.format(stats=stats) for a in argv])
    assert code == 2 and out == ""
    assert needle in one_error_line(err)


def _placement_files(tmp_path):
    p = eplb.plan(torch.rand(2, 4, dtype=torch.float64), num_gpus=2, num_slots=8)
    io.write_placement(p, tmp_path / "e.json", format="eplb", layer_ids=[0, 1])
    io.write_placement(p, tmp_path / "t.yaml", format="trtllm", layer_ids=[0, 1])
    io.write_placement(p, tmp_path / "v.json", format="vllm", layer_ids=[0, 1])
    return (json.loads((tmp_path / "e.json").read_text()), yaml.safe_load((tmp_path / "t.yaml").read_text()),
            json.loads((tmp_path / "v.json").read_text()))


@pytest.mark.parametrize(("name", "edit", "needle"), [
    ("e47.json", lambda e, t, v: {**e, "num_gpus": 4.7}, "num_gpus is 4.7"),
    ("emeta.json", lambda e, t, v: {**e, "metadata": [1, 2]}, "not a valid placement file"),
    ("elid.json", lambda e, t, v: {**e, "layer_ids": False}, "not a valid placement file"),
    ("vnull.json", lambda e, t, v: {**v, "ep_size": None}, "not a valid placement file"),
    ("tnull.yaml", lambda e, t, v: {**t, "initial_global_assignments": {0: None, 1: [0, 1, 2, 3] * 2}},
     "not a valid placement file"),
])
def test_corrupt_current_placements(tmp_path, stats, name, edit, needle):
    data = edit(*_placement_files(tmp_path))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if name.endswith(".yaml") else json.dumps(data))
    code, _, err = cli("plan", stats, "-g", "2", "-p", "8", "--current", str(path))
    assert code == 2 and needle in one_error_line(err)


def test_current_layer_ids_must_match_the_statistics(tmp_path):
    stats = tmp_path / "s.json"
    stats.write_text(json.dumps({"layers": [5, 6], "domains": {"a": {"topk_counts": [[1, 2, 3, 4], [4, 3, 2, 1]]}}}))
    _placement_files(tmp_path)
    code, _, err = cli("plan", str(stats), "-g", "2", "-p", "8", "--current", str(tmp_path / "e.json"))
    assert code == 2 and "model layers [0, 1] but the statistics have [5, 6]" in one_error_line(err)


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    return path


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nests JSON too deeply"),
    ("lx.json", json.dumps({"layers": ["x"], "domains": {"a": {"topk_counts": [[1, 2]]}}}), "layer ids of"),
    ("huge.json", json.dumps({"layer_99999999999": {"activations": [1, 2]}}), "size guard of 4096"),
    ("it.json", json.dumps({"0_99999999999": [1, 2]}), "size guard of 4096"),
    ("bad.csv", "12,N/A,7\n1,2,3\n", "non-numeric cell 'N/A'"),
    ("meta.pt", {"logical_count": torch.ones(2, 4, device="meta")}, "meta tensor"),
    ("layers.json", json.dumps({"layers": True, "domains": {"a": {"topk_counts": [[1, 2]]}}}), "layer ids of"),
])
def test_corrupt_statistics(tmp_path, name, content, needle):
    path = _write(tmp_path / name, content)
    code, _, err = cli("plan", str(path), "-g", "2", "-p", "8")
    assert code == 2 and needle in one_error_line(err)


def test_sparse_tensors_are_the_same_counts(tmp_path):
    load = torch.rand(2, 4, dtype=torch.float64)
    sparse = _write(tmp_path / "sp.pt", {"logical_count": load.to_sparse()})
    dense = _write(tmp_path / "d.pt", {"logical_count": load})
    assert torch.equal(io.read_load(sparse).load, io.read_load(dense).load)


def test_csv_header_holds_names_only(tmp_path):
    path = _write(tmp_path / "h.csv", "e0,e1,e2\n1,2,3\n4,5,6\n")
    assert io.read_load(path).load.shape == (1, 2, 3)


def test_trtllm_rank_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"0_1": torch.ones(4)}, str(tmp_path / "rank0.safetensors"))
    save_file({"x": torch.ones(3, 3)}, str(tmp_path / "rank0_raw.safetensors"))  # not statistics: skipped
    assert io.read_load(tmp_path).load.shape == (1, 1, 4)
    save_file({"0_1": torch.ones(5)}, str(tmp_path / "rank1.safetensors"))
    code, _, err = cli("plan", str(tmp_path), "-g", "2", "-p", "8")
    assert code == 2 and "counts 5 experts for 0_1 but an earlier rank 4" in one_error_line(err)


def test_loads_keep_float64(tmp_path):
    csv = _write(tmp_path / "big.csv", "16777217,1e39\n")
    js = _write(tmp_path / "big.json", json.dumps({"logical_count": [[16777217, 1e39]]}))
    for path in (csv, js):
        assert io.read_load(path).load[0, 0].tolist() == [16777217.0, 1e39]


def test_round_trip_whatever_the_suffix(tmp_path, stats):
    out = tmp_path / "p.pt"
    code, text, _ = cli("plan", stats, "-g", "2", "-p", "8", "-f", "eplb", "-o", str(out), "--no-layers")
    assert code == 0 and f"wrote {out} (eplb format)" in text
    code, text, err = cli("plan", stats, "-g", "2", "-p", "8", "--current", str(out), "--no-layers")
    assert code == 0 and "0 slots change" in text, err


def test_output_writes_through_a_symlink(tmp_path, stats):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert cli("plan", stats, "-g", "2", "-p", "8", "-o", str(link))[0] == 0
    assert link.is_symlink() and io.read_placement(target).num_gpus == 2


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_output_refuses_a_pipe(tmp_path, stats):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    code, _, err = cli("plan", stats, "-g", "2", "-p", "8", "-o", str(fifo))
    assert code == 2 and "not a regular file" in one_error_line(err)
    assert fifo.is_fifo()


def test_plan_explains_its_columns(stats):
    code, text, _ = cli("plan", stats, "-g", "2", "-p", "8", "--no-layers")
    assert code == 0 and "gap to bound:" in text and "duplicates:" in text
