"""Recorder dumps: eplb's own ``.pt`` format and SGLang's expert-distribution dump.

Both are ``torch.save`` dicts of CPU tensors and plain values, readable with
``torch.load(weights_only=True)``.

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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from eplb.errors import EplbError
from eplb.io.atomic import atomic_write

EPLB_FORMAT = "eplb.expert_load"
EPLB_FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class LoadDump:
    """What a dump holds; tensors are on the CPU.

    Attributes:
        source: ``"eplb"`` or ``"sglang"``.
        logical_count: ``[T, L, E]`` per-step logical expert loads (what ``eplb.plan`` takes),
            or None for an eplb dump written without a placement.
        physical_count: ``[T, L, P]`` per-step slot loads (eplb dumps only).
        phy2log: ``[L, P]`` the placement live while recording (eplb dumps written with one).
        decayed: ``[L, P]`` float32 decayed slot loads (eplb dumps of a recorder with ``decay``).
        meta: the remaining plain values (sizes, step count, rank, ...).
    """

    source: str
    logical_count: torch.Tensor | None
    physical_count: torch.Tensor | None = None
    phy2log: torch.Tensor | None = None
    decayed: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def history(self) -> torch.Tensor:
        """``[T, L, E]`` logical loads for ``eplb.plan``; raises EplbError when the dump has none."""
        if self.logical_count is None:
            raise EplbError(
                "this dump holds slot loads only (it was written without phy2log); "
                "convert physical_count with eplb.runtime.recorder.to_logical(dump.physical_count, phy2log) "
                "or dump again with phy2log="
            )
        return self.logical_count


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
        "format": EPLB_FORMAT,
        "version": EPLB_FORMAT_VERSION,
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


def load_dump(path: PathLike) -> LoadDump:
    """Read an eplb or SGLang dump (see the module doc); raises EplbError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise EplbError(f"no dump at {path}; pass the .pt file the recorder (or SGLang) wrote")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a torch dump
        raise EplbError(f"{path} is not a readable torch dump ({exc}); pass a file written by torch.save") from None
    if not isinstance(data, dict):
        raise EplbError(f"{path} holds a {type(data).__name__}, not a dump dict; pass a recorder dump")
    if data.get("format") == EPLB_FORMAT:
        return _eplb_dump(path, data)
    if "logical_count" in data:
        count = torch.as_tensor(data["logical_count"])
        count = count if count.ndim == 3 else count.unsqueeze(0)
        _check_ndim(path, "logical_count", count, 3)
        meta = {k: v for k, v in data.items() if k != "logical_count"}
        return LoadDump(source="sglang", logical_count=count, meta=meta)
    if "records" in data:
        raise EplbError(
            f"{path} is an SGLang per-pass/per-token dump; record with "
            "--expert-distribution-recorder-mode stat, whose dump holds logical_count"
        )
    raise EplbError(f"{path} has neither eplb's format key nor SGLang's logical_count; pass a recorder dump")


def _eplb_dump(path: Path, data: dict[str, Any]) -> LoadDump:
    if data.get("version") != EPLB_FORMAT_VERSION:
        raise EplbError(
            f"{path} is eplb dump version {data.get('version')}, this eplb reads version {EPLB_FORMAT_VERSION}; "
            "upgrade eplb or dump again"
        )
    if "physical_count" not in data:
        raise EplbError(f"{path} lacks physical_count; it is truncated or not written by eplb, dump again")
    tensors = {key: data.pop(key, None) for key in ("physical_count", "phy2log", "logical_count", "decayed")}
    _check_ndim(path, "physical_count", tensors["physical_count"], 3)
    if tensors["logical_count"] is not None:
        _check_ndim(path, "logical_count", tensors["logical_count"], 3)
    return LoadDump(source="eplb", meta=data, **tensors)


def _check_ndim(path: Path, key: str, value: Any, ndim: int) -> None:
    if not isinstance(value, torch.Tensor) or value.ndim != ndim:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise EplbError(f"{path}: {key} is {shape}, expected a {ndim}-d tensor; the file is damaged, dump again")


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _save(path: PathLike, data: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    torch.save(data, buf)
    return atomic_write(path, buf.getvalue())
