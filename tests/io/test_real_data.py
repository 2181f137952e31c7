"""The layouts of the real data sets beside the repository (skipped where ../shared is absent)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eplb.errors import EplbError
from eplb.io import example_path, read_load

SGLANG = "sglang-dsv3-ep-stats"
MMLU = "dsv3-0324-mmlu-expert-counts"
OLMOE = "olmoe-mixtral-routing-counts"


def test_sglang_files_keep_all_61_layers(real_data):
    files = sorted((real_data / SGLANG).glob("*.json"))
    assert len(files) == 8
    for path in files:
        got = read_load(path)
        expected = np.array(json.loads(path.read_text())["logical_count"], dtype=np.float64)
        assert got.source == "sglang" and got.load.shape == (1, 61, 256)
        assert np.array_equal(got.load[0].numpy(), expected)
        assert got.dense == [0, 1, 2] and got.layer_ids == list(range(61))


@pytest.mark.parametrize("seqlen", ["4k", "8k"])
def test_mmlu_rows_are_model_layer_ids(real_data, seqlen):
    path = real_data / MMLU / f"config_671B_expert_scores_seqlen_{seqlen}.json"
    got = read_load(path)
    data = json.loads(path.read_text())
    assert got.source == "layers" and got.load.shape == (1, 61, 256) and got.dense == [0, 1, 2]
    for layer in (3, 30, 60):
        assert got.load[0, layer].tolist() == data[f"layer_{layer}"]["activations"]


def test_bundled_example_equals_the_original_activations(real_data):
    original = read_load(real_data / MMLU / "config_671B_expert_scores_seqlen_8k.json")
    assert torch.equal(read_load(example_path()).load, original.load)


@pytest.mark.parametrize("model, experts", [("olmoe", 64), ("mistral", 8), ("olmoe-sft", 64), ("olmoe-dpo", 64)])
def test_domain_files(real_data, model, experts):
    path = real_data / OLMOE / f"{model}_expert_counts.json"
    data = json.loads(path.read_text())
    got = read_load(path)
    assert got.source == "domains" and got.layer_ids == [0, 7, 15]
    assert got.domains == sorted(data["domains"]) and got.load.shape == (len(data["domains"]), 3, experts)
    for step, domain in enumerate(got.domains):
        assert got.load[step].tolist() == data["domains"][domain]["topk_counts"]
    first = got.domains[0]
    assert torch.equal(read_load(f"{path}#{first}").load[0], got.load[0])
    with pytest.raises(EplbError, match=f"no domain 'nope'; choose one of: {', '.join(got.domains)}"):
        read_load(path, domain="nope")


def test_cross_layer_pair_files_are_refused(real_data):
    with pytest.raises(EplbError, match="read the matching \\*_expert_counts.json"):
        read_load(real_data / OLMOE / "olmoe_crosslayer_pairs.json")
