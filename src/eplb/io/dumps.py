"""Writers of recorder dumps: eplb's own ``.pt`` format and SGLang's expert-distribution dump.

Both are ``torch.save`` dicts of CPU tensors and plain values, readable with
``torch.load(weights_only=True)``; ``eplb.io.read_load`` reads their logical loads back.

- eplb (``format == "eplb.expert_load"``): ``physical_count [T, L, P]`` (oldest step first),
  ``phy2log [L, P]`` and ``logical_count [T, L, E]`` when the placement was given, ``decayed``
  ``[L, P]`` when the recorder keeps one, and the recorder's sizes. It carries
  ``logical_count`` under SGLang's key, so SGLang's ``--init-expert-location`` reads it too
  (the placement is stored as ``phy2log``, not as SGLang's ``physical_to_logical_map``, which
  would make SGLang pin that placement instead of planning from the counts).
- SGLang (what its ``stat`` recorder mode writes): ``rank``, ``logical_count [T, L, E]`` int32,
  ``average_utilization_rate_over_window`` (float or None).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from eplb.errors import EplbError
from eplb.io.atomic import PathLike, atomic_write

# The format key and version of an eplb dump (read_load checks them).
DUMP_FORMAT = "eplb.expert_load"
DUMP_VERSION = 1


def save_eplb(
    path: PathLike,
    physical_count: torch.Tensor,
    *,
    phy2log: torch.Tensor | None = None,
    logical_count: torch.Tensor | None = None,
    decayed: torch.Tensor | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write an eplb dump atomically; return its path.

    Args:
        path: destination file (``.pt`` keeps it readable by SGLang).
        physical_count: ``[T, L, P]`` slot loads, oldest step first.
        phy2log: ``[L, P]`` placement live while recording, or None.
        logical_count: ``[T, L, E]`` its logical loads (given with ``phy2log``).
        decayed: ``[L, P]`` decayed slot loads, or None.
        meta: extra plain values (ints, floats, strings).
    """
    if physical_count.ndim != 3:
        raise EplbError(
            f"physical_count has shape {tuple(physical_count.shape)}; pass the [steps, layers, slots] window"
        )
    data: dict[str, Any] = {
        **(meta or {}),
        "format": DUMP_FORMAT,
        "version": DUMP_VERSION,
        "physical_count": _cpu(physical_count),
    }
    for key, value in (("phy2log", phy2log), ("logical_count", logical_count), ("decayed", decayed)):
        if value is not None:
            data[key] = _cpu(value)
    return _save(path, data)


def save_sglang(
    path: PathLike, logical_count: torch.Tensor, *, rank: int = 0, utilization: float | None = None
) -> Path:
    """Write SGLang's expert-distribution dump atomically; return its path.

    Args:
        path: destination; SGLang reads ``--init-expert-location`` with torch only for ``.pt`` names.
        logical_count: ``[T, L, E]`` (or ``[L, E]``) logical loads summed over the EP group;
            ``L`` must be the model's layer count, dense layers included (as zero rows).
        rank: the writer's rank (SGLang writes from rank 0).
        utilization: mean balancedness over the window, or None (SGLang writes None unless
            its metrics are on).
    """
    if Path(path).suffix != ".pt":
        raise EplbError(f"{path} does not end in .pt; SGLang loads --init-expert-location with torch only then")
    if logical_count.ndim not in (2, 3):
        raise EplbError(
            f"logical_count has shape {tuple(logical_count.shape)}; pass [steps, layers, experts] or [layers, experts]"
        )
    count = logical_count if logical_count.ndim == 3 else logical_count.unsqueeze(0)
    data = {
        "rank": int(rank),
        "logical_count": _cpu(count).to(torch.int32),
        "average_utilization_rate_over_window": utilization,
    }
    return _save(path, data)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _save(path: PathLike, data: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    torch.save(data, buf)
    return atomic_write(path, buf.getvalue())
