"""The supervisor's local image blob directory (``images.dir``): the layout, checks
and garbage collection, as blocking functions the fetcher runs in threads.

The layout is the image store's stable one, ``ROOT/blobs/sha256/<hh>/<hex>``
(:func:`blob_path`; a site cache's mount has it too, with a layout marker,
:func:`check_marker`). Blobs are immutable: written to a temporary file,
verified, then renamed into place with mode 0444 (:func:`save_blob`,
:func:`finish_download`). :func:`check_blob` hashes a file unless its identity
(device, inode, size, mtime) was verified earlier in this run, and sets its
atime, the LRU clock of :func:`collect`: that removes least recently used blobs
(never a pinned one) until the directory holds at most its limit, and stale
``.part`` files of interrupted downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from treadmill.images import format as fmt

__all__ = ["DEFAULT_LOCAL_LIMIT", "GCResult", "Identity", "blob_path", "check_blob",
           "check_marker", "collect", "finish_download", "identity", "read_manifest",
           "save_blob", "unlink"]

DEFAULT_LOCAL_LIMIT = 20 * 2**30  # bytes kept in images.dir
MAX_MANIFEST = 4 * 1024 * 1024
PART_MAX_AGE = 3600.0  # seconds after which an abandoned download's .part file goes
STORE_MARKER = "treadmill-imagestore.json"
STORE_LAYOUT = 1
READ_SIZE = 1024 * 1024


def blob_path(root: str, digest: str) -> str:
    """``ROOT/blobs/sha256/<hh>/<hex>`` (the image store's layout)."""
    hex_ = digest.split(":", 1)[1]
    return os.path.join(root, "blobs", "sha256", hex_[:2], hex_)


Identity = tuple[int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def check_blob(path: str, digest: str, size: int, known: Identity | None,
                touch: bool) -> tuple[str, Any]:
    """``("ok", identity)``, ``("missing", None)``, ``("bad", reason)`` or ``("error", reason)``.

    Hashes the file unless its identity is ``known`` (verified earlier in this
    run). ``touch`` sets its atime to now (the local directory's LRU clock).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing", None
    except OSError as e:
        return "error", e.strerror or str(e)
    if not stat.S_ISREG(st.st_mode):
        return "bad", "not a regular file"
    if st.st_size != size:
        return "bad", f"it has {st.st_size} bytes, the manifest says {size}"
    ident = identity(st)
    if ident != known:
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(READ_SIZE):
                    h.update(chunk)
        except OSError as e:
            return "error", e.strerror or str(e)
        got = "sha256:" + h.hexdigest()
        if got != digest:
            return "bad", f"its content has digest {got}"
    if touch:
        try:
            os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
        except OSError:
            pass
    return "ok", ident


def read_manifest(root: str, digest: str, local: bool) -> tuple[str, Any]:
    """A manifest blob from a store layout: ``("ok", bytes)``, ``("missing", reason)``,
    ``("bad", reason)`` or ``("error", reason)``. In the cache mount the layout
    marker is checked first; in the ``local`` directory the atime is set to now."""
    if not local:
        problem = check_marker(root)
        if problem is not None:
            return "error", problem
    path = blob_path(root, digest)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST + 1)
    except FileNotFoundError:
        return "missing", "it does not have the manifest"
    except OSError as e:
        return "error", e.strerror or str(e)
    if len(data) > MAX_MANIFEST:
        return "bad", f"the manifest is larger than {MAX_MANIFEST} bytes"
    got = fmt.digest_of(data)
    if got != digest:
        return "bad", f"the manifest's content has digest {got}"
    if local:
        try:
            os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))
        except OSError:
            pass
    return "ok", data


def check_marker(root: str) -> str | None:
    """Why ``root`` is not an image store's root of the layout we read, or None."""
    marker = os.path.join(root, STORE_MARKER)
    try:
        with open(marker, "rb") as f:
            layout = json.loads(f.read(4096)).get("layout")
    except FileNotFoundError:
        return f"no {STORE_MARKER}: not an image store's root (not mounted?)"
    except (OSError, ValueError, AttributeError) as e:
        return f"unreadable {STORE_MARKER}: {getattr(e, 'strerror', None) or e}"
    if layout != STORE_LAYOUT:
        return f"layout {layout!r} is not supported (expected {STORE_LAYOUT})"
    return None


def save_blob(root: str, digest: str, data: bytes) -> None:
    """Write a small verified blob into a layout (temporary file, rename, mode 0444)."""
    path = blob_path(root, digest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{os.getpid()}.part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o444)
    os.replace(tmp, path)


def finish_download(path: str) -> Identity:
    os.chmod(path, 0o444)
    now = time.time_ns()
    os.utime(path, ns=(now, now))
    return identity(os.stat(path))


@dataclass
class GCResult:
    """What a garbage collection of the local directory did."""

    deleted: list[str] = field(default_factory=list)  # paths
    freed: int = 0
    total: int = 0  # bytes left


def collect(root: str, limit: int, pinned: Callable[[str], bool], now: float) -> GCResult:
    """Delete least recently used blobs of ``root`` until at most ``limit`` bytes remain."""
    result = GCResult()
    base = os.path.join(root, "blobs", "sha256")
    blobs: list[tuple[int, int, str, str]] = []  # (atime, size, path, digest)
    try:
        prefixes = os.listdir(base)
    except FileNotFoundError:
        return result
    for prefix in prefixes:
        directory = os.path.join(base, prefix)
        try:
            names = os.listdir(directory)
        except (NotADirectoryError, FileNotFoundError):
            continue
        for name in names:
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if name.startswith(".") and name.endswith(".part"):
                if now - st.st_mtime > PART_MAX_AGE:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                continue
            if len(name) == 64 and name.startswith(prefix) and stat.S_ISREG(st.st_mode):
                blobs.append((st.st_atime_ns, st.st_size, path, "sha256:" + name))
    result.total = sum(size for _, size, _, _ in blobs)
    if result.total <= limit:
        return result
    for _, size, path, digest in sorted(blobs):
        if result.total <= limit:
            break
        if pinned(digest):
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        result.deleted.append(path)
        result.freed += size
        result.total -= size
    return result


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
