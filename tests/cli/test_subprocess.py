"""The real ``eplb`` command in subprocesses: exit codes, signals, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

# The installed entry point's code, run the way the console script runs it.
EPLB = [sys.executable, "-c", "from eplb.cli import entry; entry()"]


def _eplb(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*EPLB, *argv], capture_output=True, text=True, timeout=120, cwd=cwd)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_huge_slot_count_is_one_line_not_a_segfault(tmp_path):
    (tmp_path / "o.json").write_text(json.dumps([[1.0] * 4] * 2))
    proc = _eplb("plan", "o.json", "--gpus", "2", "--slots", "9223372036854775808", cwd=tmp_path)
    assert "size guard" in _one_line(proc)


def test_compare_fails_up_front_on_an_invalid_cluster(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps({"logical_count": [[1.0, 2.0, 3.0, 4.0]]}))
    proc = _eplb("compare", "g.json", "--gpus", "2", "--slots", "2", cwd=tmp_path)
    assert "2 slots cannot hold 4 experts" in _one_line(proc) and proc.stdout == ""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_sigint_ends_with_130_and_no_traceback(tmp_path):
    # The statistics come through a named pipe that is opened but never fed: the command waits in
    # its reader, past every import, until the signal comes.
    fifo = tmp_path / "stats.json"
    os.mkfifo(fifo)
    proc = subprocess.Popen([*EPLB, "plan", str(fifo), "-g", "2", "-p", "8"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:  # opening the write end without blocking fails until the reader has opened it
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
    try:
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(writer)
    assert proc.returncode == 130 and "Traceback" not in err and "aborted" in err, err
