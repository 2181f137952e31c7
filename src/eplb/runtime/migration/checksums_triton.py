"""``checksums.checksum`` as one Triton kernel: the words are read once, no temporaries.

Imported only where used (triton is optional). The products are uint32 (a wrap modulo ``2**32``
is defined there), reinterpreted as int32 and summed exactly in int64; integer atomics make the
per-row total independent of the programs' order, so it equals the torch twin's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
BLOCKS_PER_PROGRAM = 16


@triton.jit
def _checksum_kernel(words_ptr, row_stride, num_words, out_ptr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * (BLOCK * BLOCKS)
    total = tl.zeros([BLOCK], dtype=tl.int64)
    for b in range(BLOCKS):
        index = first + b * BLOCK + tl.arange(0, BLOCK)
        inside = index < num_words
        word = tl.load(words_ptr + row * row_stride + index, mask=inside, other=0)
        term = word.to(tl.uint32, bitcast=True) * (2 * index + 1).to(tl.uint32)
        total += term.to(tl.int32, bitcast=True).to(tl.int64)
    tl.atomic_add(out_ptr + row, tl.sum(total, axis=0))


def add_word_sums(words: torch.Tensor, out: torch.Tensor) -> None:
    """Add each row's ``sum_i wrap32(w_i * (2 i + 1))`` of ``words [R, m]`` int32 (unit column
    stride) to ``out [R]`` int64."""
    count, num_words = words.shape
    if count == 0 or num_words == 0:
        return
    grid = (count, triton.cdiv(num_words, BLOCK * BLOCKS_PER_PROGRAM))
    _checksum_kernel[grid](words, words.stride(0), num_words, out, BLOCK=BLOCK, BLOCKS=BLOCKS_PER_PROGRAM)
