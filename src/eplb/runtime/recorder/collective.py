"""Summing recorded loads over the expert-parallel group (every rank must call these)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from eplb.errors import EplbError


def _require_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise EplbError(
            "torch.distributed is not initialized; call torch.distributed.init_process_group() on every rank "
            "before summing loads over the group (or use loads() for this rank alone)"
        )


def global_sum(tensor: torch.Tensor, group: Any | None = None) -> torch.Tensor:
    """A summed copy of ``tensor`` over ``group`` (default: the world); ``tensor`` is untouched.

    A collective: every rank of the group must call it with a tensor of the same shape and
    dtype. With NCCL it stays on the stream (no host sync), so it can sit on the hot path.
    """
    _require_group()
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def check_same_steps(steps: torch.Tensor, group: Any | None = None) -> int:
    """The step count shared by every rank of ``group``; raises EplbError where ranks differ.

    Summing windows is only meaningful when row ``r`` holds the same forward step on every
    rank. A collective with one host sync.
    """
    _require_group()
    both = torch.stack([steps, -steps]).to(torch.int64)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    most, fewest = int(both[0]), -int(both[1])
    if most != fewest:
        raise EplbError(
            f"ranks closed between {fewest} and {most} steps; call step() exactly once per forward pass "
            "on every rank (or reset() all recorders together) before summing their windows"
        )
    return most
