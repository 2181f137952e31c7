"""The remap as one Triton kernel (imported on first GPU use; triton is optional).

It computes exactly what ``eplb.runtime.dispatch.reference.remap_torch`` computes, in one pass over the
routed entries: the policy is a compile-time constant, the tables stay in L2, and uint32
arithmetic gives the same hash bit for bit. On CPU tensors it runs under the Triton
interpreter, which is how it is tested without a GPU.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import triton
import triton.language as tl

from eplb.runtime.dispatch.reference import Mode
from eplb.runtime.hashing import MUL1, MUL2, UNIFORM_BITS

BLOCK = 1024
# Kernels may read only constexpr globals. Literals in [2**31, 2**32) are typed uint32, so
# every product below stays uint32 and wraps like the reference.
_MUL1 = tl.constexpr(MUL1)
_MUL2 = tl.constexpr(MUL2)
_UNIFORM_BITS = tl.constexpr(UNIFORM_BITS)


def _remap_kernel(
    ids_ptr, out_ptr, slots_ptr, counts_ptr, threshold_ptr, alias_ptr, num_entries, key,
    X: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_entries
    ids = tl.load(ids_ptr + offs, mask=in_range, other=-1)
    routed = ids >= 0
    live = in_range & routed
    expert = tl.where(routed, ids, 0).to(tl.int64)
    # Only builtins here (no tl.sum / tl.zeros_like): those are jit functions, which the
    # interpreter can run only when TRITON_INTERPRET was set before triton was imported.
    cell = expert * X
    if MODE != 0:
        h = offs.to(tl.uint32) ^ key.to(tl.uint32)
        h ^= h >> 16
        h *= _MUL1
        h ^= h >> 15
        h *= _MUL2
        h ^= h >> 16
        count = tl.load(counts_ptr + expert, mask=live, other=1).to(tl.uint32)
        cell += (h % count).to(tl.int64)
    # The weighted policy's three reads share one address, so they issue together: its
    # latency is the hash policy's chain (count, then slot) plus one select.
    slot = tl.load(slots_ptr + cell, mask=live, other=-1)
    if MODE == 2:
        threshold = tl.load(threshold_ptr + cell, mask=live, other=0)
        alias = tl.load(alias_ptr + cell, mask=live, other=-1)
        u = (h >> (32 - _UNIFORM_BITS)).to(tl.int32)
        slot = tl.where(u < threshold, slot, alias)
    tl.store(out_ptr + offs, tl.where(routed, slot, -1), mask=in_range)


@cache
def _compiled(interpret: bool) -> Any:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_remap_kernel)
    # The key is a hash; specialising on its value (e.g. == 1) would only cost recompiles.
    return triton.jit(_remap_kernel, do_not_specialize=["key"])


def remap_triton(
    mode: Mode,
    topk_ids: torch.Tensor,
    slots: torch.Tensor,
    counts: torch.Tensor,
    threshold: torch.Tensor,
    alias: torch.Tensor,
    key: int,
) -> torch.Tensor:
    """Same contract as ``remap_torch``; the tables must be contiguous."""
    ids = topk_ids.contiguous()
    out = torch.empty_like(ids)
    n = ids.numel()
    if n == 0:
        return out
    width = slots.shape[1]
    kernel = _compiled(not ids.is_cuda)
    kernel[(triton.cdiv(n, BLOCK),)](
        ids, out, slots, counts, threshold, alias, n, key,
        X=width, MODE=int(mode), BLOCK=BLOCK,
    )
    return out
