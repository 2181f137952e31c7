"""The Triton checksum against the torch one, bit for bit (``kernel_harness``)."""

from __future__ import annotations

import pytest
import torch

from eplb.runtime.migration import checksum
from tests.runtime.kernel_harness import KERNEL_DEVICES, run_check

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
