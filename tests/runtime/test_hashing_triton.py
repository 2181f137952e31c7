"""The Triton hash against the torch and integer ones, bit for bit (``kernel_harness``)."""

from __future__ import annotations

import pytest
import torch

from eplb.runtime.hashing import UNIFORM_BITS, entry_hash, layer_key, mix32, mix32_int
from tests.runtime.kernel_harness import KERNEL_DEVICES, run_check

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from eplb.runtime import hashing_triton  # noqa: E402  (imports triton)

BLOCK = 1024
# Words whose hash crosses every sign and carry edge of int32 / uint32 arithmetic.
EDGES = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0x80000001, 0xFFFFFFFE, 0xFFFFFFFF, 123456789, 0xDEADBEEF]


@triton.jit
def _hash_kernel(words_ptr, mixed_ptr, hashed_ptr, uniform_ptr, n, key, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    words = tl.load(words_ptr + offs, mask=inside, other=0)
    tl.store(mixed_ptr + offs, hashing_triton.mix32(words.to(tl.uint32)).to(tl.int64), mask=inside)
    h = hashing_triton.entry_hash(offs, key)
    tl.store(hashed_ptr + offs, h.to(tl.int64), mask=inside)
    tl.store(uniform_ptr + offs, hashing_triton.uniform(h), mask=inside)


def check_hash(device: str) -> None:
    """``mix32`` of edge words, and ``h(i, l)`` and its uniform over two blocks for keys on both
    sides of ``2**31``, as torch computes them."""
    n = 2 * BLOCK - 3
    words = torch.tensor(EDGES + list(range(n - len(EDGES))), dtype=torch.int64, device=device)
    assert mix32(words[: len(EDGES)]).tolist() == [mix32_int(w) for w in EDGES]
    for key in (layer_key(0, 0), layer_key(3, 7), 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF):
        mixed, hashed, uniform = (torch.empty(n, dtype=torch.int64, device=device) for _ in range(3))
        _hash_kernel[(triton.cdiv(n, BLOCK),)](words, mixed, hashed, uniform, n, key, BLOCK=BLOCK)
        expected = entry_hash(n, key, torch.device(device))
        assert torch.equal(mixed, mix32(words)), "mix32"
        assert torch.equal(hashed, expected), f"entry_hash, key {key:#x}"
        assert torch.equal(uniform, expected >> (32 - UNIFORM_BITS)), f"uniform, key {key:#x}"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_triton_hash_is_the_torch_hash(device: str) -> None:
    run_check(check_hash, device)
