"""The remap in plain torch: the reference for the Triton kernel and the path on CPU.

Every policy picks a column ``x`` of the expert's row in ``slots`` and reads the slot
``slots[e, x]``; ``WEIGHTED`` then flips one coin between that slot and the column's alias.
The policies differ only in how ``x`` is chosen (``Mode``). All ops are fixed-shape device ops:
no host syncs, so the remap can be captured in a CUDA graph.
"""

from __future__ import annotations

from enum import IntEnum

import torch

from eplb.runtime.hashing import UNIFORM_BITS, entry_hash


class Mode(IntEnum):
    """How the slot of an entry is chosen."""

    TABLE = 0  # x = 0: ``slots`` is a per-rank table [E, 1]
    HASH = 1  # x = h mod logcnt[e]
    WEIGHTED = 2  # x as HASH, then the alias unless (h >> 8) < threshold[e, x]


def remap_torch(
    mode: Mode,
    topk_ids: torch.Tensor,
    slots: torch.Tensor,
    counts: torch.Tensor,
    threshold: torch.Tensor,
    alias: torch.Tensor,
    key: int,
) -> torch.Tensor:
    """Map logical expert ids to physical slots for one layer.

    Args:
        mode: the policy.
        topk_ids: ``[M, K]`` (any shape; entries are numbered in row-major order) int32 or int64
            logical expert ids in ``[0, E)``, or negative for padding.
        slots: ``[E, X]`` int32: candidate slots of each expert (``log2phy`` of the layer, or a
            per-rank table with ``X = 1``).
        counts: ``[E]`` int32 replica counts (``logcnt`` of the layer); unused for TABLE.
        threshold: ``[E, X]`` int32 alias-table thresholds out of ``2**24`` (WEIGHTED only;
            see ``eplb.runtime.dispatch.alias``).
        alias: ``[E, X]`` int32 alias slots (WEIGHTED only).
        key: the layer's hash key (see ``eplb.runtime.hashing``).

    Returns:
        Physical slot ids with the shape and dtype of ``topk_ids``; padding stays ``-1``.
    """
    ids = topk_ids.reshape(-1).long()
    pad = ids < 0
    expert = ids.clamp(min=0)
    if mode == Mode.TABLE:
        column = torch.zeros_like(expert)
    else:
        h = entry_hash(ids.numel(), key, ids.device)
        column = h % counts[expert]
    slot = slots[expert, column]
    if mode == Mode.WEIGHTED:
        own = (h >> (32 - UNIFORM_BITS)) < threshold[expert, column]
        slot = torch.where(own, slot, alias[expert, column])
    return torch.where(pad, -1, slot).to(topk_ids.dtype).view(topk_ids.shape)
