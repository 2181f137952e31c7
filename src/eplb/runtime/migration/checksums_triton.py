"""The migration's Triton kernels: ``checksums.checksum``, and a row copy that checksums what it reads.

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
def _terms(word, index):
    """``wrap32(w_i * (2 i + 1))`` of words at positions ``index``, as int64."""
    return (word.to(tl.uint32, bitcast=True) * (2 * index + 1).to(tl.uint32)).to(tl.int32, bitcast=True).to(tl.int64)


@triton.jit
def _checksum_kernel(words_ptr, row_stride, num_words, out_ptr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * (BLOCK * BLOCKS)
    total = tl.zeros([BLOCK], dtype=tl.int64)
    for b in range(BLOCKS):
        index = first + b * BLOCK + tl.arange(0, BLOCK)
        word = tl.load(words_ptr + row * row_stride + index, mask=index < num_words, other=0)
        total += _terms(word, index)
    tl.atomic_add(out_ptr + row, tl.sum(total, axis=0))


@triton.jit
def _copy_rows_kernel(src_ptr, src_stride, src_index_ptr, dst_ptr, dst_stride, dst_index_ptr, sums_ptr, sums_stride,
                      num_words, CHECKSUM: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    row = tl.program_id(0)
    src = src_ptr + tl.load(src_index_ptr + row).to(tl.int64) * src_stride
    dst = dst_ptr + tl.load(dst_index_ptr + row).to(tl.int64) * dst_stride
    first = tl.program_id(1) * (BLOCK * BLOCKS)
    total = tl.zeros([BLOCK], dtype=tl.int64)
    for b in range(BLOCKS):
        index = first + b * BLOCK + tl.arange(0, BLOCK)
        inside = index < num_words
        word = tl.load(src + index, mask=inside, other=0)
        tl.store(dst + index, word, mask=inside)
        if CHECKSUM:
            total += _terms(word, index)
    if CHECKSUM:
        tl.atomic_add(sums_ptr + row.to(tl.int64) * sums_stride, tl.sum(total, axis=0))


def add_word_sums(words: torch.Tensor, out: torch.Tensor) -> None:
    """Add each row's ``sum_i wrap32(w_i * (2 i + 1))`` of ``words [R, m]`` int32 (unit column
    stride) to ``out [R]`` int64."""
    count, num_words = words.shape
    if count == 0 or num_words == 0:
        return
    grid = (count, triton.cdiv(num_words, BLOCK * BLOCKS_PER_PROGRAM))
    _checksum_kernel[grid](words, words.stride(0), num_words, out, BLOCK=BLOCK, BLOCKS=BLOCKS_PER_PROGRAM)


def copy_word_rows(dst: torch.Tensor, dst_index: torch.Tensor, src: torch.Tensor, src_index: torch.Tensor,
                   sums: torch.Tensor | None) -> None:
    """``dst[dst_index[r]] = src[src_index[r]]`` for int32 word rows ``[*, m]`` (unit column stride), in one
    launch; with ``sums [R]`` int64 (zeroed by the caller), add each copied row's word sums (as
    ``add_word_sums``) to ``sums[r]``, from the words read."""
    count, num_words = dst_index.numel(), src.shape[1]
    if count == 0 or num_words == 0:
        return
    grid = (count, triton.cdiv(num_words, BLOCK * BLOCKS_PER_PROGRAM))
    _copy_rows_kernel[grid](
        src, src.stride(0), src_index, dst, dst.stride(0), dst_index,
        sums if sums is not None else dst_index, sums.stride(0) if sums is not None else 0, num_words,
        CHECKSUM=sums is not None, BLOCK=BLOCK, BLOCKS=BLOCKS_PER_PROGRAM,
    )
