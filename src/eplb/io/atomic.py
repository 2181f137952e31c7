"""Atomic file replacement: a reader sees the old file or the new one, never half of one.

Engines and schedulers may read a placement file while eplb rewrites it, and a crash or a full
disk mid-write must not leave a truncated file behind.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from eplb.errors import EplbError

# What every eplb.io function takes as a file name.
PathLike = str | os.PathLike


def atomic_write(path: PathLike, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` atomically and durably; return the path written.

    Args:
        path: the destination file; its directory must exist.
        data: the whole new content (``str`` is written as UTF-8).

    The bytes go to a temporary file in the same directory (``os.replace`` is atomic only within
    one file system), which is flushed and fsync'ed before it replaces ``path``; the directory is
    fsync'ed after, so the rename itself survives a power loss. On any failure the temporary file
    is removed and the old ``path`` is left untouched. A symlink's target is replaced (the link
    stays); a path that exists but is not a regular file (a device, pipe or socket) is refused.
    """
    given = path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    # A symlink stays a symlink: the new content replaces its target (where the link points).
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if not path.parent.is_dir():
        raise EplbError(f"cannot write {given}: the directory {path.parent} does not exist; create it first")
    if path.is_dir():
        raise EplbError(f"cannot write {given}: it is a directory; pass a file name")
    if path.exists() and not path.is_file():
        # A device, pipe or socket (-o /dev/stdout) would be replaced by a regular file.
        raise EplbError(f"cannot write {given}: it is not a regular file (a device, pipe or socket); "
                        "pass a file name")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        # O_EXCL: never clobber another writer's temp file; mode 0o666 lets the umask decide, as for open().
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise EplbError(f"cannot write {given} ({exc.strerror or exc}); check the directory is writable") from exc
        raise
    _fsync_dir(path.parent)
    return given


def _fsync_dir(directory: Path) -> None:
    # Best effort: the new file is already in place, so a file system that cannot sync a directory
    # (or Windows, which cannot open one) must not turn a finished write into an error.
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
