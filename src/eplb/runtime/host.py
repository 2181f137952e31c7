"""Host-to-device copies that never wait for the GPU's queued work.

A plain ``tensor.to("cuda")`` from pageable host memory synchronises the current stream: a table built on
the host at a step boundary (a dispatch table after a commit, a waterfill input) would wait for every
forward pass already queued, tens of milliseconds at serving batch sizes, and the host would then launch
the next step late. A copy from pinned memory with ``non_blocking=True`` is ordered on the stream instead;
PyTorch's pinned-memory cache keeps the host buffer until the copy has run, and the caller's tensor is
copied into it first, so both may be dropped or changed at once.
"""

from __future__ import annotations

import torch


def upload(host: torch.Tensor, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``, stream-ordered, without a host sync on CUDA.

    Args:
        host: the tensor to copy (one not on the CPU is copied plainly).
        device: the target device (a CPU device returns a copy or ``out`` filled).
        out: a tensor on ``device`` of ``host``'s shape to copy into in place (tables whose addresses a
            captured CUDA graph holds); None returns a new tensor.

    Returns:
        the device tensor (``out`` when given).
    """
    host = host.contiguous()
    if device.type != "cuda" or host.device.type != "cpu":
        return host.to(device, copy=True) if out is None else out.copy_(host)
    pinned = torch.empty_like(host, pin_memory=True).copy_(host)  # the caller may change ``host`` at once
    if out is None:
        return pinned.to(device, non_blocking=True)
    return out.copy_(pinned, non_blocking=True)
