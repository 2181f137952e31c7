"""eplb as vLLM's EPLB policy: the adapter always; against vLLM's own policy where vLLM is importable
(``python scripts/interop.py`` makes it so)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import eplb
from eplb.cli import run
from eplb.integrations import vllm
from eplb.integrations.vllm import EplbPolicy, LegacyEplbPolicy, PolicyInputError, install
from eplb.io.placements import read_placement, write_placement
from eplb.placement import Placement

WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                       [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def _vllm_default():
    policy = pytest.importorskip("vllm.distributed.eplb.policy.default",
                                 reason="vLLM is not importable: run scripts/interop.py")
    return policy.DefaultEplbPolicy


def test_deepseek_mode_is_the_reference_policy_with_its_fallback():
    for groups, nodes in ((4, 2), (3, 2), (1, 1)):
        got = EplbPolicy.rebalance_experts(WEIGHT, 16, groups, nodes, 8)
        assert torch.equal(got, eplb.rebalance_experts(WEIGHT, 16, groups, nodes, 8)[0])


def test_old_placement_keeps_experts_in_their_slots_and_balance():
    old = EplbPolicy.rebalance_experts(WEIGHT, 16, 4, 2, 8)
    new = EplbPolicy.rebalance_experts(WEIGHT.flip(1), 16, 4, 2, 8, old)
    free = EplbPolicy.rebalance_experts(WEIGHT.flip(1), 16, 4, 2, 8)
    for rank in range(8):
        cols = slice(2 * rank, 2 * rank + 2)
        assert sorted(new[:, cols].flatten().tolist()) == sorted(free[:, cols].flatten().tolist())
    stays = (new == old).sum()
    assert stays >= (free == old).sum()


def test_move_budget_bounds_the_changed_slots():
    old = EplbPolicy.rebalance_experts(WEIGHT, 16, 4, 2, 8)
    policy = EplbPolicy.configure("eplb", max_moves=2)
    new = policy.rebalance_experts(WEIGHT.flip(1), 16, 4, 2, 8, old)
    assert ((new != old).sum(1) <= 2).all()
    Placement(new, num_experts=12, num_gpus=8)  # a valid placement


def test_preserve_intragpu_slots_keeps_staying_experts_and_the_multiset():
    old = np.array([[0, 1, 0, 2, 3, 4, 5, 6, 1, 2]])
    new = np.array([[0, 5, 4, 0, 1, 6, 2, 3, 2, 1]])
    post = EplbPolicy.preserve_intragpu_slots(new, 2, old)
    assert post.tolist() == [[0, 1, 0, 5, 4, 3, 2, 6, 1, 2]]
    assert EplbPolicy.preserve_intragpu_slots(new, 2, old[:, :8]) is new  # EP size changed: untouched


def test_bad_counts_raise_what_vllm_callers_catch():
    with pytest.raises(AssertionError, match="multiple of the EP size"):
        EplbPolicy.rebalance_experts(WEIGHT, 15, 4, 2, 8)
    assert issubclass(PolicyInputError, eplb.EplbError)


def test_legacy_interface_returns_fixed_width_maps():
    phy2log, log2phy, logcnt = LegacyEplbPolicy.rebalance_experts(WEIGHT, 16, 4, 2, 8)
    assert log2phy.shape == (2, 12, 5) and logcnt.sum(1).tolist() == [16, 16]
    for layer in range(2):
        for expert in range(12):
            slots = [s for s in log2phy[layer, expert].tolist() if s >= 0]
            assert sorted(slots) == (phy2log[layer] == expert).nonzero().flatten().tolist()


def test_same_balance_and_slot_keeping_as_vllm_default_policy():
    # vLLM's numpy port breaks some ties unlike the reference (eplb follows the reference), so
    # the placements (and on near-ties the peak GPU loads, slightly) may differ.
    default = _vllm_default()
    rng = np.random.default_rng(0)
    for _ in range(20):
        weight = torch.from_numpy(rng.permutation(48).reshape(2, 24).astype(np.float32) * 7 + 1)
        for groups, nodes, ranks in ((8, 2, 8), (3, 2, 4), (4, 4, 8)):
            want = default.rebalance_experts(weight, 32, groups, nodes, ranks)
            got = EplbPolicy.rebalance_experts(weight, 32, groups, nodes, ranks)
            loads = [Placement(p, num_experts=24, num_gpus=ranks).gpu_load(weight.double()).max(-1).values
                     for p in (got, want)]
            assert torch.allclose(*loads, rtol=0.02)  # near-ties may go either way
            old = want.roll(3, 1).numpy()
            assert (EplbPolicy.preserve_intragpu_slots(got.numpy(), ranks, old).tolist()
                    == default.preserve_intragpu_slots(got.numpy(), ranks, old).tolist())


def test_install_replaces_the_policy_vllm_selects():
    policies = pytest.importorskip("vllm.distributed.eplb.policy",
                                   reason="vLLM is not importable: run scripts/interop.py")
    before = policies.EPLB_POLICIES["default"]
    try:
        installed = install("auto", max_moves=4)
        assert policies.EPLB_POLICIES["default"] is installed
        assert installed.max_moves == 4 and issubclass(installed, EplbPolicy)
        phy2log = policies.EPLB_POLICIES["default"].rebalance_experts(WEIGHT, 16, 4, 2, 8)
        assert phy2log.shape == (2, 16)
    finally:
        policies.EPLB_POLICIES["default"] = before


def test_initial_placement_is_the_first_rearrangement(tmp_path):
    first = eplb.plan(WEIGHT.flip(1), num_gpus=8, num_slots=16)
    path = write_placement(first, tmp_path / "v.json", format="vllm", layer_ids=[3, 4])
    policy = EplbPolicy.configure("auto", initial=read_placement(path).phy2log)
    assert torch.equal(policy.rebalance_experts(WEIGHT, 16, 4, 2, 8), first.phy2log)
    assert torch.equal(policy.rebalance_experts(WEIGHT, 16, 4, 2, 8),
                       EplbPolicy.configure("auto").rebalance_experts(WEIGHT, 16, 4, 2, 8))
    wrong = EplbPolicy.configure(initial=first.phy2log[:1])
    with pytest.raises(PolicyInputError, match="MoE layers"):
        wrong.rebalance_experts(WEIGHT, 16, 4, 2, 8)


def test_plugin_installs_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(vllm, "install", lambda *args: calls.append(args))
    monkeypatch.delenv(vllm.ALGORITHM_ENV, raising=False)
    vllm.plugin()
    assert calls == []
    monkeypatch.setenv(vllm.ALGORITHM_ENV, "eplb")
    monkeypatch.setenv(vllm.MAX_MOVES_ENV, "3")
    vllm.plugin()
    assert calls == [("eplb", 3, None)]


def test_vllm_format_replaces_the_map_vllm_builds(tmp_path):
    eplb_state = pytest.importorskip("vllm.distributed.eplb.eplb_state",
                                     reason="vLLM is not importable: run scripts/interop.py")
    policies = pytest.importorskip("vllm.distributed.eplb.policy")
    # Statistics with a row per model layer, the first two dense (as SGLang records DeepSeek-V3's).
    load = torch.cat([torch.zeros(2, 12, dtype=torch.float64), WEIGHT.double()])
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"logical_count": load.tolist()}))
    target = tmp_path / "v.json"
    argv = ["plan", str(stats), "--gpus", "8", "--slots", "16", "--no-layers", "-o", str(target), "-f", "vllm"]
    assert run(argv) == 0
    written = read_placement(target).phy2log
    # vLLM's own start: one linear row per MoE layer (EplbState.add_model).
    start = torch.tensor(eplb_state.EplbState.build_initial_global_physical_to_logical_map(12, 4)).expand(2, -1)
    assert written.shape == start.shape
    before = policies.EPLB_POLICIES["default"]
    try:
        install("eplb", initial=target)
        # vLLM's first rearrangement: its load window and map have one row per MoE layer.
        first = policies.EPLB_POLICIES["default"].rebalance_experts(WEIGHT, 16, 4, 1, 8, start)
        assert torch.equal(first, written)
    finally:
        policies.EPLB_POLICIES["default"] = before
