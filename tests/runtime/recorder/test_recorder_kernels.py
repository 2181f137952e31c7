"""The Triton recorder kernels against the torch reference backend (``kernel_harness``: on CUDA,
and on the CPU under Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

from eplb.runtime.recorder import ExpertLoadRecorder
from tests.runtime.kernel_harness import KERNEL_DEVICES, run_check

# (tokens per call, slots, steps) per device: on CUDA 16384 x 8 ids spread over many programs and
# 1 and 129 tokens leave partial blocks; the interpreter runs a block per program in Python, so
# small sizes there (300 x 8 ids span 3 programs).
SIZES = {
    "cuda": [((16384, 1, 129), 288, 5), ((16384, 1, 129), 256, 5), ((16384, 1, 129), 9, 5)],
    "cpu": [((300, 1), 20, 5), ((5,), 32, 3)],
}


def compare_backends(device: str, sizes: tuple[int, ...], num_slots: int, steps: int = 5) -> None:
    """Feed the same calls to a Triton and a torch recorder; assert every buffer matches."""
    gen = torch.Generator().manual_seed(num_slots)
    layers, window = 2, 3
    triton_rec, torch_rec = (
        ExpertLoadRecorder(layers, num_slots, window, device=device, decay=0.9, backend=backend)
        for backend in ("triton", "torch")
    )
    assert triton_rec.backend == "triton"
    dtypes = (torch.int64, torch.int32, torch.int16)
    local = min(num_slots, 7)
    for step in range(steps):
        if step == steps - 2:
            for rec in (triton_rec, torch_rec):
                rec.stop()
        if step == steps - 1:
            for rec in (triton_rec, torch_rec):
                rec.start()
        for layer in range(layers):
            for i, tokens in enumerate(sizes):
                ids = torch.randint(-1, num_slots + 3, (tokens, 8), generator=gen).to(dtypes[i % len(dtypes)])
                counts = torch.randint(0, 1000, (local,), generator=gen).to(dtypes[(i + 1) % len(dtypes)])
                for rec in (triton_rec, torch_rec):
                    rec.record_topk(layer, ids.to(device))
                    rec.record_counts(layer, counts.to(device), first_slot=num_slots - local)
        for rec in (triton_rec, torch_rec):
            rec.step()
    assert triton_rec.num_steps == torch_rec.num_steps == steps - 1
    assert torch.equal(triton_rec.ring, torch_rec.ring)
    assert torch.equal(triton_rec.current, torch_rec.current)
    assert torch.allclose(triton_rec.decayed, torch_rec.decayed)
    assert triton_rec.loads().sum() > 0


def check_kernels(device: str) -> None:
    for sizes, num_slots, steps in SIZES[device]:
        compare_backends(device, sizes, num_slots, steps)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_triton_kernels_match_torch(device: str) -> None:
    run_check(check_kernels, device)
