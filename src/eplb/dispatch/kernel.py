"""The remap as one Triton kernel (imported on first GPU use; triton is optional).

It computes exactly what ``eplb.dispatch.reference.remap_torch`` computes, in one pass over the
routed entries: the policy is a compile-time constant, the tables stay in L2, and uint32
arithmetic gives the same hash bit for bit. On CPU tensors it runs under the Triton
interpreter, which is how it is tested without a GPU.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import triton
import triton.language as tl

from eplb.dispatch.hashing import MUL1, MUL2, UNIFORM_BITS, UNIFORM_ONE
from eplb.dispatch.reference import Mode

BLOCK = 1024
# Kernels may read only constexpr globals. Literals in [2**31, 2**32) are typed uint32, so
# every product below stays uint32 and wraps like the reference.
_MUL1 = tl.constexpr(MUL1)
_MUL2 = tl.constexpr(MUL2)
_UNIFORM_BITS = tl.constexpr(UNIFORM_BITS)
_UNIFORM_ONE = tl.constexpr(UNIFORM_ONE)


def _remap_kernel(
    ids_ptr, out_ptr, slots_ptr, aux_ptr, num_entries, key,
    X: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_entries
    ids = tl.load(ids_ptr + offs, mask=in_range, other=-1)
    routed = ids >= 0
    expert = tl.where(routed, ids, 0).to(tl.int64)
    # Only builtins below (no tl.sum / tl.zeros_like): those are jit functions, which the
    # interpreter can run only when TRITON_INTERPRET was set before triton was imported.
    replica = expert * 0
    if MODE != 0:
        h = offs.to(tl.uint32) ^ key.to(tl.uint32)
        h ^= h >> 16
        h *= _MUL1
        h ^= h >> 15
        h *= _MUL2
        h ^= h >> 16
        if MODE == 1:
            count = tl.load(aux_ptr + expert, mask=in_range, other=1).to(tl.uint32)
            replica = (h % count).to(tl.int64)
        else:
            u = (h >> (32 - _UNIFORM_BITS)).to(tl.int32)
            for j in tl.static_range(X):
                threshold = tl.load(aux_ptr + expert * X + j, mask=in_range, other=_UNIFORM_ONE)
                replica += (u >= threshold).to(tl.int64)
    slot = tl.load(slots_ptr + expert * X + replica, mask=in_range & routed, other=-1)
    tl.store(out_ptr + offs, tl.where(routed, slot, -1), mask=in_range)


@lru_cache(maxsize=None)
def _compiled(interpret: bool) -> Any:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_remap_kernel)
    # The key is a hash; specialising on its value (e.g. == 1) would only cost recompiles.
    return triton.jit(_remap_kernel, do_not_specialize=["key"])


def remap_triton(mode: Mode, topk_ids: torch.Tensor, slots: torch.Tensor, aux: torch.Tensor, key: int) -> torch.Tensor:
    """Same contract as ``remap_torch``; ``slots`` and ``aux`` must be contiguous."""
    ids = topk_ids.contiguous()
    out = torch.empty_like(ids)
    n = ids.numel()
    if n == 0:
        return out
    width = slots.shape[1]
    kernel = _compiled(not ids.is_cuda)
    kernel[(triton.cdiv(n, BLOCK),)](
        ids, out, slots, aux, n, key,
        X=width, MODE=int(mode), BLOCK=BLOCK,
    )
    return out
