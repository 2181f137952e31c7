"""Files of every format: corrupt ones end in one line and exit 2, never a traceback; every
writer/reader pair round-trips whatever the file is called."""

from __future__ import annotations

import io as _io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb import io
from eplb.errors import EplbError
from tests.cli.helpers import cli, one_error_line

_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_LOAD = torch.rand(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
_PLACEMENT = eplb.plan(_LOAD, num_gpus=2, num_slots=8)


def _valid_files() -> dict[str, bytes]:
    """One valid file of every statistics and placement layout, by name."""
    files = {
        "sglang.json": json.dumps({"logical_count": _LOAD.tolist()}).encode(),
        "layers.json": json.dumps({f"layer_{i + 3}": {"activations": row} for i, row in enumerate(_LOAD.tolist())}
                                  ).encode(),
        "domains.json": json.dumps({"layers": [0, 1], "domains": {"a": {"topk_counts": _LOAD.tolist()}}}).encode(),
        "load.csv": "\n".join(",".join(map(str, row)) for row in _LOAD.tolist()).encode(),
    }
    buf = _io.BytesIO()
    np.save(buf, _LOAD.numpy())
    files["load.npy"] = buf.getvalue()
    buf = _io.BytesIO()
    np.savez(buf, load=_LOAD.numpy())
    files["load.npz"] = buf.getvalue()
    buf = _io.BytesIO()
    torch.save({"logical_count": _LOAD}, buf)
    files["sglang.pt"] = buf.getvalue()
    from safetensors.torch import save

    files["rank0.safetensors"] = save({"0_1": _LOAD[0].float(), "0_2": _LOAD[1].float()})
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fmt, name in (("eplb", "p_eplb.json"), ("sglang", "p_sglang.pt"), ("trtllm", "p_trtllm.yaml"),
                          ("vllm", "p_vllm.json")):
            files[name] = io.write_placement(_PLACEMENT, Path(tmp) / name, format=fmt).read_bytes()
    return files


_FILES = _valid_files()
_KEYS = ["logical_count", "phy2log", "num_experts", "num_gpus", "num_nodes", "layers", "domains", "layer_ids",
         "metadata", "ep_size", "physical_to_logical_map", "num_layers", "topk_counts", "activations", "layer_2",
         "0_1", "format", "version", "initial_global_assignments", "num_slots"]
_SCALARS = st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.sampled_from(["", "x", "layer_1", "eplb.dump"])
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4), max_leaves=12)


@st.composite
def corrupt(draw):
    name = draw(st.sampled_from(sorted(_FILES)))
    data = _FILES[name]
    how = draw(st.sampled_from(["truncate", "bytes", "structure"] if name.endswith((".json", ".yaml"))
                               else ["truncate", "bytes"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "bytes":
        buf = bytearray(data)
        for at, value in draw(st.lists(st.tuples(st.integers(0, len(buf) - 1), st.integers(0, 255)),
                                       min_size=1, max_size=4)):
            buf[at] = value
        data = bytes(buf)
    else:
        tree = yaml.safe_load(data) if name.endswith(".yaml") else json.loads(data)
        key = draw(st.sampled_from(sorted(map(str, tree))))
        tree = {str(k): v for k, v in tree.items()}
        tree[key] = draw(_JSON)
        data = (yaml.safe_dump(tree) if name.endswith(".yaml") else json.dumps(tree)).encode()
    return name, data


@_SETTINGS
@given(corrupt(), st.booleans())
def test_corrupt_files_end_in_one_line(tmp_path_factory, case, as_current):
    name, data = case
    folder = tmp_path_factory.mktemp("corrupt")
    path = folder / name
    path.write_bytes(data)
    stats = folder / "stats.json"
    stats.write_bytes(_FILES["sglang.json"])
    argv = ["plan", str(stats), "--current", str(path)] if as_current else ["plan", str(path)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, _, err = cli(*argv, "-g", "2", "-p", "8", "--no-layers")
    assert code in (0, 2), err
    if code == 2:
        one_error_line(err)


@pytest.mark.parametrize("fmt", io.PLACEMENT_FORMATS)
@pytest.mark.parametrize("suffix", [".json", ".pt", ".yaml", ".yml", ".bin", ""])
def test_every_writer_round_trips_whatever_the_suffix(tmp_path, fmt, suffix):
    path = tmp_path / f"placement{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ids = [0, 1] if fmt == "sglang" else [3, 4]  # SGLang's rows are layers 0..L-1
            written = io.write_placement(_PLACEMENT, path, format=fmt, layer_ids=ids)
        except EplbError as exc:  # an engine that only reads some suffixes: refused with the reason
            assert fmt == "sglang" and ".json or .pt" in str(exc)
            return
    read = io.read_placement_file(written, num_gpus=2)
    assert read.format == fmt and read.placement == _PLACEMENT
    assert read.layer_ids == ids
