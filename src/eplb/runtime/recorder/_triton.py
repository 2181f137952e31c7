"""The Triton recorder backend: same functions and arguments as ``eplb.runtime.recorder._torch``.

Each kernel reads the on/off flag (and, for ``close_step``, the step index) from device
memory, so a captured CUDA graph follows ``start()`` / ``stop()`` without being re-captured.
Imported only when the Triton backend is chosen: the package imports without Triton.
Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (kernels then take no
loop with a runtime trip count, which the interpreter cannot run; one block per program).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Ids per program of the top-k histogram: a block is read once and binned in shared memory, so
# larger blocks mean fewer global atomics, smaller ones more programs reading in parallel. Tuned
# on an H100 under graph replay (docs/benchmarks/recorder.md): 16K x 8 ids ran fastest as 64
# programs of 2048 ids with 8 warps; 128 x 8 ids as one program of 1024 ids with 4 warps.
_MIN_IDS_PER_PROGRAM = 1024
_MAX_IDS_PER_PROGRAM = 2048
_TARGET_PROGRAMS = 64
_COPY_BLOCK = 1024


@triton.jit
def _record_topk_kernel(ids_ptr, num_ids, row_ptr, enabled_ptr, num_slots,
                        BLOCK: tl.constexpr, BINS: tl.constexpr):
    if tl.load(enabled_ptr) != 0:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_ids, other=-1)
        # Compare in the ids' own dtype: a cast first could wrap a huge id into range.
        valid = (ids >= 0) & (ids < num_slots)
        hist = tl.histogram(ids.to(tl.int32), BINS, mask=valid)
        bins = tl.arange(0, BINS)
        # One atomic per touched slot per block instead of one per id.
        tl.atomic_add(row_ptr + bins, hist, mask=(bins < num_slots) & (hist > 0), sem="relaxed")


@triton.jit
def _record_counts_kernel(counts_ptr, num, dst_ptr, enabled_ptr, BLOCK: tl.constexpr):
    if tl.load(enabled_ptr) != 0:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < num
        counts = tl.load(counts_ptr + offs, mask=mask, other=0)
        # Atomic so that two streams (two-batch overlap) may record the same layer.
        tl.atomic_add(dst_ptr + offs, counts.to(tl.int32), mask=mask, sem="relaxed")


@triton.jit
def _close_step_kernel(current_ptr, ring_ptr, decayed_ptr, steps_ptr, enabled_ptr, numel, window, decay,
                       HAS_DECAY: tl.constexpr, BLOCK: tl.constexpr):
    if tl.load(enabled_ptr) != 0:
        row = tl.load(steps_ptr) % window
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        counts = tl.load(current_ptr + offs, mask=mask, other=0)
        tl.store(ring_ptr + row * numel + offs, counts, mask=mask)
        if HAS_DECAY:
            acc = tl.load(decayed_ptr + offs, mask=mask, other=0.0)
            tl.store(decayed_ptr + offs, acc * decay + counts.to(tl.float32), mask=mask)
        tl.store(current_ptr + offs, tl.zeros_like(counts), mask=mask)


def topk_launch(num_ids: int) -> tuple[int, int]:
    """``(ids per program, warps per program)`` of the top-k kernel for ``num_ids`` ids."""
    want = triton.next_power_of_2(triton.cdiv(num_ids, _TARGET_PROGRAMS))
    block = max(_MIN_IDS_PER_PROGRAM, min(_MAX_IDS_PER_PROGRAM, want))
    return block, 8 if block >= 2048 else 4


def record_topk(row: torch.Tensor, ids: torch.Tensor, enabled: torch.Tensor) -> None:
    """See ``eplb.runtime.recorder._torch.record_topk``."""
    num_ids = ids.numel()
    if num_ids == 0:
        return
    block, warps = topk_launch(num_ids)
    _record_topk_kernel[(triton.cdiv(num_ids, block),)](
        ids, num_ids, row, enabled, row.shape[0],
        BLOCK=block, BINS=triton.next_power_of_2(row.shape[0]), num_warps=warps,
    )


def record_counts(dst: torch.Tensor, counts: torch.Tensor, enabled: torch.Tensor) -> None:
    """See ``eplb.runtime.recorder._torch.record_counts``."""
    num = counts.numel()
    block = min(triton.next_power_of_2(num), 1024)
    _record_counts_kernel[(triton.cdiv(num, block),)](counts, num, dst, enabled, BLOCK=block)


def close_step(
    current: torch.Tensor,
    ring: torch.Tensor,
    steps: torch.Tensor,
    enabled: torch.Tensor,
    decayed: torch.Tensor | None,
    decay: float,
) -> None:
    """See ``eplb.runtime.recorder._torch.close_step``."""
    numel = current.numel()
    _close_step_kernel[(triton.cdiv(numel, _COPY_BLOCK),)](
        current, ring, current if decayed is None else decayed, steps, enabled, numel, ring.shape[0],
        float(decay), HAS_DECAY=decayed is not None, BLOCK=_COPY_BLOCK,
    )
    # A second launch: every program of the kernel must read the old step index first.
    steps.add_(enabled)
