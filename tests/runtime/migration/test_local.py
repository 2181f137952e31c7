"""One process: registration checks, the checksum, and migrations within one GPU (local copies only)."""

from __future__ import annotations

import pytest
import torch

from eplb import EplbError, Placement
from eplb.runtime.migration import ExpertWeights, MigrationConfig, checksum, migrate, transfer
from eplb.runtime.migration import checksums as checksum_module
from tests.runtime.migration.harness import FP8, canonical, corrupted_slots, make_weights, random_placement

# Registration -------------------------------------------------------------------------------


def test_registration_keeps_the_engine_tensors_and_sizes_a_slot() -> None:
    w13, scale = torch.zeros(4, 6, 8, dtype=torch.bfloat16), torch.zeros(4, 3)
    weights = ExpertWeights([{"w13": w13, "scale": scale}, {"w13": torch.zeros(4, 2)}])
    assert weights.tensors(0)["w13"] is w13 and weights.byte_rows(0)[0].data_ptr() == w13.data_ptr()
    assert weights.bytes_per_slot(0) == 6 * 8 * 2 + 3 * 4 and weights.bytes_per_slot(1) == 8
    assert weights.layout(0).row_bytes % 16 == 0


def test_a_slot_strided_tensor_is_written_in_place() -> None:
    big = torch.zeros(2, 2, 5)
    big[:, 0] = torch.tensor([[1.0] * 5, [2.0] * 5])
    view = big[:, 0]  # rows contiguous, slot stride 10
    old = Placement(torch.tensor([[0, 1]]), 2, 1)
    new = Placement(torch.tensor([[1, 0]]), 2, 1)
    migrate(ExpertWeights([{"w": view}]), old, new)
    assert big[0, 0].tolist() == [2.0] * 5 and big[1, 0].tolist() == [1.0] * 5
    assert (big[:, 1] == 0).all()


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        ({"w": torch.zeros(4, 3)}, "one {name: tensor} dict per MoE layer"),
        ([], "non-empty list"),
        ([{}], "layer 0 of ExpertWeights"),
        ([{"w": torch.zeros(4, 3)}, {"w": torch.zeros(5, 3)}], "has 5 slots but other tensors have 4"),
        ([{"w": torch.zeros(3, 4).t()}], "slot rows that are not contiguous"),
        ([{"w": torch.zeros(())}], "leading slot dim"),
        ([{"w": [1, 2]}], "not a torch.Tensor"),
    ],
)
def test_registration_errors_name_the_fix(layers, match) -> None:
    with pytest.raises(EplbError, match=match):
        ExpertWeights(layers)


def test_bad_calls_are_refused_before_anything_moves() -> None:
    old = Placement(torch.tensor([[0, 1, 2, 3]]), 4, 2)
    weights = ExpertWeights([{"w": torch.zeros(2, 3)}])
    with pytest.raises(EplbError, match="init_process_group"):
        migrate(weights, old, old)
    one = Placement(torch.tensor([[0, 1]]), 2, 1)
    with pytest.raises(EplbError, match="1 layers x 2 local slots but the placement has 2 layers"):
        two = Placement(torch.tensor([[0, 1], [1, 0]]), 2, 1)
        migrate(weights, two, two)
    with pytest.raises(EplbError, match="distinct layer rows"):
        migrate(weights, one, one, layers=[1])
    with pytest.raises(EplbError, match="differ in num_gpus"):
        migrate(weights, one, Placement(torch.tensor([[0, 1]]), 2, 2))
    for bad in ({"timeout_s": 0}, {"max_peers": 0}, {"staging_bytes": -1}, {"verify": 1}, {"chunk_bytes": 0.5}):
        with pytest.raises(EplbError):
            MigrationConfig(**bad)


# Checksum --------------------------------------------------------------------------------------


def _reference(row: bytes) -> int:
    row += bytes(-len(row) % 4)
    words = [int.from_bytes(row[i : i + 4], "little", signed=True) for i in range(0, len(row), 4)]
    wrapped = [(w * (2 * i + 1)) % 2**32 for i, w in enumerate(words)]
    return sum(p - 2**32 if p >= 2**31 else p for p in wrapped)


def test_checksum_is_the_documented_sum_and_catches_any_flip_or_swap(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 256, (5, 4099), generator=gen, dtype=torch.uint8)
    got = checksum(rows)
    assert got.tolist() == [_reference(bytes(r.tolist())) for r in rows]
    # Chunks, strided rows and misaligned rows give the same sums.
    monkeypatch.setattr(checksum_module, "_CHUNK_WORDS", {"cpu": 64, "cuda": 64})
    assert torch.equal(checksum(rows), got)
    wide = torch.zeros(5, 4200, dtype=torch.uint8)
    wide[:, 1:4100] = rows
    assert torch.equal(checksum(wide[:, 1:4100]), got) and torch.equal(checksum(wide[[4, 0], 1:4100]), got[[4, 0]])
    assert torch.equal(checksum(wide[2:3, 1:4100]), got[2:3])  # one row: size-1 dims keep odd strides
    flipped = rows.clone()
    flipped[2, 4098] ^= 1
    assert (checksum(flipped) != got).tolist() == [False, False, True, False, False]
    swapped = rows.clone()
    swapped[3, :4], swapped[3, 8:12] = rows[3, 8:12], rows[3, :4]
    assert checksum(swapped)[3] != got[3]


# Migrations within one GPU --------------------------------------------------------------------


def test_local_migrations_are_bit_exact_for_fp8_nan_patterns_and_keep_addresses() -> None:
    gen = torch.Generator().manual_seed(1)
    canon = canonical(2, 6, FP8)
    current = random_placement(gen, 2, 6, 9, 1)
    weights, tensors = make_weights(canon, current, 0, FP8)
    addresses = [t.data_ptr() for named in tensors for t in named.values()]
    for _ in range(20):
        new = random_placement(gen, 2, 6, 9, 1)
        report = migrate(weights, current, new)
        assert corrupted_slots(weights, canon, new, 0) == 0
        assert report.remote_receives == 0 and report.bytes_sent == 0 and report.serving == new
        current = new
    assert [t.data_ptr() for named in tensors for t in named.values()] == addresses


@pytest.mark.parametrize("verify", [True, False])
def test_warm_up_runs_the_migration_kernels_and_keeps_every_byte(monkeypatch, verify) -> None:
    canon = canonical(2, 6, FP8)
    current = random_placement(torch.Generator().manual_seed(2), 2, 6, 9, 1)
    weights, _ = make_weights(canon, current, 0, FP8)
    calls = []
    monkeypatch.setattr(transfer, "checksum", lambda rows, backend: calls.append(rows.shape) or checksum(rows))
    transfer.warm_up(weights, rows=4, verify=verify)
    assert corrupted_slots(weights, canon, current, 0) == 0
    # Both sides' checksums: on each layer's source slot and on its staged row, per tensor.
    assert len(calls) == (2 * 2 * len(FP8) if verify else 0)


def test_unchanged_slots_are_not_written() -> None:
    old = Placement(torch.tensor([[0, 1, 2, 1]]), 3, 1)
    new = Placement(torch.tensor([[0, 2, 2, 1]]), 3, 1)
    w = torch.tensor([[10.0], [11.0], [12.0], [99.0]])  # slot 3 holds "expert 1" but not its bytes
    migrate(ExpertWeights([{"w": w}]), old, new)
    assert w.flatten().tolist() == [10.0, 12.0, 12.0, 99.0]


def test_inference_tensors_migrate_too() -> None:
    with torch.inference_mode():
        w = torch.arange(4.0).view(4, 1)
    migrate(ExpertWeights([{"w": w}]), Placement(torch.tensor([[0, 1, 2, 3]]), 4, 1),
            Placement(torch.tensor([[3, 2, 1, 0]]), 4, 1))
    assert w.flatten().tolist() == [3.0, 2.0, 1.0, 0.0]


def test_a_staging_bound_splits_layers_into_committed_valid_steps() -> None:
    gen = torch.Generator().manual_seed(2)
    canon = canonical(2, 6, FP8)
    current = random_placement(gen, 2, 6, 12, 1)
    weights, _ = make_weights(canon, current, 0, FP8)
    row = weights.layout(0).row_bytes
    seen = []
    for _ in range(10):
        new = random_placement(gen, 2, 6, 12, 1)
        try:
            report = migrate(weights, current, new, config=MigrationConfig(staging_bytes=4 * row),
                             on_commit=lambda layer, r: seen.append((layer, r)))
        except EplbError as exc:
            assert "raise MigrationConfig.staging_bytes to at least" in str(exc)
            report = migrate(weights, current, new)
        for _, r in seen:
            Placement(r[None], 6, 1)  # each step switches to a valid row
        assert corrupted_slots(weights, canon, new, 0) == 0 and report.serving == new
        current = new
    assert len(seen) > 20  # more steps than layers: the bound split them


def test_on_commit_reports_each_layer_row_in_order() -> None:
    old = Placement(torch.tensor([[0, 1], [0, 1], [0, 1]]), 2, 1)
    new = Placement(torch.tensor([[1, 0], [0, 1], [1, 0]]), 2, 1)
    calls = []
    report = migrate(ExpertWeights([{"w": torch.zeros(2, 1)}] * 1 + [{"w": torch.zeros(2, 1)}] * 2), old, new,
                     layers=[2, 1, 0], on_commit=lambda layer, row: calls.append((layer, row.tolist())))
    assert calls == [(2, [1, 0]), (0, [1, 0])]
    assert report.layers_committed == [2, 1, 0] and report.moves == 4 and report.steps == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_migrations_stage_on_a_side_stream_and_commit_in_place() -> None:
    gen = torch.Generator().manual_seed(3)
    canon = canonical(2, 6, FP8)
    current = random_placement(gen, 2, 6, 9, 1)
    weights, tensors = make_weights(canon, current, 0, FP8)
    cuda = [{name: t.cuda() for name, t in named.items()} for named in tensors]
    weights = ExpertWeights(cuda)
    addresses = [t.data_ptr() for named in cuda for t in named.values()]
    side = torch.cuda.Stream()
    for _ in range(10):
        new = random_placement(gen, 2, 6, 9, 1)
        migrate(weights, current, new, stream=side)
        torch.cuda.synchronize()
        host = ExpertWeights([{name: t.cpu() for name, t in named.items()} for named in cuda])
        assert corrupted_slots(host, canon, new, 0) == 0
        current = new
    assert [t.data_ptr() for named in cuda for t in named.values()] == addresses
    rows = torch.randint(0, 256, (3, 1001), dtype=torch.uint8, generator=gen)
    assert torch.equal(checksum(rows.cuda()).cpu(), checksum(rows))


@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_copy_index_rows_start_on_16_bytes(count) -> None:
    # The Triton kernel is compiled per pointer alignment: both index rows must align alike on every call.
    index = transfer.copy_index(range(count), range(5, 5 + count), torch.device("cpu"))
    assert index.tolist() == [list(range(count)), list(range(5, 5 + count))]
    assert index[0].data_ptr() % 16 == 0 and index[1].data_ptr() % 16 == 0
