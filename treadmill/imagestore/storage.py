"""The image store's files: a stable, content-addressed layout on disk.

This layout is a contract: supervisors and image caches open it read-only
(often over NFS), so it changes only with a new ``layout`` version in
``ROOT/treadmill-imagestore.json``. ``docs/imagestore.md`` documents it::

    ROOT/
      treadmill-imagestore.json           {"layout": 1}
      treadmill-imagestore.lock           flock()ed by the one store process of the root
      blobs/sha256/<hh>/<hex>             blob bytes; hh = first 2 hex digits; mode 0440
      repositories/<name>/                name may hold "/": nested directories
        _manifests/<hex>                  manifest sha256:<hex> is in the repository;
                                          the file holds its media type (one line)
        _tags/<tag>                       the tag's manifest digest, "sha256:<hex>\\n"
        _blobs/<hex>                      blob sha256:<hex> may be pulled from the
                                          repository; the file holds the digest
      uploads/<uuid>/data                 an upload in progress (never read by others)
      uploads/<uuid>/state.json
      tmp/                                scratch files, renamed into place
      cache/                              an image cache's private state (leases,
                                          last-use index); only in cache mode

Guarantees for readers:

- A file under ``blobs/`` exists only once complete, verified against its
  digest and fsynced; it is never modified afterwards, only (by garbage
  collection) unlinked. Manifests are blobs too.
- Tags, manifest and blob links are replaced atomically (rename).
- Repository name components never start with ``_`` (the naming rule
  forbids it), so ``_manifests``, ``_tags`` and ``_blobs`` cannot clash with
  a nested repository.

Every method here is synchronous and may block on disk: the API calls the
writing ones in a thread pool. One store process owns a root (``init`` locks
it, ``close`` lets it go); read-only readers may be many.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from treadmill.common.files import write_file
from treadmill.images.format import is_digest
from treadmill.images.oci import is_repository
from treadmill.imagestore.names import hex_of, is_tag

LAYOUT_VERSION = 1
MARKER = "treadmill-imagestore.json"
LOCK = "treadmill-imagestore.lock"

_DIR_MODE = 0o750
_FILE_MODE = 0o640
_BLOB_MODE = 0o440


def fsync_dir(path: str) -> None:
    """fsync a directory so that a rename, link or unlink in it is durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    path: str
    size: int
    mtime: float


class Storage:
    """The files of one store root."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.blobs = os.path.join(self.root, "blobs", "sha256")
        self.repos = os.path.join(self.root, "repositories")
        self.uploads = os.path.join(self.root, "uploads")
        self.tmp = os.path.join(self.root, "tmp")
        self.cache = os.path.join(self.root, "cache")
        # Told when a repository link appears or goes (a quota.Ledger; None: no quotas).
        self.ledger: Any = None
        self._lock_fd: int | None = None

    # -- setup ---------------------------------------------------------------

    def init(self) -> None:
        """Lock the root, create the layout (idempotent), check its version, empty ``tmp/``.

        Raises ``RuntimeError`` if another store process holds the root: a second one
        would empty the first one's ``tmp/`` and take over its upload sessions.
        """
        os.makedirs(self.root, exist_ok=True)
        self._lock()
        try:
            self._init_layout()
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        """Hold ``ROOT/treadmill-imagestore.lock`` (``flock``, NFS too) holding our pid."""
        if self._lock_fd is not None:
            return
        path = os.path.join(self.root, LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(f"{self.root} is in use by another image store process "
                               f"(pid {holder}, holding {path}); one process owns a root"
                               ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        """Let the root go (the lock file stays, unlocked)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _init_layout(self) -> None:
        marker = os.path.join(self.root, MARKER)
        try:
            with open(marker, "rb") as f:
                layout = json.load(f).get("layout")
        except FileNotFoundError:
            layout = None
        except (OSError, ValueError, AttributeError) as e:
            raise RuntimeError(f"{marker}: unreadable layout marker: {e}") from None
        if layout is not None and layout != LAYOUT_VERSION:
            raise RuntimeError(f"{marker}: layout {layout} is not supported "
                               f"(this store writes layout {LAYOUT_VERSION})")
        for path in (self.blobs, self.repos, self.uploads, self.tmp):
            self._ensure_dir(path)
        os.chmod(self.uploads, 0o700)
        os.chmod(self.tmp, 0o700)
        if layout is None:
            self._write_atomic(marker, json.dumps({"layout": LAYOUT_VERSION}).encode() + b"\n")
        for entry in os.listdir(self.tmp):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.tmp, entry))

    # -- helpers -------------------------------------------------------------

    def _ensure_dir(self, path: str) -> None:
        """Create ``path`` and missing parents durably, readable by readers."""
        if os.path.isdir(path):
            return
        parent = os.path.dirname(path)
        if parent != path:
            self._ensure_dir(parent)
        try:
            os.mkdir(path, _DIR_MODE)
        except FileExistsError:
            return
        os.chmod(path, _DIR_MODE)
        fsync_dir(parent)

    def _tmp_name(self) -> str:
        return os.path.join(self.tmp, secrets.token_hex(12))

    def _write_atomic(self, path: str, data: bytes, mode: int = _FILE_MODE) -> None:
        """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync directory."""
        self._ensure_dir(os.path.dirname(path))
        tmp = self._tmp_name()
        write_file(tmp, data, flags=os.O_EXCL, chmod=mode)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(os.path.dirname(path))

    def write_atomic(self, path: str, data: bytes, mode: int = _FILE_MODE) -> None:
        """Replace ``path`` (under the root) atomically; see :meth:`_write_atomic`."""
        self._write_atomic(path, data, mode)

    def ensure_private_dir(self, path: str) -> None:
        """Create ``path`` (under the root) with mode 0700."""
        self._ensure_dir(path)
        os.chmod(path, 0o700)

    def _unlink(self, path: str) -> bool:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        fsync_dir(os.path.dirname(path))
        return True

    @staticmethod
    def _read_small(path: str, limit: int = 4096) -> str | None:
        try:
            with open(path, "rb") as f:
                return f.read(limit).decode("utf-8", "replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    # -- blobs ---------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        hexd = hex_of(digest)
        return os.path.join(self.blobs, hexd[:2], hexd)

    def blob_info(self, digest: str) -> BlobInfo | None:
        path = self.blob_path(digest)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return BlobInfo(digest, path, st.st_size, st.st_mtime)

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def read_blob(self, digest: str, limit: int) -> bytes | None:
        """A small blob's bytes (manifests), or None."""
        try:
            with open(self.blob_path(digest), "rb") as f:
                return f.read(limit + 1)[:limit]
        except FileNotFoundError:
            return None

    def commit_file(self, path: str, digest: str) -> bool:
        """Make the verified, fsynced file ``path`` the blob ``digest``.

        ``os.link`` is atomic and refuses to replace: when two uploads of one
        blob finish together, one link wins and the other finds the blob
        there. Either way the blob's mtime is now, which protects it from
        garbage collection for the grace period. True if the blob is new.
        """
        target = self.blob_path(digest)
        self._ensure_dir(os.path.dirname(target))
        os.chmod(path, _BLOB_MODE)
        # The mtime says when the blob was last committed: garbage collection
        # spares blobs younger than its grace period (an upload written long
        # ago and committed now counts as new).
        os.utime(path)
        try:
            os.link(path, target)
        except FileExistsError:
            with contextlib.suppress(OSError):
                os.utime(target)
            return False
        fsync_dir(os.path.dirname(target))
        return True

    def put_blob_bytes(self, data: bytes) -> tuple[str, bool]:
        """Store small bytes (a manifest) as a blob; return its digest and whether it is new."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        tmp = self._tmp_name()
        write_file(tmp, data, flags=os.O_EXCL)
        try:
            return digest, self.commit_file(tmp, digest)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every blob in the store (for garbage collection)."""
        try:
            prefixes = sorted(os.listdir(self.blobs))
        except FileNotFoundError:
            return
        for prefix in prefixes:
            directory = os.path.join(self.blobs, prefix)
            try:
                entries = sorted(os.listdir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                digest = "sha256:" + entry
                if not is_digest(digest) or entry[:2] != prefix:
                    continue
                path = os.path.join(directory, entry)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                yield BlobInfo(digest, path, st.st_size, st.st_mtime)

    def delete_blob(self, digest: str) -> bool:
        return self._unlink(self.blob_path(digest))

    def remove_blob(self, digest: str, linked_from: Iterable[str]) -> tuple[bool, int]:
        """Delete a blob and its links in the repositories ``linked_from`` (garbage
        collection, eviction): whether the blob was there, and how many links were."""
        deleted = self.delete_blob(digest)
        return deleted, sum(self.unlink_blob(name, digest) for name in linked_from)

    # -- repositories --------------------------------------------------------

    def repo_path(self, name: str) -> str:
        assert is_repository(name), name
        return os.path.join(self.repos, *name.split("/"))

    def repository_exists(self, name: str) -> bool:
        base = self.repo_path(name)
        return any(os.path.isdir(os.path.join(base, sub))
                   for sub in ("_manifests", "_blobs", "_tags"))

    def repositories(self) -> list[str]:
        """Every repository name, sorted."""
        found: list[str] = []
        for directory, subdirs, _files in os.walk(self.repos):
            if any(sub in subdirs for sub in ("_manifests", "_blobs", "_tags")):
                name = os.path.relpath(directory, self.repos).replace(os.sep, "/")
                if is_repository(name):
                    found.append(name)
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("_"))
        return sorted(found)

    # blob links

    def _blob_link(self, name: str, digest: str) -> str:
        return os.path.join(self.repo_path(name), "_blobs", hex_of(digest))

    def blob_linked(self, name: str, digest: str) -> bool:
        return os.path.exists(self._blob_link(name, digest)) and self.has_blob(digest)

    def link_blob(self, name: str, digest: str) -> None:
        path = self._blob_link(name, digest)
        if not os.path.exists(path):
            self._write_atomic(path, digest.encode() + b"\n")
        self._charge(name, "blob", digest)

    def unlink_blob(self, name: str, digest: str) -> bool:
        found = self._unlink(self._blob_link(name, digest))
        if self.ledger is not None:
            self.ledger.unlinked(name, "blob", digest)
        return found

    def _charge(self, name: str, kind: str, digest: str) -> None:
        if self.ledger is not None:
            info = self.blob_info(digest)
            self.ledger.linked(name, kind, digest, info.size if info is not None else 0)

    # manifests

    def _manifest_link(self, name: str, digest: str) -> str:
        return os.path.join(self.repo_path(name), "_manifests", hex_of(digest))

    def manifest_media_type(self, name: str, digest: str) -> str | None:
        """The media type of manifest ``digest`` in ``name``, None if not there."""
        media_type = self._read_small(self._manifest_link(name, digest))
        if media_type is None or not self.has_blob(digest):
            return None
        return media_type

    def link_manifest(self, name: str, digest: str, media_type: str) -> None:
        path = self._manifest_link(name, digest)
        if self._read_small(path) != media_type:
            self._write_atomic(path, media_type.encode() + b"\n")
        self._charge(name, "manifest", digest)

    def unlink_manifest(self, name: str, digest: str) -> bool:
        """Remove a manifest from a repository, and every tag that points to it."""
        found = self._unlink(self._manifest_link(name, digest))
        if self.ledger is not None:
            self.ledger.unlinked(name, "manifest", digest)
        for tag in self.tags(name) or []:
            if self.read_tag(name, tag) == digest:
                self.delete_tag(name, tag)
        return found

    def manifest_links(self) -> Iterator[tuple[str, str]]:
        """Every (repository, manifest digest) pair (for garbage collection)."""
        return self._links("_manifests")

    def blob_links(self) -> Iterator[tuple[str, str]]:
        """Every (repository, linked blob digest) pair."""
        return self._links("_blobs")

    def _links(self, kind: str) -> Iterator[tuple[str, str]]:
        """Every (repository, digest) pair linked in the repositories' ``kind`` directory."""
        for name in self.repositories():
            try:
                entries = os.listdir(os.path.join(self.repo_path(name), kind))
            except FileNotFoundError:
                continue
            for entry in entries:
                if is_digest("sha256:" + entry):
                    yield name, "sha256:" + entry

    # tags

    def _tag_path(self, name: str, tag: str) -> str:
        assert is_tag(tag), tag
        return os.path.join(self.repo_path(name), "_tags", tag)

    def read_tag(self, name: str, tag: str) -> str | None:
        value = self._read_small(self._tag_path(name, tag))
        return value if value and is_digest(value) else None

    def write_tag(self, name: str, tag: str, digest: str) -> None:
        self._write_atomic(self._tag_path(name, tag), digest.encode() + b"\n")

    def tag_mtime(self, name: str, tag: str) -> float | None:
        """When the tag file was last written or touched (None if absent)."""
        try:
            return os.stat(self._tag_path(name, tag)).st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None

    def touch_tag(self, name: str, tag: str) -> None:
        """Set the tag file's mtime to now (its content is unchanged)."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.utime(self._tag_path(name, tag))

    def delete_tag(self, name: str, tag: str) -> bool:
        return self._unlink(self._tag_path(name, tag))

    def tags(self, name: str) -> list[str] | None:
        """The repository's tags, sorted; None if the repository does not exist."""
        if not self.repository_exists(name):
            return None
        try:
            entries = os.listdir(os.path.join(self.repo_path(name), "_tags"))
        except FileNotFoundError:
            return []
        return sorted(entry for entry in entries if is_tag(entry))

    # -- uploads -------------------------------------------------------------

    def upload_dir(self, upload_id: str) -> str:
        return os.path.join(self.uploads, upload_id)

    def remove_upload(self, upload_id: str) -> None:
        shutil.rmtree(self.upload_dir(upload_id), ignore_errors=True)
