"""Recorder dumps: eplb and SGLang formats, written by eplb.io.dumps and read back by eplb.io.read_load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eplb import EplbError, ExpertLoadRecorder, Placement, plan
from eplb.io import read_load
from eplb.io.dumps import save_sglang


@pytest.fixture
def recorded() -> tuple[ExpertLoadRecorder, Placement]:
    gen = torch.Generator().manual_seed(4)
    placement = Placement(torch.tensor([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 3]]), num_experts=4, num_gpus=2)
    rec = ExpertLoadRecorder(2, 6, window=3, device="cpu", decay=0.95)
    for _ in range(5):
        for layer in range(2):
            rec.record_topk(layer, torch.randint(-1, 6, (40, 2), generator=gen))
        rec.step()
    return rec, placement


def test_eplb_dump_round_trips_the_window_and_metadata(tmp_path: Path, recorded) -> None:
    rec, placement = recorded
    rec.dump(tmp_path / "load.pt", phy2log=placement, rank=3)
    got = read_load(tmp_path / "load.pt")
    assert torch.equal(got.load, rec.logical_loads(placement).double())
    assert got.metadata["steps"] == 5 and got.metadata["window"] == 3 and got.metadata["rank"] == 3
    assert got.metadata["decay"] == 0.95 and got.metadata["format"] == "eplb.expert_load"
    raw = torch.load(tmp_path / "load.pt", weights_only=True)  # what read_load does not return
    assert torch.equal(raw["physical_count"], rec.loads())
    assert torch.equal(raw["phy2log"], placement.phy2log)
    assert torch.equal(raw["decayed"], rec.decayed)
    assert not list(tmp_path.glob("*.tmp")), "the atomic write leaves no temp file"


def test_eplb_dump_without_placement_holds_slot_loads_only(tmp_path: Path, recorded) -> None:
    rec, _ = recorded
    rec.dump(tmp_path / "load.pt")
    raw = torch.load(tmp_path / "load.pt", weights_only=True)
    assert "logical_count" not in raw and "phy2log" not in raw
    assert torch.equal(raw["physical_count"], rec.loads())
    with pytest.raises(EplbError, match="slot loads only.*phy2log"):
        read_load(tmp_path / "load.pt")


def test_sglang_dump_has_sglang_keys_and_reads_back(tmp_path: Path, recorded) -> None:
    rec, placement = recorded
    rec.dump(tmp_path / "sg.pt", fmt="sglang", phy2log=placement)
    raw = torch.load(tmp_path / "sg.pt", weights_only=True)  # how SGLang reads it
    assert set(raw) == {"rank", "logical_count", "average_utilization_rate_over_window"}
    assert raw["logical_count"].dtype == torch.int32 and raw["logical_count"].shape == (3, 2, 4)
    got = read_load(tmp_path / "sg.pt")
    assert got.source == "sglang" and torch.equal(got.load, rec.logical_loads(placement).double())
    with pytest.raises(EplbError, match="pass phy2log"):
        rec.dump(tmp_path / "x.pt", fmt="sglang")
    with pytest.raises(EplbError, match="ends? in .pt"):
        rec.dump(tmp_path / "sg.json", fmt="sglang", phy2log=placement)


def test_eplb_dump_is_also_an_sglang_init_expert_location(tmp_path: Path, recorded) -> None:
    rec, placement = recorded
    rec.dump(tmp_path / "load.pt", phy2log=placement)
    raw = torch.load(tmp_path / "load.pt", weights_only=True)
    # SGLang pins a placement given as physical_to_logical_map; ours must plan from the counts.
    assert "physical_to_logical_map" not in raw
    assert torch.equal(raw["logical_count"], rec.logical_loads(placement))


def test_dumped_history_feeds_the_planner(tmp_path: Path, recorded) -> None:
    rec, placement = recorded
    rec.dump(tmp_path / "load.pt", phy2log=placement)
    new = plan(read_load(tmp_path / "load.pt").load, num_gpus=2, num_slots=6)
    assert new.num_experts == 4 and new.num_slots == 6


def test_real_sglang_statistics_round_trip(tmp_path: Path, real_data: Path) -> None:
    src = real_data / "sglang-dsv3-ep-stats" / "prefill_in4096.json"
    count = torch.tensor(json.loads(src.read_text())["logical_count"], dtype=torch.int32)
    save_sglang(tmp_path / "dsv3.pt", count)
    got = read_load(tmp_path / "dsv3.pt")
    assert got.load.shape == (1, 61, 256) and torch.equal(got.load[0], count.double())


def test_read_load_rejects_dumps_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(EplbError, match="does not exist"):
        read_load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(EplbError, match="cannot read .* as a torch file"):
        read_load(tmp_path / "junk.pt")
    torch.save({"records": []}, tmp_path / "detail.pt")
    with pytest.raises(EplbError, match="mode stat"):
        read_load(tmp_path / "detail.pt")
    torch.save({"format": "eplb.expert_load", "version": 99, "logical_count": torch.ones(1, 2, 4)}, tmp_path / "f.pt")
    with pytest.raises(EplbError, match="eplb dump version 99, this eplb reads version 1; upgrade eplb"):
        read_load(tmp_path / "f.pt")
    torch.save({"format": "eplb.expert_load", "version": 1, "steps": 3}, tmp_path / "cut.pt")
    with pytest.raises(EplbError, match="lacks physical_count; it is truncated"):
        read_load(tmp_path / "cut.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(EplbError, match="1 dimensions"):
        read_load(tmp_path / "tensor.pt")
