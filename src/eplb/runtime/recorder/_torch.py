"""The plain-torch recorder backend: the reference for the Triton kernels and the CPU path.

Every op reads the on/off flag on the device and none syncs with the host, so this path can
be captured in a CUDA graph too (it just launches more kernels than the Triton one).
Shapes: L layers, P physical slots, W window rows.
"""

from __future__ import annotations

import torch


def record_topk(row: torch.Tensor, ids: torch.Tensor, enabled: torch.Tensor) -> None:
    """Add one token count per routed id to ``row``.

    Args:
        row: ``[P]`` int32 counters of one layer (a view into the recorder's current step).
        ids: ``[N]`` flattened top-k physical slot ids, any integer dtype; ids outside
            ``[0, P)`` (``-1`` is padding) are skipped.
        enabled: 0-d int32 flag; 0 makes this a no-op.
    """
    valid = (ids >= 0) & (ids < row.shape[0]) & (enabled != 0)
    row.scatter_add_(0, torch.where(valid, ids, 0).to(torch.int64), valid.to(row.dtype))


def record_counts(dst: torch.Tensor, counts: torch.Tensor, enabled: torch.Tensor) -> None:
    """``dst += counts`` when enabled.

    Args:
        dst: ``[n]`` int32 counters of this rank's slots of one layer.
        counts: ``[n]`` tokens per local slot, any integer dtype.
        enabled: 0-d int32 flag.
    """
    dst.add_(counts.to(dst.dtype) * enabled)


def close_step(
    current: torch.Tensor,
    ring: torch.Tensor,
    steps: torch.Tensor,
    enabled: torch.Tensor,
    decayed: torch.Tensor | None,
    decay: float,
) -> None:
    """Move the current step into the ring, fold it into the decayed sum, clear it, count it.

    Args:
        current: ``[L, P]`` int32 counts of the step being closed; zeroed.
        ring: ``[W, L, P]`` int32; row ``steps % W`` receives ``current``.
        steps: 0-d int64 steps closed so far; incremented.
        enabled: 0-d int32 flag; 0 leaves everything untouched.
        decayed: ``[L, P]`` float32 ``decay * decayed + current``, or None.
        decay: the decay factor.
    """
    on = enabled != 0
    row = torch.remainder(steps, ring.shape[0]).reshape(1)
    kept = ring.index_select(0, row)
    ring.index_copy_(0, row, torch.where(on, current.unsqueeze(0), kept))
    if decayed is not None:
        decayed.copy_(torch.where(on, decayed * decay + current, decayed))
    current.masked_fill_(on, 0)
    steps.add_(enabled)
