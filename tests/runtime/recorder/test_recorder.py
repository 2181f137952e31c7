"""ExpertLoadRecorder on the torch path against plain references, and under CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch

from eplb import EplbError, ExpertLoadRecorder, Placement

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def reference_counts(ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    flat = ids.reshape(-1).to(torch.int64)
    return torch.bincount(flat[(flat >= 0) & (flat < num_slots)], minlength=num_slots).to(torch.int32)


def random_ids(gen: torch.Generator, tokens: int, top_k: int, num_slots: int, dtype=torch.int64) -> torch.Tensor:
    # -1 is padding; ids past the last slot must be skipped as well.
    return torch.randint(-1, num_slots + 2, (tokens, top_k), generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_record_topk_counts_each_valid_id_once(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    rec = ExpertLoadRecorder(2, 12, window=3, device="cpu")
    ids = random_ids(gen, 50, 4, 12, dtype)
    rec.record_topk(1, ids)
    rec.record_topk(1, ids[:7])
    assert torch.equal(rec.current[1], reference_counts(ids, 12) + reference_counts(ids[:7], 12))
    assert not rec.current[0].any()


def test_record_counts_adds_into_the_rank_slice() -> None:
    rec = ExpertLoadRecorder(2, 8, window=2, device="cpu")
    rec.record_counts(0, torch.tensor([1, 2], dtype=torch.int64), first_slot=4)
    rec.record_counts(0, [3, 4], first_slot=4)  # DeepEP normal mode hands a Python list
    rec.record_counts(1, torch.tensor([5, 6, 7, 8], dtype=torch.int32), first_slot=4)
    assert rec.current.tolist() == [[0, 0, 0, 0, 4, 6, 0, 0], [0, 0, 0, 0, 5, 6, 7, 8]]


def test_window_keeps_the_last_steps_oldest_first_after_wraparound() -> None:
    gen = torch.Generator().manual_seed(1)
    window, layers, slots = 3, 2, 6
    rec = ExpertLoadRecorder(layers, slots, window=window, device="cpu")
    history = []
    for _ in range(7):
        row = torch.zeros(layers, slots, dtype=torch.int32)
        for layer in range(layers):
            ids = random_ids(gen, 20, 2, slots)
            rec.record_topk(layer, ids)
            row[layer] = reference_counts(ids, slots)
        rec.step()
        history.append(row)
        assert torch.equal(rec.loads(), torch.stack(history[-window:]))
        assert not rec.current.any()
    assert rec.num_steps == 7


def test_stop_makes_records_and_steps_no_ops_until_start() -> None:
    rec = ExpertLoadRecorder(1, 4, window=4, device="cpu", decay=0.5, num_experts=4, coactivation=True)
    rec.record_topk(0, torch.tensor([[0, 1]]))
    rec.step()
    rec.stop()
    assert not rec.enabled
    rec.record_topk(0, torch.tensor([[2, 3]]))
    rec.record_counts(0, torch.tensor([9]), first_slot=3)
    rec.record_coactivation(0, torch.tensor([[2, 3]]))
    rec.step()
    assert rec.num_steps == 1 and not rec.current.any() and not rec.coactivation.any()
    rec.start()
    rec.record_topk(0, torch.tensor([[3, 3]]))
    rec.step()
    assert rec.loads().tolist() == [[[1, 1, 0, 0]], [[0, 0, 0, 2]]]


def test_decay_folds_every_closed_step() -> None:
    gen = torch.Generator().manual_seed(2)
    rec = ExpertLoadRecorder(2, 5, window=2, device="cpu", decay=0.95)
    expected = torch.zeros(2, 5, dtype=torch.float64)
    for _ in range(6):
        for layer in range(2):
            rec.record_topk(layer, random_ids(gen, 30, 2, 5))
        closing = rec.current.to(torch.float64)
        rec.step()
        expected = 0.95 * expected + closing
    assert torch.allclose(rec.decayed_loads(), expected.to(torch.float32))


def test_reset_clears_everything_in_place() -> None:
    rec = ExpertLoadRecorder(1, 4, window=2, device="cpu", decay=0.9)
    ring_address = rec.ring.data_ptr()
    rec.record_topk(0, torch.tensor([[1, 2]]))
    rec.step()
    rec.record_topk(0, torch.tensor([[3]]))
    rec.reset()
    assert rec.num_steps == 0 and rec.loads().shape == (0, 1, 4)
    assert not rec.current.any() and not rec.decayed.any() and rec.ring.data_ptr() == ring_address


def test_logical_loads_follow_the_placement() -> None:
    placement = Placement(torch.tensor([[0, 1, 2, 0], [1, 2, 0, 2]]), num_experts=3, num_gpus=2)
    rec = ExpertLoadRecorder(2, 4, window=4, device="cpu")
    rec.record_topk(0, torch.tensor([[0, 3], [1, 2]]))
    rec.record_topk(1, torch.tensor([[1, 3], [3, -1]]))
    rec.step()
    assert rec.logical_loads(placement).tolist() == [[[2, 1, 1], [0, 0, 3]]]
    assert torch.equal(rec.logical_loads(placement.phy2log), rec.logical_loads(placement))


def test_coactivation_counts_pairs_in_logical_or_physical_ids() -> None:
    phy2log = torch.tensor([[0, 1, 2, 1]])
    rec = ExpertLoadRecorder(1, 4, window=1, device="cpu", num_experts=3, coactivation=True)
    rec.record_coactivation(0, torch.tensor([[0, 3], [2, -1]]), phy2log=phy2log)  # physical
    rec.record_coactivation(0, torch.tensor([[0, 1]]))  # logical
    expected = torch.zeros(3, 3, dtype=torch.int32)
    for picks in ([0, 1], [2], [0, 1]):
        for i in picks:
            for j in picks:
                expected[i, j] += 1
    assert torch.equal(rec.coactivation[0], expected)


def test_balancedness_reports_the_window_on_the_device() -> None:
    rec = ExpertLoadRecorder(1, 4, window=4, device="cpu")
    for ids in ([0, 0, 0, 0], [0, 2], [1, 3]):  # GPU loads (4, 0), (1, 1), (1, 1)
        rec.record_topk(0, torch.tensor([ids]))
        rec.step()
    got = rec.balancedness(slots_per_gpu=2, sizes=(1, 3))
    assert got[1].tolist() == pytest.approx([1.0])
    assert got[3].tolist() == pytest.approx([(0.5 + 1.0 + 1.0) / 3])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_layers=0, num_slots=4, window=2), "num_layers must be"),
        (dict(num_layers=1, num_slots=4, window=2, decay=1.5), r"decay must be in \(0, 1\]"),
        (dict(num_layers=1, num_slots=4, window=2, coactivation=True), "pass num_experts"),
        (dict(num_layers=1, num_slots=4, window=2, backend="cuda"), "backend must be one of"),
        (dict(num_layers=1, num_slots=4, window=2, backend="triton"), "use backend='torch'"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict, match: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(EplbError, match=match):
        ExpertLoadRecorder(device="cpu", **kwargs)


def test_hot_path_rejects_bad_calls_without_recording() -> None:
    rec = ExpertLoadRecorder(2, 4, window=2, device="cpu")
    with pytest.raises(EplbError, match="layer 2 is outside"):
        rec.record_topk(2, torch.tensor([[0]]))
    with pytest.raises(EplbError, match="dtype torch.float32"):
        rec.record_topk(0, torch.tensor([[0.0]]))
    with pytest.raises(EplbError, match="fall outside"):
        rec.record_counts(0, torch.tensor([1, 1]), first_slot=3)
    with pytest.raises(EplbError, match="coactivation=True"):
        rec.record_coactivation(0, torch.tensor([[0]]))
    with pytest.raises(EplbError, match="decay=0.95"):
        rec.decayed_loads()
    with pytest.raises(EplbError, match="fmt='eplb'"):
        rec.dump("x.pt", fmt="csv")
    assert not rec.current.any()


@pytest.mark.gpu
@needs_cuda
def test_record_topk_rejects_ids_on_another_device() -> None:
    rec = ExpertLoadRecorder(1, 4, window=2, device="cuda")
    with pytest.raises(EplbError, match="move it there"):
        rec.record_topk(0, torch.tensor([[0]]))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_replay_matches_eager_recording(backend: str) -> None:
    layers, slots, window, tokens, top_k, local = 3, 40, 4, 256, 8, 10
    gen = torch.Generator().manual_seed(3)
    graphed = ExpertLoadRecorder(layers, slots, window, device="cuda", decay=0.9, backend=backend)
    eager = ExpertLoadRecorder(layers, slots, window, device="cuda", decay=0.9, backend="torch")
    ids = torch.full((tokens, top_k), -1, dtype=torch.int32, device="cuda")
    counts = torch.zeros(local, dtype=torch.int64, device="cuda")

    def forward(rec: ExpertLoadRecorder) -> None:
        for layer in range(layers):
            rec.record_topk(layer, ids)
            rec.record_counts(layer, counts, first_slot=local * layer)
        rec.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward(graphed)  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graphed.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward(graphed)
    torch.cuda.synchronize()
    assert graphed.num_steps == 0, "capturing must not record"

    for replay in range(7):
        ids.copy_(random_ids(gen, tokens, top_k, slots, torch.int32))
        counts.copy_(torch.randint(0, 100, (local,), generator=gen))
        if replay == 3:
            graphed.stop()
            eager.stop()
        if replay == 4:
            graphed.start()
            eager.start()
        graph.replay()
        forward(eager)
    torch.cuda.synchronize()
    assert graphed.num_steps == eager.num_steps == 6
    assert torch.equal(graphed.loads(), eager.loads())
    assert torch.allclose(graphed.decayed_loads(), eager.decayed_loads())
