"""The one way the runtime tests check a Triton kernel against its torch twin.

A check is a module-level function ``check(device, *args)`` that runs both backends on
``device`` and asserts equal results. :func:`run_check` runs it for one of
:data:`KERNEL_DEVICES`:

- ``"cuda"`` (marked ``gpu``): in this process, on the GPU; skipped without CUDA;
- ``"cpu"``: under Triton's CPU interpreter. ``TRITON_INTERPRET=1`` must be set before triton
  is first imported, which this process may already have done, so the check runs in a child
  process with it set (or here, when this process already has it); skipped without triton.

By hand: ``TRITON_INTERPRET=1 python -m tests.runtime.kernel_harness MODULE:FUNCTION [ARGS]``
from the repository root (``ARGS``: a Python literal tuple).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNEL_DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu), "cpu"]


def run_check(check: Callable[..., object], device: str, *args: object, timeout: float = 300) -> None:
    """Run ``check(device, *args)`` on ``device`` (see the module docstring); ``args`` must be
    Python literals (they are passed to the child process as text)."""
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        check("cuda", *args)
        return
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton: the kernels run on the CPU only in Triton's interpreter")
    if os.environ.get("TRITON_INTERPRET") == "1":
        check("cpu", *args)
        return
    target = f"{check.__module__}:{check.__qualname__}"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "tests.runtime.kernel_harness", target, repr(args)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0 and done.stdout.endswith(f"ok {target}\n"), done.stdout + done.stderr


def _main(target: str, args: str = "()") -> None:
    module, _, name = target.partition(":")
    check = getattr(importlib.import_module(module), name)
    check("cuda" if torch.cuda.is_available() else "cpu", *ast.literal_eval(args))
    print(f"ok {target}")


if __name__ == "__main__":
    _main(*sys.argv[1:])
