"""Files and a runner shared by the CLI probes."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

from eplb.cli import run


def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``eplb argv`` in this process: ``(exit code, stdout, stderr)``; any exception escapes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(list(argv))
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    """The single ``eplb: error:`` line of ``err``; fails on anything else (a traceback, two lines)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("eplb: error: "), err
    return lines[0]


def stats_file(folder: Path, layers: int = 2, experts: int = 4, name: str = "stats.json") -> Path:
    """An SGLang-style statistics file of random loads."""
    gen = torch.Generator().manual_seed(0)
    path = folder / name
    path.write_text(json.dumps({"logical_count": (torch.rand(layers, experts, generator=gen) * 100).tolist()}))
    return path
