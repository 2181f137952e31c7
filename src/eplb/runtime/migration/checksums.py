"""A bit-exact checksum of byte rows, the same on every device whatever its reduction order.

The bytes of a row, zero-padded to whole 32-bit words ``w_i`` (signed, native little-endian),
give

    sum_i  wrap32(w_i * (2 i + 1))

where ``wrap32`` keeps a product's low 32 bits as a signed integer, and the sum is exact (int64).
It works for every dtype (fp8, int8, bf16, fp32: only bytes are read). Every weight is odd, so a
change of any one word changes its term and so the sum; the position weights make moved words
change it too (a reordering goes unseen only if the changed terms happen to cancel). Products
stay 32-bit and are summed exactly, so the cost is a read of the data and a pass over a 32-bit
temporary in torch (one read of the data in the Triton kernel of ``checksums_triton``), and
every device, backend and reduction order gives the same value.
"""

from __future__ import annotations

import torch

from eplb.errors import EplbError
from eplb.runtime.backend import use_triton

# Words per chunk of the computation, bounding its int32 temporaries: large on a GPU, where each
# chunk costs kernel launches (32 MiB each), small on a CPU, where it should stay in cache.
_CHUNK_WORDS = {"cuda": 1 << 23, "cpu": 1 << 16}
# Weights 2 i + 1 stay below 2**31 in int32.
_MAX_WORDS = 1 << 30


def checksum(rows: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``[R]`` int64 checksum of each row of ``rows [R, n]`` uint8 (rows contiguous, any row stride).

    ``backend``: ``"auto"``, ``"torch"`` or ``"triton"`` (the rule of ``eplb.runtime.backend``).
    """
    triton = use_triton(backend, rows.device)
    count, size = rows.shape
    out = torch.zeros(count, dtype=torch.int64, device=rows.device)
    if count == 0 or size == 0:
        return out
    if size > 4 * _MAX_WORDS:
        raise EplbError(f"a slot row of {size} bytes is too long to checksum (at most {4 * _MAX_WORDS} bytes)")
    whole = size // 4 * 4
    words = _words(rows[:, :whole]) if whole else rows.new_empty(count, 0, dtype=torch.int32)
    if size > whole:  # the last, partial word, zero-padded
        tail = torch.zeros(count, 4, dtype=torch.uint8, device=rows.device)
        tail[:, : size - whole] = rows[:, whole:]
        words = torch.cat([words, tail.view(torch.int32)], dim=1)
    if triton:
        from eplb.runtime.migration.checksums_triton import add_word_sums

        add_word_sums(words, out)
        return out
    width = max(1, _CHUNK_WORDS["cpu" if rows.device.type == "cpu" else "cuda"] // count)
    for start in range(0, words.shape[1], width):
        part = words[:, start : start + width]
        odd = torch.arange(2 * start + 1, 2 * (start + part.shape[1]), 2, dtype=torch.int32, device=rows.device)
        # int32 products wrap, as the definition's wrap32 does.
        out += (part * odd).sum(1, dtype=torch.int64)
    return out


def _words(rows: torch.Tensor) -> torch.Tensor:
    """``rows [R, 4 m]`` uint8 as ``[R, m]`` int32: a view where aligned, else an aligned copy."""
    try:
        return rows.view(torch.int32)
    except RuntimeError:  # a fresh tensor: clone() keeps odd strides of size-1 dimensions
        return torch.empty(rows.shape, dtype=torch.uint8, device=rows.device).copy_(rows).view(torch.int32)
