"""The one rule that picks a runtime op's backend: a Triton kernel or plain torch.

Every runtime component (recorder, dispatch, waterfill) takes ``backend=`` with these names:

- ``"auto"``: the Triton kernel on CUDA tensors when ``triton`` imports, torch otherwise (never
  the interpreter: on the CPU it is a slow development aid);
- ``"torch"``: plain torch, on any device;
- ``"triton"``: the Triton kernel; on CPU tensors only under Triton's interpreter, which needs
  ``TRITON_INTERPRET=1`` in the environment before ``triton`` is first imported.

Anything else, or ``"triton"`` where it cannot run, raises ``EplbError``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from eplb.cluster import require_choice
from eplb.errors import EplbError

BACKENDS = ("auto", "torch", "triton")


def check_backend(name: Any) -> str:
    """``name`` if it is one of ``BACKENDS``; raises EplbError otherwise."""
    return require_choice("backend", name, BACKENDS, fix="'auto' picks for you")


@functools.cache
def _triton_import_error() -> str | None:
    """Why ``import triton`` fails, or None when it works (asked once per process)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return str(exc) or type(exc).__name__
    return None


def use_triton(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` runs the Triton kernel for tensors on ``device``.

    Args:
        backend: one of ``BACKENDS`` (see the module docstring).
        device: the device of the op's tensors.

    Raises EplbError for an unknown name, and for ``"triton"`` when triton does not import or the
    device is not CUDA and ``TRITON_INTERPRET`` is not ``1``.
    """
    check_backend(backend)
    if backend == "torch":
        return False
    is_cuda = device.type == "cuda"
    if backend == "auto":
        return is_cuda and _triton_import_error() is None
    if not is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise EplbError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported to run "
            f"the kernels on {device} in Triton's interpreter; use backend='torch' or 'auto'"
        )
    error = _triton_import_error()
    if error is not None:
        raise EplbError(f"backend='triton' but triton does not import ({error}); install triton or use backend='torch'")
    return True
