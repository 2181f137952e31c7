"""Expert-load tensors: validation and the dense-layer rule shared by the planner and the readers."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from eplb.errors import EplbError


def as_history(load: Any, what: str = "load") -> torch.Tensor:
    """Validate a load ``[L, E]`` or history ``[T, L, E]`` and return it as float64 ``[T, L, E]``.

    Raises EplbError for a wrong number of dimensions, an empty tensor, or NaN, infinite or
    negative entries.
    """
    try:
        # Nested lists go through numpy, which keeps float64 (torch would round them to float32);
        # from_numpy rejects string and object arrays with a TypeError.
        t = load if isinstance(load, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(load))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EplbError(f"{what} is not a numeric array ({exc}); pass a [layers, experts] tensor") from None
    if t.is_meta:
        raise EplbError(f"{what} is a meta tensor (a shape without data); save the real counts")
    if t.layout != torch.strided:
        t = t.to_dense()  # sparse counts (COO, CSR) are the same counts
    if t.dtype == torch.bool or t.is_complex():
        raise EplbError(f"{what} has dtype {t.dtype}; pass real-valued token counts")
    t = t.detach().to("cpu", torch.float64)
    if t.ndim not in (2, 3):
        raise EplbError(
            f"{what} has {t.ndim} dimensions (shape {tuple(t.shape)}); pass [layers, experts] "
            "or a history [steps, layers, experts]"
        )
    if t.numel() == 0:
        raise EplbError(f"{what} is empty (shape {tuple(t.shape)}); pass at least one layer and one expert")
    # Two reductions find any bad entry (a NaN makes the minimum NaN, an infinity the sum); counting them is
    # the slow part and only runs when there is one to report.
    if not math.isfinite(float(t.sum())) or not float(t.min()) >= 0:
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise EplbError(f"{what} has {bad} NaN or infinite entries; clean the statistics before planning")
        if (t < 0).any():
            raise EplbError(
                f"{what} has {int((t < 0).sum())} negative entries; loads are token counts and must be >= 0"
            )
    return t if t.ndim == 3 else t.unsqueeze(0)


def as_layer_load(load: Any, what: str = "load") -> torch.Tensor:
    """Validate like :func:`as_history` and return float64 ``[L, E]``: a history summed over its steps."""
    return as_history(load, what).sum(0)


def dense_layers(history: torch.Tensor) -> torch.Tensor:
    """``[L]`` bool: layers with no load in any step (dense layers, e.g. DeepSeek-V3's first 3)."""
    return history.sum(dim=(0, 2)) == 0


def normalized(load: torch.Tensor) -> torch.Tensor:
    """``load`` (``[..., L, E]`` float64) with each layer scaled by a power of two to a peak in ``[0.5, 1)``.

    Balance is scale-free, but float arithmetic is not: subnormal loads lose precision and totals
    near the float limits overflow. A power-of-two factor is exact, so on ordinary loads every
    ratio (max/mean, gap) and every plan stays bit-identical. Layers without load are unchanged.
    """
    peak = load.abs().amax(dim=-1, keepdim=True)
    while peak.ndim > 2:  # one factor per layer, shared by every step of a history
        peak = peak.amax(dim=0)
    _, exponent = torch.frexp(peak)
    return torch.ldexp(load, torch.where(peak > 0, -exponent, 0))
