"""The remap as one Triton kernel (imported on first use; triton is optional).

It computes exactly what ``eplb.runtime.dispatch.reference.remap_torch`` computes, in one pass over
the routed entries: the policy is a compile-time constant, the tables stay in L2, and the hash is
``eplb.runtime.hashing_triton``'s, bit for bit the torch one. On CPU tensors it runs under the
Triton interpreter (``TRITON_INTERPRET=1``), which is how it is tested without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eplb.runtime.dispatch.reference import Mode
from eplb.runtime.hashing_triton import entry_hash, uniform

BLOCK = 1024


# The key is a hash; specialising on its value (e.g. == 1) would only cost recompiles.
@triton.jit(do_not_specialize=["key"])
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
    cell = expert * X
    if MODE != 0:
        h = entry_hash(offs, key)
        count = tl.load(counts_ptr + expert, mask=live, other=1).to(tl.uint32)
        cell += (h % count).to(tl.int64)
    # The weighted policy's three reads share one address, so they issue together: its
    # latency is the hash policy's chain (count, then slot) plus one select.
    slot = tl.load(slots_ptr + cell, mask=live, other=-1)
    if MODE == 2:
        threshold = tl.load(threshold_ptr + cell, mask=live, other=0)
        alias = tl.load(alias_ptr + cell, mask=live, other=-1)
        slot = tl.where(uniform(h) < threshold, slot, alias)
    tl.store(out_ptr + offs, tl.where(routed, slot, -1), mask=in_range)


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
    _remap_kernel[(triton.cdiv(n, BLOCK),)](
        ids, out, slots, counts, threshold, alias, n, key,
        X=slots.shape[1], MODE=int(mode), BLOCK=BLOCK,
    )
    return out
