"""Namespace byte quotas: what each namespace stores, and the checks against its limit.

A repository's *namespace* is its first path component (``alice`` for
``alice/fw/qemu``); top-level repositories (``fw``, the operators') share one
bucket, :data:`TOP_LEVEL`, limited by ``quota.top_level_bytes`` (0 by
default: unlimited). A namespace is charged:

- once for each distinct blob or manifest linked into any of its
  repositories (``_blobs`` and ``_manifests`` links), at the blob's size —
  a layer shared by ten of alice's repositories counts once for alice, and
  once for bob if bob links it too;
- plus the bytes received so far by its open upload sessions (a commit
  turns them into a blob link; a cancel or expiry frees them).

:class:`Ledger` keeps these sums in memory. It is updated by
:class:`~treadmill.imagestore.storage.Storage` whenever a link file is
created or removed (commits, mounts, manifest PUTs and DELETEs, blob
DELETEs, garbage collection), and by the upload sessions as bytes arrive,
so no request scans the disk. At start, :meth:`Ledger.rebuild` scans the
links in a thread (one ``stat`` per distinct blob) before the store
listens. Link changes come from threads of the store's pool, so every
method takes a ``threading.Lock`` for a few dictionary operations.

The checks raise ``403 DENIED`` with the namespace, its usage and limit.
They are made before bytes are accepted when the size is known (a
monolithic or chunk upload with ``Content-Length``) and for every batch of
an upload body (:meth:`Ledger.reserve_upload`, atomic with the charge), so
that bytes stored before the refusal stay and the session stays resumable.
A mount or a manifest PUT reserves its bytes the same way until its link is
written (and counted), so concurrent requests cannot overshoot a limit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from treadmill.images.oci import NAMESPACE
from treadmill.images.progress import human_size
from treadmill.imagestore.errors import OCIError

#: The bucket of top-level repositories (no ``/``): a name no user namespace can have.
TOP_LEVEL = "/"


def namespace_of(repository: str) -> str:
    """``alice`` for ``alice/fw``; :data:`TOP_LEVEL` for a top-level repository."""
    head, sep, _rest = repository.partition("/")
    return head if sep else TOP_LEVEL


def describe(namespace: str) -> str:
    return "the top-level repositories" if namespace == TOP_LEVEL else f"namespace {namespace}"


@dataclass(frozen=True)
class QuotaConfig:
    """Byte limits (0: unlimited) and the per-subject session limit."""

    namespace_bytes: int = 100 * 1024 ** 3
    top_level_bytes: int = 0
    namespaces: Mapping[str, int] = field(default_factory=dict)
    uploads_per_subject: int = 16

    def limit(self, namespace: str) -> int:
        if namespace == TOP_LEVEL:
            return self.top_level_bytes
        return self.namespaces.get(namespace, self.namespace_bytes)


def parse_overrides(value: Any, size: Any) -> dict[str, int]:
    """The ``quota.namespaces`` table: ``{"alice": "500G", "ci": 0}``; on the command
    line ``alice=500G,ci=0``. ``size`` converts a value (``tap.byte_size``)."""
    if isinstance(value, str):
        pairs: dict[str, Any] = {}
        for item in value.split(","):
            if not item.strip():
                continue
            key, sep, amount = item.partition("=")
            if not sep:
                raise ValueError(f"expected <namespace>=<size>, got {item.strip()!r}")
            pairs[key.strip()] = amount.strip()
        value = pairs
    if not isinstance(value, Mapping):
        raise ValueError("expected a table of namespace = size")
    result: dict[str, int] = {}
    for key, amount in value.items():
        if not isinstance(key, str) or not NAMESPACE.fullmatch(key):
            raise ValueError(f"invalid namespace {key!r}: expected one repository name "
                             "component such as \"alice\"")
        try:
            result[key] = size(amount)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    return result


class Ledger:
    """Bytes charged to each namespace (see the module docstring)."""

    log = Logger()

    def __init__(self, config: QuotaConfig):
        self.config = config
        self._lock = threading.Lock()
        # namespace -> digest -> the links that charge it ({(repository, kind)}).
        self._links: dict[str, dict[str, set[tuple[str, str]]]] = {}
        self._sizes: dict[str, int] = {}
        self._stored: dict[str, int] = {}
        # upload id -> (namespace, bytes charged); and each namespace's sum.
        self._upload: dict[str, tuple[str, int]] = {}
        self._uploading: dict[str, int] = {}
        self.refusals = 0

    # -- reading -----------------------------------------------------------------

    def stored(self, namespace: str) -> int:
        with self._lock:
            return self._stored.get(namespace, 0)

    def uploading(self, namespace: str) -> int:
        with self._lock:
            return self._uploading.get(namespace, 0)

    def used(self, namespace: str) -> int:
        with self._lock:
            return self._used(namespace)

    def _used(self, namespace: str) -> int:
        return self._stored.get(namespace, 0) + self._uploading.get(namespace, 0)

    def usage(self) -> dict[str, dict[str, int]]:
        """``{namespace: {"stored", "uploading", "limit"}}`` (the manhole's view)."""
        with self._lock:
            names = set(self._stored) | set(self._uploading)
            return {ns: {"stored": self._stored.get(ns, 0),
                         "uploading": self._uploading.get(ns, 0),
                         "limit": self.config.limit(ns)} for ns in sorted(names)}

    # -- checks ------------------------------------------------------------------

    def _refuse(self, namespace: str, used: int, adding: int, limit: int,
                what: str) -> OCIError:
        self.refusals += 1
        self.log.info("Quota: refused {what} of {adding} bytes in {namespace} "
                      "({used} of {limit} bytes used)", what=what, adding=adding,
                      namespace=namespace, used=used, limit=limit)
        return OCIError(
            "DENIED",
            f"quota exceeded for {describe(namespace)}: {used} bytes ({human_size(used)}) "
            f"stored or being uploaded of {limit} ({human_size(limit)}) allowed; {what} of "
            f"{adding} bytes would exceed it. Delete images or blobs, or cancel unfinished "
            f"uploads, to free space",
            detail={"namespace": namespace, "used": used, "limit": limit,
                    "requested": adding})

    def check(self, repository: str, adding: int, what: str,
              digest: str | None = None) -> None:
        """Raise ``DENIED`` if ``adding`` more bytes would take the namespace over its limit.

        With ``digest``, nothing is added if that digest is already charged.
        """
        namespace = namespace_of(repository)
        limit = self.config.limit(namespace)
        if limit <= 0 or adding <= 0:
            return
        with self._lock:
            if digest is not None and digest in self._links.get(namespace, {}):
                return
            used = self._used(namespace)
        if used + adding > limit:
            raise self._refuse(namespace, used, adding, limit, what)

    # -- links (called by Storage, usually in a thread) -------------------------------

    def linked(self, repository: str, kind: str, digest: str, size: int) -> None:
        namespace = namespace_of(repository)
        with self._lock:
            links = self._links.setdefault(namespace, {}).setdefault(digest, set())
            if not links:
                self._sizes[digest] = size
                self._stored[namespace] = self._stored.get(namespace, 0) + size
            links.add((repository, kind))

    def unlinked(self, repository: str, kind: str, digest: str) -> None:
        namespace = namespace_of(repository)
        with self._lock:
            by_digest = self._links.get(namespace, {})
            links = by_digest.get(digest)
            if links is None:
                return
            links.discard((repository, kind))
            if not links:
                del by_digest[digest]
                left = self._stored.get(namespace, 0) - self._sizes.get(digest, 0)
                if left:
                    self._stored[namespace] = left
                else:
                    self._stored.pop(namespace, None)
                if not by_digest:
                    del self._links[namespace]
                if not any(digest in d for d in self._links.values()):
                    self._sizes.pop(digest, None)

    # -- uploads -----------------------------------------------------------------------

    def reserve_upload(self, upload_id: str, repository: str, adding: int,
                       what: str = "an upload chunk", digest: str | None = None) -> bool:
        """Charge ``adding`` more bytes to an upload (or any pending change keyed by
        ``upload_id``), or raise ``DENIED`` (charging nothing).

        With ``digest``, nothing is charged (False) if the namespace holds it already.
        """
        namespace = namespace_of(repository)
        limit = self.config.limit(namespace)
        with self._lock:
            if digest is not None and digest in self._links.get(namespace, {}):
                return False
            used = self._used(namespace)
            if limit > 0 and adding > 0 and used + adding > limit:
                refused = (used, limit)
            else:
                refused = None
                self._set_upload(upload_id, namespace,
                                 self._upload.get(upload_id, (namespace, 0))[1] + adding)
        if refused is not None:
            raise self._refuse(namespace, refused[0], adding, refused[1], what)
        return True

    def set_upload(self, upload_id: str, repository: str, size: int) -> None:
        """The upload holds ``size`` bytes (after a write, or found on disk at start)."""
        with self._lock:
            self._set_upload(upload_id, namespace_of(repository), size)

    def drop_upload(self, upload_id: str) -> None:
        """The upload was committed, cancelled or expired."""
        with self._lock:
            self._set_upload(upload_id, None, 0)

    def _set_upload(self, upload_id: str, namespace: str | None, size: int) -> None:
        old = self._upload.pop(upload_id, None)
        if old is not None:
            # A namespace whose uploads hold 0 bytes has no entry (even with sessions).
            total = self._uploading.get(old[0], 0) - old[1]
            if total:
                self._uploading[old[0]] = total
            else:
                self._uploading.pop(old[0], None)
        if namespace is not None:
            self._upload[upload_id] = (namespace, size)
            total = self._uploading.get(namespace, 0) + size
            if total:
                self._uploading[namespace] = total

    # -- start -------------------------------------------------------------------------

    def rebuild(self, storage: Any) -> dict[str, int]:
        """Recount every link on disk (blocking: run it in a thread, before listening).

        Upload sessions are not counted here (the upload sessions register theirs).
        """
        links: dict[str, dict[str, set[tuple[str, str]]]] = {}
        sizes: dict[str, int] = {}
        for kind, pairs in (("blob", storage.blob_links()),
                            ("manifest", storage.manifest_links())):
            for repository, digest in pairs:
                if digest not in sizes:
                    try:
                        sizes[digest] = os.stat(storage.blob_path(digest)).st_size
                    except OSError:
                        continue  # a link to a missing blob charges nothing
                by_digest = links.setdefault(namespace_of(repository), {})
                by_digest.setdefault(digest, set()).add((repository, kind))
        stored = {ns: sum(sizes[d] for d in by_digest) for ns, by_digest in links.items()}
        with self._lock:
            self._links, self._sizes = links, sizes
            self._stored = {ns: n for ns, n in stored.items() if n}
        return dict(stored)
