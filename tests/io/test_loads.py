"""read_load: every statistics layout read back exactly, and every bad file named with its fix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from eplb.errors import EplbError
from eplb.io import LoadFile, read_load


def counts(*shape: int, seed: int = 0) -> torch.Tensor:
    """Integer-valued float64 token counts."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, shape, generator=gen).to(torch.float64)


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def assert_loaded(got: LoadFile, expected: torch.Tensor, source: str) -> None:
    assert got.source == source
    assert got.load.dtype == torch.float64 and got.load.ndim == 3
    assert torch.equal(got.load, expected if expected.ndim == 3 else expected.unsqueeze(0))


# Plain arrays --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 6), (3, 4, 6)])
def test_json_list(tmp_path, shape):
    load = counts(*shape)
    got = read_load(write_json(tmp_path / "s.json", load.tolist()))
    assert_loaded(got, load, "array")
    assert got.layer_ids == [0, 1, 2, 3] and got.dense == [] and got.path == str(tmp_path / "s.json")
    assert (got.num_steps, got.num_layers, got.num_experts) == (1 if len(shape) == 2 else 3, 4, 6)


def test_json_dict_entries(tmp_path):
    a, b = counts(2, 4, seed=1), counts(2, 4, seed=2)
    assert_loaded(read_load(write_json(tmp_path / "one.json", {"anything": a.tolist()})), a, "array")
    both = write_json(tmp_path / "two.json", {"prefill": a.tolist(), "expert_load": b.tolist()})
    assert_loaded(read_load(both), b, "array")  # the known key wins
    assert_loaded(read_load(f"{both}#prefill"), a, "array")
    assert_loaded(read_load(both, domain="prefill"), a, "array")
    assert read_load(both, domain="prefill").metadata == {"entry": "prefill"}
    nested = write_json(tmp_path / "nested.json", {"prefill": {"logical_count": a.tolist()}, "decode": b.tolist()})
    got = read_load(nested, domain="prefill")
    assert_loaded(got, a, "sglang")
    assert got.metadata == {"entry": "prefill"}


def test_bare_arrays_have_no_layer_ids(tmp_path):
    got = read_load(write_json(tmp_path / "a.json", counts(4, 8).tolist()))
    assert got.layer_ids == [0, 1, 2, 3] and not got.has_layer_ids
    nested = read_load(write_json(tmp_path / "b.json", {"prefill": {"logical_count": counts(4, 8).tolist()}}))
    assert nested.has_layer_ids  # an SGLang dump inside an entry keeps its meaning


def test_csv_with_and_without_header(tmp_path):
    load = counts(3, 5)
    rows = "\n".join(",".join(f"{v:g}" for v in row) for row in load.tolist())
    (tmp_path / "plain.csv").write_text(rows + "\n")
    (tmp_path / "header.csv").write_text("e0,e1,e2,e3,e4\n" + rows + "\n\n")
    for name in ("plain.csv", "header.csv"):
        assert_loaded(read_load(tmp_path / name), load, "array")


def test_numpy_files(tmp_path):
    a, b = counts(3, 4, seed=1), counts(2, 3, 4, seed=2)
    np.save(tmp_path / "a.npy", a.numpy())
    assert_loaded(read_load(tmp_path / "a.npy"), a, "array")
    np.savez(tmp_path / "one.npz", whatever=b.numpy().astype(np.int32))
    assert_loaded(read_load(tmp_path / "one.npz"), b, "array")
    np.savez(tmp_path / "many.npz", first=a.numpy(), load=b.numpy())
    assert_loaded(read_load(tmp_path / "many.npz"), b, "array")
    assert_loaded(read_load(str(tmp_path / "many.npz") + "#first"), a, "array")


def test_torch_and_safetensors_files(tmp_path):
    a, b = counts(3, 4, seed=1), counts(3, 4, seed=2)
    torch.save(a.to(torch.int32), tmp_path / "t.pt")
    assert_loaded(read_load(tmp_path / "t.pt"), a, "array")
    torch.save({"counts": a, "other": b}, tmp_path / "d.pth")
    assert_loaded(read_load(tmp_path / "d.pth"), a, "array")
    save_file({"load": b.to(torch.bfloat16)}, tmp_path / "s.safetensors")
    assert_loaded(read_load(tmp_path / "s.safetensors"), b.to(torch.bfloat16).double(), "array")
    save_file({"x": a.contiguous(), "y": b.contiguous()}, tmp_path / "two.safetensors")
    assert_loaded(read_load(tmp_path / "two.safetensors", domain="y"), b, "array")


def test_other_names_are_read_by_content(tmp_path):
    load = counts(2, 3)
    write_json(tmp_path / "stats.txt", load.tolist())
    np.save(tmp_path / "n.npy", load.numpy())
    (tmp_path / "n.npy").rename(tmp_path / "stats.bin")
    np.savez(tmp_path / "z.npz", load=load.numpy())
    (tmp_path / "z.npz").rename(tmp_path / "stats.arc")
    torch.save({"logical_count": load}, tmp_path / "stats.ckpt")
    save_file({"load": load}, tmp_path / "stats.data")
    (tmp_path / "stats.dat").write_text("1,2,3\n4,5,6\n")
    for name in ("stats.txt", "stats.bin", "stats.arc", "stats.ckpt", "stats.data"):
        assert torch.equal(read_load(tmp_path / name).load[0], load), name
    assert read_load(tmp_path / "stats.dat").load.tolist() == [[[1, 2, 3], [4, 5, 6]]]


# Engine and dataset layouts ------------------------------------------------------------------


def test_sglang_dump_drops_unwritten_buffer_steps(tmp_path):
    recorded = counts(3, 4, 8).to(torch.int32)
    buffer = torch.zeros(5, 4, 8, dtype=torch.int32)
    buffer[[0, 1, 3]] = recorded
    buffer[:, 0] = 0  # a dense layer
    torch.save({"rank": 0, "logical_count": buffer, "average_utilization_rate_over_window": None}, tmp_path / "d.pt")
    got = read_load(tmp_path / "d.pt")
    assert_loaded(got, buffer[[0, 1, 3]].double(), "sglang")
    assert got.dense == [0] and got.metadata == {"rank": 0} and got.has_layer_ids  # a row per model layer


def test_eplb_recorder_dump(tmp_path):
    logical = counts(2, 3, 4)
    dump = {"format": "eplb.expert_load", "version": 1, "physical_count": counts(2, 3, 6), "window": 2}
    torch.save({**dump, "phy2log": torch.arange(6).repeat(3, 1) % 4, "logical_count": logical}, tmp_path / "d.pt")
    got = read_load(tmp_path / "d.pt")
    assert torch.equal(got.load, logical) and got.metadata["window"] == 2
    assert not got.has_layer_ids  # the EP layers' rows, not the model's
    torch.save(dump, tmp_path / "slots.pt")
    with pytest.raises(EplbError, match="holds slot loads only .* eplb.runtime.recorder.to_logical"):
        read_load(tmp_path / "slots.pt")


def test_sglang_json_keeps_every_layer(tmp_path):
    load = counts(6, 8)
    load[:3] = 0
    got = read_load(write_json(tmp_path / "s.json", {"logical_count": load.tolist()}))
    assert_loaded(got, load, "sglang")
    assert got.layer_ids == list(range(6)) and got.dense == [0, 1, 2]


def test_per_layer_counts_fill_the_missing_layers(tmp_path):
    rows = {3: counts(8, seed=3), 4: counts(8, seed=4), 6: counts(8, seed=6)}
    data = {f"layer_{i}": {"activations": row.tolist(), "scores": [0.5] * 8} for i, row in rows.items()}
    got = read_load(write_json(tmp_path / "mmlu.json", data))
    expected = torch.zeros(7, 8, dtype=torch.float64)
    for i, row in rows.items():
        expected[i] = row
    assert_loaded(got, expected, "layers")
    assert got.layer_ids == list(range(7)) and got.dense == [0, 1, 2, 5] and got.has_layer_ids


def test_domains_are_steps_in_sorted_order(tmp_path):
    by_domain = {name: counts(3, 8, seed=i) for i, name in enumerate(["wiki", "c4", "github"])}
    data = {
        "model": "m", "num_experts": 8, "top_k": 2, "layers": [0, 7, 15],
        "domains": {name: {"topk_counts": c.tolist(), "top1_counts": c.tolist()} for name, c in by_domain.items()},
    }
    path = write_json(tmp_path / "m_expert_counts.json", data)
    got = read_load(path)
    assert_loaded(got, torch.stack([by_domain[n] for n in ("c4", "github", "wiki")]), "domains")
    assert got.domains == ["c4", "github", "wiki"] and got.layer_ids == [0, 7, 15] and got.has_layer_ids
    assert got.metadata == {"model": "m", "num_experts": 8, "top_k": 2}
    one = read_load(f"{path}#github")
    assert_loaded(one, by_domain["github"], "domains")
    assert one.domains == ["github"]


def test_trtllm_statistics_file_and_rank_folder(tmp_path):
    layers, iterations = [3, 4, 60], [100, 101]
    per_rank = [
        {f"{i}_{layer}": counts(8, seed=r * 1000 + i * 10 + layer).int() for i in iterations for layer in layers}
        for r in range(2)
    ]
    for r, tensors in enumerate(per_rank):
        save_file(tensors, tmp_path / f"rank{r}.safetensors")
    (tmp_path / "meta_info.json").write_text('{"num_experts": 8, "num_experts_per_token": 2}')

    def stacked(tensors):
        return torch.stack([torch.stack([tensors[f"{i}_{layer}"] for layer in layers]) for i in iterations]).double()

    one = read_load(tmp_path / "rank0.safetensors")
    assert_loaded(one, stacked(per_rank[0]), "trtllm")
    assert one.layer_ids == layers and one.metadata == {"iterations": [100, 101]} and one.has_layer_ids
    folder = read_load(tmp_path)
    assert_loaded(folder, stacked(per_rank[0]) + stacked(per_rank[1]), "trtllm")


# Bad files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, needle",
    [
        ([[1.0, float("nan")]], "1 NaN or infinite"),
        ([[1, -2]], "1 negative entries"),
        ([1, 2, 3], "1 dimensions"),
        ([[[[1]]]], "4 dimensions"),
        ([], "1 dimensions"),
        ([[]], "is empty"),
        ([[1, 2], [3]], "not a numeric array"),
        ([["a", "b"]], "not a numeric array"),
        ({"physical_to_logical_map": [[0]]}, "holds a placement"),
        ({"records": [], "last_physical_to_logical_map": [[0]]}, "--expert-distribution-recorder-mode stat"),
        ({"logical_count": [[0, 0]]}, "recorded no expert activations"),
        ({"a": [[1]], "b": [[2]]}, "none of them a known load key .* select one with .*#NAME"),
        ({}, "holds nothing"),
        ({"layer_3": {"scores": [1.0]}}, "layer_3 of .* has no activations"),
        ({"layer_3": [[1, 2]]}, "nested activations"),
        ({"layer_3": [1, 2], "layer_4": [1]}, "count \\[1, 2\\] experts"),
        ({"100_3": [1, 2], "101_4": [1, 2]}, "lacks 2 iteration_layer entries"),
        ({"1_3": [1, 2], "1_4": [1, 2, 3]}, "different lengths"),
        ({"layer_pairs": [[0, 7]], "domains": {"c4": {"pairs_topk": []}}}, "cross-layer expert pairs"),
        ({"domains": {"c4": {"top1_counts": [[1]]}}}, "domain 'c4' .* has no topk_counts"),
        ({"domains": {"a": {"topk_counts": [[1, 2]]}, "b": {"topk_counts": [[1, 2, 3]]}}}, "every domain must"),
        ({"domains": {}}, "must map each domain name"),
        ({"layers": [0, 7], "domains": {"a": {"topk_counts": [[1, 2]]}}}, "lists 2 layer ids for 1 rows"),
    ],
)
def test_bad_json_content(tmp_path, content, needle):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(content))
    with pytest.raises(EplbError, match=needle) as info:
        read_load(path)
    assert "s.json" in str(info.value)


def test_selector_errors(tmp_path):
    olmoe = write_json(tmp_path / "o.json", {"layers": [0], "domains": {"c4": {"topk_counts": [[1, 2]]},
                                                                        "arxiv": {"topk_counts": [[2, 1]]}}})
    with pytest.raises(EplbError, match="no domain 'wiki'; choose one of: arxiv, c4"):
        read_load(olmoe, domain="wiki")
    with pytest.raises(EplbError, match="no domain 'wiki'"):
        read_load(f"{olmoe}#wiki")
    with pytest.raises(EplbError, match="selects 'c4' but domain='arxiv'"):
        read_load(f"{olmoe}#c4", domain="arxiv")
    with pytest.raises(EplbError, match="names no part"):
        read_load(f"{olmoe}#")
    plain = write_json(tmp_path / "p.json", [[1, 2]])
    with pytest.raises(EplbError, match="no part 'x' to select; drop '#x'"):
        read_load(f"{plain}#x")
    entries = write_json(tmp_path / "e.json", {"a": [[1]], "b": [[2]]})
    with pytest.raises(EplbError, match="no entry 'c'; choose one of: a, b"):
        read_load(entries, domain="c")


def test_a_real_file_name_with_hash_is_read_as_is(tmp_path):
    path = write_json(tmp_path / "run#2.json", [[1, 2]])
    assert read_load(path).load.tolist() == [[[1, 2]]]
    with pytest.raises(EplbError, match="run#3/s.json does not exist"):
        read_load(tmp_path / "run#3" / "s.json")


def test_bad_files(tmp_path):
    with pytest.raises(EplbError, match="missing.json does not exist"):
        read_load(tmp_path / "missing.json")
    (tmp_path / "cut.json").write_text('[[1, 2')
    with pytest.raises(EplbError, match="cut.json is not valid JSON"):
        read_load(tmp_path / "cut.json")
    (tmp_path / "x.csv").write_text("1,2\n3,oops\n")
    with pytest.raises(EplbError, match="non-numeric cell 'oops' in data row 2"):
        read_load(tmp_path / "x.csv")
    (tmp_path / "nan.csv").write_text("1,nan\n")
    with pytest.raises(EplbError, match="NaN"):
        read_load(tmp_path / "nan.csv")
    (tmp_path / "blob.xyz").write_bytes(b"\x00\x01\x02 binary")
    with pytest.raises(EplbError, match="cannot tell the format of .*blob.xyz"):
        read_load(tmp_path / "blob.xyz")
    for name in ("bad.pt", "bad.npy", "bad.safetensors"):
        (tmp_path / name).write_bytes(b"garbage")
        with pytest.raises(EplbError, match=f"cannot read .*{name}"):
            read_load(tmp_path / name)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EplbError, match="without TensorRT-LLM statistics"):
        read_load(tmp_path / "empty")


def test_missing_safetensors_is_named(tmp_path, monkeypatch):
    save_file({"load": torch.ones(2, 2)}, tmp_path / "s.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(EplbError, match="pip install safetensors"):
        read_load(tmp_path / "s.safetensors")
