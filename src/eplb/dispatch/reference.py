"""The remap in plain torch: the reference for the Triton kernel and the path on CPU.

Every policy is the same two steps: choose a replica index ``x`` for each routed entry, then
read the slot ``slots[e, x]``. The policies differ only in how ``x`` is chosen (``Mode``).
All ops are fixed-shape device ops: no host syncs, so the remap can be captured in a CUDA graph.
"""

from __future__ import annotations

from enum import IntEnum

import torch

from eplb.dispatch.hashing import UNIFORM_BITS, entry_hash


class Mode(IntEnum):
    """How the replica index ``x`` of an entry is chosen."""

    TABLE = 0  # x = 0: ``slots`` is a per-rank table [E, 1]
    HASH = 1  # x = h mod logcnt[e]
    WEIGHTED = 2  # x = #{j : (h >> 8) >= thresholds[e, j]}


def remap_torch(mode: Mode, topk_ids: torch.Tensor, slots: torch.Tensor, aux: torch.Tensor, key: int) -> torch.Tensor:
    """Map logical expert ids to physical slots for one layer.

    Args:
        mode: the policy.
        topk_ids: ``[M, K]`` (any shape; entries are numbered in row-major order) int32 or int64
            logical expert ids in ``[0, E)``, or negative for padding.
        slots: ``[E, X]`` int32: candidate slots of each expert (``log2phy`` of the layer, or a
            per-rank table with ``X = 1``).
        aux: ``[E]`` int32 replica counts (HASH), ``[E, X]`` int32 cumulative thresholds out of
            ``2**24`` (WEIGHTED), unused for TABLE.
        key: the layer's hash key (see ``eplb.dispatch.hashing``).

    Returns:
        Physical slot ids with the shape and dtype of ``topk_ids``; padding stays ``-1``.
    """
    ids = topk_ids.reshape(-1).long()
    pad = ids < 0
    expert = ids.clamp(min=0)
    if mode == Mode.TABLE:
        replica = torch.zeros_like(expert)
    else:
        h = entry_hash(ids.numel(), key, ids.device)
        if mode == Mode.HASH:
            replica = h % aux[expert]
        else:
            u = h >> (32 - UNIFORM_BITS)
            replica = (u.unsqueeze(1) >= aux[expert]).sum(1)
    slot = slots[expert, replica]
    return torch.where(pad, -1, slot).to(topk_ids.dtype).view(topk_ids.shape)
