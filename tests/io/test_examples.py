"""The bundled example loads: always present, packaged, and read as the credits file says."""

from __future__ import annotations

import json

import pytest
import torch

from eplb.errors import EplbError
from eplb.io import DEFAULT_EXAMPLE, EXAMPLES, example_path, read_example


def test_every_example_is_packaged_with_its_credits():
    for name in EXAMPLES:
        path = example_path(name)
        assert path.is_file() and path.suffix == ".json"  # pyproject ships eplb/data/*.json and *.md
    credits = (example_path().parent / "README.md").read_text()
    for name, file in EXAMPLES.items():
        assert file in credits and f"`{name}`" in credits


def test_default_example_is_deepseek_v3_mmlu():
    got = read_example()
    assert DEFAULT_EXAMPLE == "deepseek-v3-mmlu" and got.source == "layers"
    assert got.load.shape == (1, 61, 256)
    assert got.dense == [0, 1, 2] and got.layer_ids == list(range(61))
    # Every token picks 8 experts in every MoE layer: the per-layer totals the upstream README gives.
    assert torch.all(got.load[0, 3:].sum(-1) == 12_843_488)
    # The counts left in the file are the activations only, in the original layout.
    assert set(json.loads(example_path().read_text())["layer_3"]) == {"activations"}


def test_olmoe_example_domains():
    every = read_example("olmoe")
    assert every.domains == ["arxiv", "book", "c4", "github", "tulu", "wikipedia"]
    assert every.load.shape == (6, 3, 64) and every.layer_ids == [0, 7, 15]
    c4 = read_example("olmoe", domain="c4")
    assert torch.equal(c4.load[0], every.load[2])
    assert torch.all(c4.load.sum(-1) == 208_896 * 8)  # 208,896 tokens, top-8


def test_unknown_example():
    with pytest.raises(EplbError, match="unknown example 'mixtral'; choose one of: deepseek-v3-mmlu, olmoe"):
        example_path("mixtral")
