"""The Triton recorder kernels against the torch reference backend.

On CUDA the comparison runs in this process; on the CPU it runs in a child process under
Triton's interpreter (``TRITON_INTERPRET=1`` must be set before Triton compiles anything, so it
cannot be switched on inside a test process that may already hold compiled kernels).
Run this file as a script to do the comparison on the CPU interpreter by hand.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from eplb.runtime.recorder import ExpertLoadRecorder

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


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


@pytest.mark.slow
@needs_triton
def test_triton_kernels_match_torch_under_the_cpu_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_slots", [288, 256, 9])
def test_triton_kernels_match_torch_on_cuda(num_slots: int) -> None:
    # 16384 x 8 ids spread over many programs; 1 and 129 tokens leave partial blocks.
    compare_backends("cuda", sizes=(16384, 1, 129), num_slots=num_slots)


if __name__ == "__main__":
    # Small sizes: the interpreter runs a block per program in Python. 300 x 8 ids span 3 programs.
    compare_backends("cpu", sizes=(300, 1), num_slots=20)
    compare_backends("cpu", sizes=(5,), num_slots=32, steps=3)
    print("ok")
