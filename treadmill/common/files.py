"""Small durable file writes: write a temporary file, fsync, rename, fsync the directory.

For keys, configuration and state files of a few KiB. Callers on the reactor
thread may call these directly for such sizes; bulk data goes through the
roles' streaming writers instead.
"""

from __future__ import annotations

import os
import tempfile


def fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (best effort where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600,
                     durable: bool = True) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never half.

    The new file gets ``mode`` (0600 by default: most of what we write is secret).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    if durable:
        fsync_directory(directory)
