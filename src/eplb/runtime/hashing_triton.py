"""The counter hash of ``eplb.runtime.hashing`` as Triton device functions, for every kernel.

Imported only where a Triton kernel is (triton is optional). The arithmetic is uint32 (a product
of a uint32 tensor and a constant stays uint32), which wraps modulo ``2**32`` as the torch twin's
masks do, so both give the same value bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from eplb.runtime.hashing import MUL1, MUL2, UNIFORM_BITS

# Kernels read module globals only as constexprs.
_MUL1 = tl.constexpr(MUL1)
_MUL2 = tl.constexpr(MUL2)
_UNIFORM_SHIFT = tl.constexpr(32 - UNIFORM_BITS)


@triton.jit
def mix32(x):
    """``hashing.mix32`` of a uint32 tensor (any shape)."""
    x ^= x >> 16
    x *= _MUL1
    x ^= x >> 15
    x *= _MUL2
    x ^= x >> 16
    return x


@triton.jit
def entry_hash(entry, key):
    """uint32 ``h(i, l) = mix32(i XOR key(l))`` of the entry indices ``entry`` (any integer tensor)
    and the layer's ``key``."""
    return mix32(entry.to(tl.uint32) ^ key.to(tl.uint32))


@triton.jit
def uniform(h):
    """The draw's uniform in ``[0, 2**UNIFORM_BITS)``: the top ``UNIFORM_BITS`` bits of the uint32
    hash ``h``, as int64."""
    return (h >> _UNIFORM_SHIFT).to(tl.int64)
