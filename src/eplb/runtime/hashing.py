"""The counter-based hash behind the ``hash`` and ``weighted`` dispatch policies.

Routed entry ``i`` of a flattened ``[M, K]`` top-k tensor (``i = m * K + k``: token ``m``,
choice ``k``) in layer ``l`` gets the 32-bit value

    h(i, l) = mix32(i XOR key(l)),    key(l) = mix32(mix32(seed) + l)  (mod 2**32)

where ``mix32`` is Chris Wellons' ``lowbias32`` integer finaliser (two xor-shift-multiply
rounds; a bijection on 32-bit words with near-ideal avalanche). A bijection keeps the values
of one layer distinct for distinct entries, so ``h mod c`` spreads consecutive entries evenly
over ``c`` replicas; the per-layer key decorrelates layers. It depends on nothing but the entry
index, the layer and the seed: every rank, every run and every backend (torch, Triton, the
Triton interpreter) computes the same value, and it needs no RNG state, so it is safe under
CUDA-graph replay. The Triton kernels take it from ``eplb.runtime.hashing_triton``.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B
# The weighted policy draws a uniform from the top 24 bits of h, compared with integer
# thresholds, so torch and Triton agree bit for bit (no float rounding involved).
UNIFORM_BITS = 24
UNIFORM_ONE = 1 << UNIFORM_BITS


def mix32_int(x: int) -> int:
    """``mix32`` of one Python integer (taken mod ``2**32``)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MUL1) & MASK32
    x ^= x >> 15
    x = (x * MUL2) & MASK32
    return x ^ (x >> 16)


def layer_key(seed: int, layer: int) -> int:
    """``key(l)``: the 32-bit key of ``layer`` for ``seed``."""
    return mix32_int(mix32_int(seed) + layer)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` of an int64 tensor holding values in ``[0, 2**32)``.

    int64 products of two 32-bit words may wrap past ``2**63``; the wrap is modulo ``2**64``,
    so masking keeps the exact low 32 bits, as uint32 arithmetic would.
    """
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    return x ^ (x >> 16)


def entry_hash(num_entries: int, key: int, device: torch.device) -> torch.Tensor:
    """``[num_entries]`` int64: ``h(i, l)`` for ``i = 0 .. num_entries - 1`` and ``key = key(l)``."""
    index = torch.arange(num_entries, dtype=torch.int64, device=device)
    return mix32(index ^ key)
