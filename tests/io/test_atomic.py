"""atomic_write: whole new content or the old file, never a mix, and no temporary files left."""

from __future__ import annotations

import os
import stat

import pytest

from eplb.errors import EplbError
from eplb.io import atomic_write


def test_writes_and_replaces(tmp_path):
    target = tmp_path / "out.json"
    assert atomic_write(target, "first") == target
    assert target.read_text() == "first"
    atomic_write(str(target), b"second \xe2\x9c\x93")
    assert target.read_bytes() == b"second \xe2\x9c\x93"
    assert os.listdir(tmp_path) == ["out.json"]


def test_new_file_mode_follows_umask(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    target = atomic_write(tmp_path / "out.txt", "x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("broken", ["fsync", "replace"])
def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, broken):
    target = tmp_path / "placement.json"
    target.write_text("old")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, broken, fail)
    with pytest.raises(EplbError, match="No space left on device"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["placement.json"]


def test_interrupt_propagates_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "placement.json"
    target.write_text("old")

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["placement.json"]


def test_missing_directory_and_directory_target(tmp_path):
    with pytest.raises(EplbError, match="does not exist; create it"):
        atomic_write(tmp_path / "nope" / "out.json", "x")
    with pytest.raises(EplbError, match="is a directory"):
        atomic_write(tmp_path, "x")
