"""Garbage collection: delete blobs that no manifest references.

Collection is an explicit action (``POST /admin/gc`` with a
``registry:gc:*`` capability, or ``imagestore.collect_garbage()`` in the
manhole), and repeated every ``gc.interval`` seconds (hourly by default; 0: never).
Removing the repositories' links to deleted blobs frees the namespaces'
quota (:mod:`~treadmill.imagestore.quota`).

A run has three phases:

1. **Mark** (thread, no lock): read every manifest linked in any repository
   and collect the digests it names anywhere (config, layers, child
   manifests, subject, ...) plus the manifest digests themselves.
2. **Candidates** (thread, no lock): every blob not marked whose mtime is
   older than the run's *cutoff* (its start time minus ``gc.grace``).
3. **Sweep** (thread, in batches, each under the store's exclusive lock):
   delete each candidate unless, since the run began, it was referenced by a
   manifest PUT, committed or re-committed by an upload (which bumps its
   mtime past the cutoff), mounted, or seen by a blob ``HEAD``/``GET``; and
   remove repository links to the deleted blobs.

Races, and why none loses data a client relies on: manifest PUTs, upload
commits, mounts and blob HEAD/GETs each hold the *shared* side of one lock
(:class:`SharedExclusiveLock`) while they check for a blob and record that
they use it; a sweep batch holds the *exclusive* side while it re-checks
and deletes. So a blob a manifest PUT has found is either recorded as
referenced before the batch looks at it, or deleted before the PUT looks
(which then answers ``MANIFEST_BLOB_UNKNOWN`` and the client uploads it
again). A client that HEADs a blob, skips uploading it and pushes its
manifest later is protected for ``gc.grace`` seconds after the HEAD (in
this process's memory). Uploads in progress live under ``uploads/``, which
collection never touches. Only one store process may own a root.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from treadmill.imagestore import manifests
from treadmill.imagestore.storage import BlobInfo, Storage

SWEEP_BATCH = 256


class SharedExclusiveLock:
    """A readers-writer lock of Deferreds; waiters are served in order (no starvation)."""

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting: collections.deque[tuple[bool, Deferred[None]]] = collections.deque()

    def _can(self, exclusive: bool) -> bool:
        if self._exclusive:
            return False
        return self._shared == 0 if exclusive else True

    def _grant(self, exclusive: bool) -> None:
        if exclusive:
            self._exclusive = True
        else:
            self._shared += 1

    def acquire(self, exclusive: bool = False) -> Deferred[None]:
        if not self._waiting and self._can(exclusive):
            self._grant(exclusive)
            return succeed(None)

        def cancel(d: Deferred[None]) -> None:
            try:
                self._waiting.remove((exclusive, d))
            except ValueError:
                pass

        d: Deferred[None] = Deferred(cancel)
        self._waiting.append((exclusive, d))
        return d

    def release(self, exclusive: bool = False) -> None:
        if exclusive:
            assert self._exclusive
            self._exclusive = False
        else:
            assert self._shared > 0
            self._shared -= 1
        while self._waiting and self._can(self._waiting[0][0]):
            kind, d = self._waiting.popleft()
            self._grant(kind)
            d.callback(None)



def shield(work: Deferred[Any]) -> Deferred[Any]:
    """A Deferred that follows ``work`` but whose cancellation leaves ``work`` running.

    Klein cancels a handler when its client goes away; disk work that holds
    a lock or an upload must finish (and release them) all the same.
    """
    out: Deferred[Any] = Deferred()

    def forward(result: Any) -> None:
        if not out.called:
            out.callback(result)  # a Failure fires the errbacks

    work.addBoth(forward)
    return out


def under_lock(lock: SharedExclusiveLock, fn: Callable[[], Any],
               exclusive: bool = False) -> Deferred[Any]:
    """Run ``fn()`` (which may return a Deferred) holding ``lock``.

    The lock is released when the work is really over, never early because
    the caller was cancelled (see :func:`shield`).
    """

    def run(_: Any) -> Deferred[Any]:
        d = maybeDeferred(fn)

        def release(result: Any) -> Any:
            lock.release(exclusive)
            return result

        return d.addBoth(release)

    return shield(lock.acquire(exclusive).addCallback(run))


class Collector:
    """Finds and deletes unreferenced blobs (see the module docstring)."""

    log = Logger()

    def __init__(self, reactor: Any, storage: Storage, pool: Any, lock: SharedExclusiveLock,
                 *, grace: float = 3600.0):
        self.reactor = reactor
        self.storage = storage
        self.pool = pool
        self.lock = lock
        self.grace = grace
        self.seen: dict[str, float] = {}
        self._referenced: set[str] | None = None
        self._waiters: list[Deferred[dict[str, Any]]] = []
        self.runs = 0
        self.deleted_total = 0
        # Called (and awaited) between the candidate scan and the sweep: a seam
        # for tests that race requests against a collection.
        self.before_sweep: Callable[[], Any] | None = None
        self.last: dict[str, Any] | None = None
        # In cache mode: the digests leased or in use (called on the reactor, under
        # the exclusive lock), and their expansion to every blob a leased manifest
        # references (called in the sweep's thread). Never collected.
        self.protect: Callable[[], set[str]] | None = None
        self.expand: Callable[[set[str]], set[str]] | None = None

    # -- hooks called under the shared lock ------------------------------------

    def note_seen(self, digest: str) -> None:
        """A client learnt that the blob exists (HEAD, GET, mount, re-upload)."""
        now = self.reactor.seconds()
        self.seen[digest] = now
        if len(self.seen) > 100_000:
            self.seen = {d: when for d, when in self.seen.items() if when >= now - self.grace}

    def note_referenced(self, digests: Iterable[str]) -> None:
        """A manifest PUT now references these digests."""
        if self._referenced is not None:
            self._referenced.update(digests)

    # -- running ---------------------------------------------------------------

    def _thread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    def collect(self) -> Deferred[dict[str, Any]]:
        """Run a collection, or join the one running; fires with a summary."""
        d: Deferred[dict[str, Any]] = Deferred()
        self._waiters.append(d)
        if len(self._waiters) == 1:
            Deferred.fromCoroutine(self._collect()).addBoth(self._finished)
        return d

    @property
    def running(self) -> bool:
        return bool(self._waiters)

    def _finished(self, result: Any) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(result)  # a Failure fires the errbacks

    def _mark(self) -> tuple[set[str], dict[str, list[str]]]:
        marked: set[str] = set()
        for _name, digest in self.storage.manifest_links():
            marked.add(digest)
            body = self.storage.read_blob(digest, 64 * 1024 * 1024)
            if body is not None:
                marked.update(manifests.references(body))
        links: dict[str, list[str]] = collections.defaultdict(list)
        for name, digest in self.storage.blob_links():
            links[digest].append(name)
        return marked, dict(links)

    def _candidates(self, marked: set[str], cutoff: float) -> list[BlobInfo]:
        return [info for info in self.storage.iter_blobs()
                if info.digest not in marked and info.mtime < cutoff]

    def _sweep(self, batch: list[BlobInfo], keep: set[str], cutoff: float,
               links: dict[str, list[str]], protected: set[str] | None = None,
               ) -> tuple[int, int, int]:
        deleted = freed = unlinked = 0
        if protected:
            keep = keep | (self.expand(protected) if self.expand is not None else protected)
        for info in batch:
            if info.digest in keep:
                continue
            current = self.storage.blob_info(info.digest)
            if current is None or current.mtime >= cutoff:
                continue
            found, removed = self.storage.remove_blob(info.digest, links.get(info.digest, ()))
            if found:
                deleted += 1
                freed += current.size
            unlinked += removed
        return deleted, freed, unlinked

    async def _collect(self) -> dict[str, Any]:
        started = time.monotonic()
        now = self.reactor.seconds()
        cutoff = now - self.grace
        self._referenced = set()
        try:
            marked, links = await self._thread(self._mark)
            candidates = await self._thread(self._candidates, marked, cutoff)
            if self.before_sweep is not None:
                result = self.before_sweep()
                if result is not None:
                    await result
            deleted = freed = unlinked = 0
            for i in range(0, len(candidates), SWEEP_BATCH):
                batch = candidates[i:i + SWEEP_BATCH]

                def sweep(batch: list[BlobInfo] = batch) -> Deferred[tuple[int, int, int]]:
                    keep = set(self._referenced or ())
                    keep.update(d for d, when in self.seen.items() if when >= cutoff)
                    protected = self.protect() if self.protect is not None else None
                    return self._thread(self._sweep, batch, keep, cutoff, links, protected)

                counts = await under_lock(self.lock, sweep, exclusive=True)
                deleted += counts[0]
                freed += counts[1]
                unlinked += counts[2]
        finally:
            self._referenced = None
        horizon = self.reactor.seconds() - self.grace
        self.seen = {d: when for d, when in self.seen.items() if when >= horizon}
        self.runs += 1
        self.deleted_total += deleted
        summary = {"deleted": deleted, "freed_bytes": freed, "links_removed": unlinked,
                   "referenced": len(marked), "candidates": len(candidates),
                   "seconds": round(time.monotonic() - started, 3)}
        self.last = summary
        self.log.info("Garbage collection: deleted {deleted} blobs ({freed_bytes} bytes) of "
                      "{candidates} candidates; {referenced} referenced", **summary)
        return summary
