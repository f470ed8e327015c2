"""Small durable file writes: write a temporary file, fsync, rename, fsync the directory.

:func:`write_atomically` for keys and configuration, :func:`write_json` for the
stores' JSON state files; :func:`write_file` and :func:`write_all` under them (and
the stores' own temporary files and appends).

For keys, configuration and state files of a few KiB. Callers on the reactor
thread may call these directly for such sizes; bulk data goes through the
roles' streaming writers instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any


def fsync_directory(directory: str, *, strict: bool = False) -> None:
    """Make a rename in ``directory`` durable: best effort where unsupported, unless
    ``strict`` (a store that must report a failed sync), when errors raise."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the descriptor ``fd`` (one ``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_file(path: str, data: bytes, *, flags: int = 0, mode: int = 0o600,
               chmod: int | None = None,
               sync: Callable[[int], None] | None = os.fsync) -> None:
    """Write ``data`` to ``path``, opened write-only with ``flags`` added (``O_TRUNC``,
    ``O_APPEND``, ``O_EXCL``; a new file gets ``mode`` less the umask, or exactly
    ``chmod``), then ``sync`` the descriptor (None: no sync) and close it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | flags, mode)
    try:
        write_all(fd, data)
        if chmod is not None:
            os.fchmod(fd, chmod)
        if sync is not None:
            sync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600,
                     durable: bool = True, exclusive: bool = False) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never half.

    The new file gets ``mode`` (0600 by default: most of what we write is secret).
    With ``exclusive`` an existing ``path`` is kept and :class:`FileExistsError`
    raised (of two processes creating one file, one wins and both see its content).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    if exclusive:
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
    else:
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    if durable:
        fsync_directory(directory)


def write_json(path: str, value: Any, durable: bool = True, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``value`` as compact JSON, written to ``path + ".tmp"`` and
    renamed over it.

    For the stores' state files, written in their I/O threads: the fixed temporary
    name lets a start-up scan remove leftovers, and with ``durable`` the file and its
    directory are synced and a failed sync raises.
    """
    data = json.dumps(value, separators=(",", ":")).encode("utf-8")
    tmp = path + ".tmp"
    write_file(tmp, data, flags=os.O_TRUNC, mode=mode, sync=os.fsync if durable else None)
    os.replace(tmp, path)
    if durable:
        fsync_directory(os.path.dirname(path), strict=True)
