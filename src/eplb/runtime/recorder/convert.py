"""Pure functions over recorded slot loads: window order, physical -> logical, GPU balancedness.

Shapes use W window rows, T recorded steps, L layers, P physical slots, E logical experts,
G GPUs. Every function keeps its input's device and issues no host sync unless it says so,
so the windowed metrics can run on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from eplb.errors import EplbError
from eplb.metrics import balancedness, gpu_totals
from eplb.placement import Placement

DEFAULT_WINDOW_SIZES = (10, 100, 1000)


def ring_order(steps: int, window: int, device: str | torch.device | None = None) -> torch.Tensor:
    """``[T]`` int64: the ring rows holding the last ``T = min(steps, window)`` steps, oldest first.

    Args:
        steps: steps closed so far (step ``s`` was written to row ``s % window``).
        window: ``W``, rows in the ring.
        device: where to put the indices.
    """
    count = min(steps, window)
    return (torch.arange(steps - count, steps, device=device) % window).to(torch.int64)


def to_logical(
    loads: torch.Tensor,
    phy2log: torch.Tensor | Placement,
    num_experts: int | None = None,
) -> torch.Tensor:
    """Sum slot loads over the replicas of each logical expert.

    Args:
        loads: ``[..., L, P]`` per-slot loads (any dtype; the result keeps it).
        phy2log: ``[L, P]`` logical expert of each slot (``-1``: empty slot, its load is dropped),
            or a ``Placement``.
        num_experts: ``E``; default ``phy2log.max() + 1`` (a host sync), which is exact whenever
            every logical expert has a replica, as a placement guarantees.

    Returns:
        ``[..., L, E]`` logical loads on ``loads``' device.
    """
    if isinstance(phy2log, Placement):
        num_experts = phy2log.num_experts if num_experts is None else num_experts
        phy2log = phy2log.phy2log
    phy2log = torch.as_tensor(phy2log)
    if phy2log.dtype.is_floating_point or phy2log.dtype == torch.bool:
        raise EplbError(f"phy2log must hold integer expert ids, got dtype {phy2log.dtype}; pass an integer tensor")
    if phy2log.ndim != 2 or loads.ndim < 2 or tuple(loads.shape[-2:]) != tuple(phy2log.shape):
        raise EplbError(
            f"loads of shape {tuple(loads.shape)} do not match phy2log of shape {tuple(phy2log.shape)}; "
            "pass loads [..., L, P] with the [L, P] phy2log of the placement that was live while recording"
        )
    if num_experts is None:
        num_experts = int(phy2log.max()) + 1
    if num_experts < 1:
        raise EplbError(f"num_experts must be >= 1, got {num_experts}; pass the model's logical expert count")
    phy2log = phy2log.to(loads.device, torch.int64)
    # Empty slots and ids past E land in a spare last column that is cut off.
    held = (phy2log >= 0) & (phy2log < num_experts)
    column = torch.where(held, phy2log, num_experts).expand(loads.shape)
    out = torch.zeros(*loads.shape[:-1], num_experts + 1, dtype=loads.dtype, device=loads.device)
    out.scatter_add_(-1, column, loads)
    return out[..., :num_experts]


def step_balancedness(slot_loads: torch.Tensor, slots_per_gpu: int) -> torch.Tensor:
    """``[..., L]`` float32: mean / max GPU load of each layer (1 is perfect; a layer without load gives 1).

    Args:
        slot_loads: ``[..., L, P]`` per-slot loads of one or more steps.
        slots_per_gpu: ``P / G``.
    """
    return balancedness(gpu_totals(slot_loads.to(torch.float32), slots_per_gpu))


def check_window_sizes(sizes: Iterable[int] | None, window: int) -> tuple[int, ...]:
    """The window sizes to report, validated against a ring of ``window`` rows.

    ``None`` picks those of 10 / 100 / 1000 the ring can hold (or just ``window`` when it
    holds fewer than 10 steps).
    """
    if sizes is None:
        return tuple(s for s in DEFAULT_WINDOW_SIZES if s <= window) or (window,)
    sizes = tuple(int(s) for s in sizes)
    for s in sizes:
        if not 1 <= s <= window:
            raise EplbError(
                f"window size {s} is outside [1, {window}], the steps the recorder keeps; "
                f"pass sizes <= {window} or build the recorder with window >= {s}"
            )
    return sizes


def windowed_balancedness(
    ring: torch.Tensor,
    steps: torch.Tensor,
    slots_per_gpu: int,
    sizes: Iterable[int] | None = None,
) -> dict[int, torch.Tensor]:
    """Per-layer balancedness averaged over the last ``s`` steps, for each ``s`` in ``sizes``.

    Each step is scored on its own (a forward pass waits for its slowest GPU, so the average
    of per-step ratios is what matters for latency; SGLang reports the same average).
    No host sync: ``steps`` stays on the device.

    Args:
        ring: ``[W, L, P]`` per-slot loads, step ``s`` in row ``s % W``.
        steps: 0-d int64 tensor on ``ring``'s device, steps closed so far.
        slots_per_gpu: ``P / G``.
        sizes: window sizes in steps, each at most ``W``; default: see :func:`check_window_sizes`.

    Returns:
        ``{s: [L] float32}``; NaN where no step has been recorded yet.
    """
    window = ring.shape[0]
    sizes = check_window_sizes(sizes, window)
    per_step = step_balancedness(ring, slots_per_gpu)  # [W, L]
    age = torch.remainder(steps - 1 - torch.arange(window, device=ring.device), window)  # 0 = newest
    out = {}
    for s in sizes:
        count = torch.clamp(steps, max=s)
        mask = (age < count).to(per_step.dtype)
        total = (per_step * mask[:, None]).sum(0)
        out[s] = torch.where(count > 0, total / count.clamp(min=1), float("nan"))
    return out


__all__ = [
    "DEFAULT_WINDOW_SIZES",
    "check_window_sizes",
    "ring_order",
    "step_balancedness",
    "to_logical",
    "windowed_balancedness",
]
