"""The migration's Triton kernels against torch, bit for bit (``kernel_harness``)."""

from __future__ import annotations

import pytest
import torch

from eplb.runtime.migration import ExpertWeights, MigrationConfig, checksum, migrate
from eplb.runtime.migration.transfer import copy_rows
from tests.runtime.kernel_harness import KERNEL_DEVICES, run_check
from tests.runtime.migration.harness import canonical, corrupted_slots, make_weights, random_placement
from tests.runtime.migration.test_local import FP8

pytest.importorskip("triton")


def check_checksum(device: str) -> None:
    """Rows that are strided and misaligned, end in a partial word, and span several programs."""
    gen = torch.Generator().manual_seed(0)
    for count, size in ((1, 3), (3, 4099), (1, 4 * 16384 + 6)):
        padded = torch.randint(0, 256, (count, size + 7), generator=gen, dtype=torch.uint8)
        rows = padded.to(device)[:, 1 : size + 1]
        assert torch.equal(checksum(rows, "triton").cpu(), checksum(padded[:, 1 : size + 1], "torch"))
    assert checksum(torch.empty(0, 8, dtype=torch.uint8, device=device), "triton").numel() == 0


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_triton_checksum_matches_torch(device: str) -> None:
    run_check(check_checksum, device)


def check_copy_rows(device: str) -> None:
    """The fused copy-and-checksum against torch: gathers (pack) and scatters (commit), rows of several
    programs, a slot-strided source, and rows that are not whole words (the torch path either way)."""
    gen = torch.Generator().manual_seed(1)
    for size in (16, 4 * 16384 + 8, 6):
        base = torch.randint(0, 256, (5, size + 8), generator=gen, dtype=torch.uint8).to(device)
        src = base[:, :size]  # slot stride size + 8
        for dst_index, src_index in (([0, 1, 2], [4, 0, 2]), ([3, 0], [1, 1])):
            got, want = (torch.zeros(4, size, dtype=torch.uint8, device=device) for _ in range(2))
            sums_got, sums_want = (torch.full((len(src_index),), 7, dtype=torch.int64, device=device) for _ in range(2))
            copy_rows(got, dst_index, src, src_index, sums_got, "triton")
            copy_rows(want, dst_index, src, src_index, sums_want, "torch")
            assert torch.equal(got, want) and torch.equal(sums_got, sums_want)
            assert torch.equal(got[dst_index[0]], src[src_index[0]])
            assert torch.equal(sums_want, checksum(src[src_index], "torch"))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_triton_copy_rows_matches_torch(device: str) -> None:
    run_check(check_copy_rows, device)


def check_migrate(device: str) -> None:
    """Whole local migrations of fp8 weights with scales through the Triton kernels: bit exact."""
    gen = torch.Generator().manual_seed(3)
    canon = canonical(2, 6, FP8)
    current = random_placement(gen, 2, 6, 9, 1)
    weights, _ = make_weights(canon, current, 0, FP8)
    weights = ExpertWeights([{k: v.to(device) for k, v in weights.tensors(layer).items()} for layer in range(2)])
    for _ in range(5):
        new = random_placement(gen, 2, 6, 9, 1)
        migrate(weights, current, new, config=MigrationConfig(backend="triton"))
        cpu = ExpertWeights([{k: v.cpu() for k, v in weights.tensors(layer).items()} for layer in range(2)])
        assert corrupted_slots(cpu, canon, new, 0) == 0
        current = new


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_triton_migrations_are_bit_exact(device: str) -> None:
    run_check(check_migrate, device)
