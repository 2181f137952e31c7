"""The EP token exchange: variable-size ``all_to_all_single`` over a ``torch.distributed`` group.

A step sends its counts first (one integer per peer), so every rank knows how many rows it will
receive before the rows themselves travel. The counts are read on the host: the split sizes of
``all_to_all_single`` are host integers (engines with fixed-size buffers avoid that sync).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def exchange_counts(send_counts: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``recv[j]``: the rows peer ``j`` sends this rank, given ``send_counts[j]``: the rows this rank sends ``j``.

    Args:
        send_counts: ``[W]`` int64 on the group's device (``W`` ranks in ``group``).
        group: the process group (None: the world).

    Returns:
        ``[W]`` int64, same device.
    """
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=group)
    return recv_counts


def exchange_rows(
    rows: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: Any = None
) -> torch.Tensor:
    """Send ``rows`` (grouped by destination rank, in rank order) and receive the peers' rows.

    Args:
        rows: ``[sum(send_counts), ...]``; the first ``send_counts[0]`` rows go to rank 0, and so on.
        send_counts: ``W`` host integers, rows sent to each rank.
        recv_counts: ``W`` host integers, rows received from each rank (``exchange_counts``).
        group: the process group (None: the world).

    Returns:
        ``[sum(recv_counts), ...]``: rank 0's rows first, each peer's in the order it sent them.
    """
    out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=group)
    return out
