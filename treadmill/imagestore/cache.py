"""The image cache: an image store that pulls through, leases, evicts and replicates.

With ``cache.enabled`` an image store becomes a site-local cache of its
upstream stores (``cache.upstreams``, tried in order). It still serves the
ordinary registry API with the same authorisation; in addition:

- **Pull-through** (:mod:`~treadmill.imagestore.pullthrough`): a manifest or
  blob a client asks for and the cache lacks is fetched from the upstreams,
  verified, committed into the ordinary stable layout and served. A tag is
  checked against the upstreams again once it is older than
  ``cache.tag_refresh`` seconds (served as it is if they cannot be reached).
- **Leases** (:mod:`~treadmill.imagestore.leases`): what a running job uses
  is never evicted; a lease may also ask the cache to fetch an image before
  a supervisor opens its blobs over NFS.
- **Eviction**: when the blobs exceed ``cache.max_bytes``, the least
  recently used blobs that no lease protects and no request is serving are
  deleted (with their repository links) until the cache is under the bound.
  Last use is kept in memory, updated when a blob or manifest is served,
  committed or leased, and flushed to ``ROOT/cache/usage.json`` by the
  periodic maintenance (NFS atime is unreliable); a blob without an entry
  counts as used when it was committed (its mtime).
- **Replication** (:mod:`~treadmill.imagestore.replicate`): upload an image to
  another store.

Eviction and garbage collection share the store's lock: a sweep batch holds
its exclusive side, and requests that check for a blob and start using it
(serving, commits, lease creation) hold its shared side. Blobs being served,
fetched for a lease or replicated are *pinned* (a counter in memory) and
leased blobs are protected, from eviction and collection alike.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    TimeoutError,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from treadmill.common.settingsfile import config_class
from treadmill.images.format import is_digest
from treadmill.images.oci import RegistryClient
from treadmill.imagestore import manifests
from treadmill.imagestore.errors import OCIError
from treadmill.imagestore.gc import Collector, SharedExclusiveLock, under_lock
from treadmill.imagestore.leases import PER_OWNER_MAX, Lease, Leases, new_lease_id, rfc3339
from treadmill.imagestore.names import check_reference, hex_of
from treadmill.imagestore.pullthrough import (
    Credentials,
    Flight,
    PullThrough,
    UpstreamNotFound,
    registry_client,
)
from treadmill.imagestore.replicate import Replicator
from treadmill.imagestore.settings import SETTINGS
from treadmill.imagestore.storage import BlobInfo, Storage

USAGE_FILE = "usage.json"
EVICT_BATCH = 256
FETCH_PARALLEL = 4
MANIFEST_READ_MAX = 4 * 1024 * 1024
REFRESH_WAIT = 5.0
_REFS_MEMO_MAX = 200_000


@config_class(SETTINGS, "cache")
class CacheConfig:
    """The ``cache.*`` and ``replicate.*`` settings (``docs/imagestore.md``; the fields they
    fill, their types and defaults: ``settings.toml``), and the credentials the cache sends
    (the ``cache.upstream_*`` and ``replicate.*`` groups)."""

    upstream: Credentials = field(default_factory=Credentials)
    upstream_backoff: float = 0.5  # not a setting: seconds to an upstream's first retry
    replicate: Credentials = field(default_factory=Credentials)


def url_under(url: str, prefixes: Iterable[str]) -> bool:
    """Whether ``url`` is one of ``prefixes`` or below one (scheme and host must match)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    for prefix in prefixes:
        p = urlsplit(prefix)
        if (u.scheme.lower(), u.netloc.lower()) != (p.scheme.lower(), p.netloc.lower()):
            continue
        base = p.path.rstrip("/")
        if not base or u.path.rstrip("/") == base or u.path.startswith(base + "/"):
            return True
    return False


@dataclass
class LeaseFetch:
    """Fetching what a lease names (``fetch``): its state, for ``GET /cache/leases/<id>``."""

    state: str = "fetching"  # fetching, done, failed
    error: str | None = None
    work: Deferred[Any] | None = None
    finished: Flight = field(default_factory=Flight)


async def _gather(ds: list[Deferred[Any]]) -> None:
    """Wait for all; then raise the first failure, if any."""
    results = await DeferredList(ds, consumeErrors=True)
    for ok, value in results:
        if not ok:
            assert isinstance(value, Failure)
            value.raiseException()


class Cache:
    """The cache side of an image store (see the module docstring)."""

    log = Logger()

    def __init__(self, reactor: Any, storage: Storage, pool: Any, lock: SharedExclusiveLock,
                 collector: Collector, config: CacheConfig, *, realm: str | None = None):
        self.reactor = reactor
        self.storage = storage
        self.pool = pool
        self.lock = lock
        self.collector = collector
        self.config = config
        self.realm = realm
        clients = [registry_client(reactor, url, config.upstream, realm=realm,
                                   retries=config.upstream_retries,
                                   timeout=config.upstream_timeout,
                                   backoff=config.upstream_backoff,
                                   # A waiting client gets its 503 and Retry-After
                                   # after upstream_retries attempts per upstream.
                                   retry_time=0.0)
                   for url in config.upstreams]
        self.pull = PullThrough(reactor, storage, pool, lock, collector, clients,
                                retry_after=config.retry_after, on_commit=self.committed)
        self.leases = Leases(storage)
        self.leases_per_owner = PER_OWNER_MAX
        self._creating: collections.Counter[str] = collections.Counter()  # owners' new leases
        self.lease_fetches: dict[str, LeaseFetch] = {}
        self.replicator = Replicator(storage, self.pull, manifest_for=self.manifest_for,
                                     pin=self.pin, unpin=self.unpin,
                                     connect=self.replication_client)
        self.usage: dict[str, float] = {}
        self._usage_dirty = False
        self.pins: collections.Counter[str] = collections.Counter()
        self.total_bytes = 0
        self.blob_count = 0
        self._refs: dict[str, tuple[str, ...]] = {}
        self._evict_waiters: list[Deferred[dict[str, Any]]] = []
        self._evict_again = False
        self.evict_runs = 0
        self.evicted_blobs = 0
        self.evicted_bytes = 0
        self.hits = 0
        self.misses = 0
        self.last_eviction: dict[str, Any] | None = None
        collector.protect = self.protection
        collector.expand = self.expand

    def _thread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    def now(self) -> float:
        return float(self.reactor.seconds())

    # -- start and stop ------------------------------------------------------------

    def _load(self) -> tuple[list[Lease], dict[str, float], int, int]:
        leases = self.leases.load()
        usage: dict[str, float] = {}
        path = os.path.join(self.storage.cache, USAGE_FILE)
        try:
            with open(path, "rb") as f:
                raw = json.load(f).get("last_use", {})
            for hexd, when in raw.items():
                if is_digest("sha256:" + hexd) and isinstance(when, int | float):
                    usage["sha256:" + hexd] = float(when)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as e:
            self.log.warn("Ignoring the last-use index {path}: {error}", path=path, error=str(e))
        total = count = 0
        for info in self.storage.iter_blobs():
            total += info.size
            count += 1
        return leases, usage, total, count

    async def start(self) -> None:
        for key, path in (("cache.upstream_token_file", self.config.upstream.token_file),
                          ("replicate.token_file", self.config.replicate.token_file)):
            if path and not os.access(path, os.R_OK):
                self.log.warn("{key}: cannot read {path}; requests that need it will fail",
                              key=key, path=path)
        leases, usage, total, count = await self._thread(self._load)
        for lease in leases:
            self.leases.leases[lease.id] = lease
        self.usage.update(usage)
        self.total_bytes, self.blob_count = total, count
        self.log.info("Image cache of {upstreams}: {count} blobs, {total} bytes (bound "
                      "{bound}), {leases} leases", upstreams=", ".join(self.pull.upstreams) or
                      "no upstream", count=count, total=total,
                      bound=self.config.max_bytes or "none", leases=len(leases))
        await self.expire_leases()
        self.maybe_evict()

    async def stop(self) -> None:
        self.replicator.stop()
        for job in self.lease_fetches.values():
            if job.work is not None and not job.work.called:
                job.work.cancel()
        await self.pull.close()
        with contextlib.suppress(Exception):
            await self.flush_usage()

    # -- last use --------------------------------------------------------------------

    def touch(self, *digests: str) -> None:
        now = self.now()
        for digest in digests:
            self.usage[digest] = now
        self._usage_dirty = True

    def committed(self, digest: str, size: int, new: bool) -> None:
        """A blob was committed (pulled through or uploaded)."""
        self.touch(digest)
        if new:
            self.total_bytes += size
            self.blob_count += 1
        self.maybe_evict()

    def _write_usage(self, usage: dict[str, float]) -> None:
        data = {"version": 1, "last_use": {hex_of(d): round(t, 3) for d, t in usage.items()}}
        self.storage.ensure_private_dir(self.storage.cache)
        self.storage.write_atomic(os.path.join(self.storage.cache, USAGE_FILE),
                                  json.dumps(data, separators=(",", ":")).encode(), 0o600)

    async def flush_usage(self) -> None:
        if not self._usage_dirty:
            return
        self._usage_dirty = False
        try:
            await self._thread(self._write_usage, dict(self.usage))
        except BaseException:
            self._usage_dirty = True
            raise

    # -- pins and protection -----------------------------------------------------------

    def pin(self, digest: str) -> None:
        self.pins[digest] += 1

    def unpin(self, digest: str) -> None:
        self.pins[digest] -= 1
        if self.pins[digest] <= 0:
            del self.pins[digest]

    def protection(self) -> set[str]:
        """Digests leased or pinned now (on the reactor; :meth:`expand` in a thread)."""
        return self.leases.digests(self.now()) | set(self.pins)

    def _read_refs(self, digest: str) -> tuple[str, ...] | None:
        info = self.storage.blob_info(digest)
        if info is None:
            return None
        if info.size < 2 or info.size > MANIFEST_READ_MAX:
            return ()
        body = self.storage.read_blob(digest, MANIFEST_READ_MAX)
        if body is None:
            return None
        if not body.lstrip()[:1] == b"{":
            return ()
        return tuple(d for d in manifests.references(body) if d != digest)

    def expand(self, digests: set[str]) -> set[str]:
        """``digests`` and, recursively, everything the manifests among them reference
        (as far as those manifests are in the cache). Blocking: call it in a thread."""
        out: set[str] = set()
        stack = list(digests)
        while stack:
            digest = stack.pop()
            if digest in out:
                continue
            out.add(digest)
            refs = self._refs.get(digest)
            if refs is None:
                refs = self._read_refs(digest)
                if refs is None:
                    continue
                if len(self._refs) > _REFS_MEMO_MAX:
                    self._refs.clear()
                self._refs[digest] = refs
            stack.extend(refs)
        return out

    # -- eviction ------------------------------------------------------------------------

    def maybe_evict(self) -> None:
        """Start an eviction if the cache looks over its bound."""
        bound = self.config.max_bytes
        if not bound or self.total_bytes <= bound:
            return
        if self._evict_waiters:
            self._evict_again = True
            return
        self.evict().addErrback(lambda f: self.log.failure("Eviction failed", f))

    def evict(self) -> Deferred[dict[str, Any]]:
        """Evict until under ``cache.max_bytes`` (or join the run in progress)."""
        d: Deferred[dict[str, Any]] = Deferred()
        self._evict_waiters.append(d)
        if len(self._evict_waiters) == 1:
            Deferred.fromCoroutine(self._evict()).addBoth(self._evicted)
        return d

    def _evicted(self, result: Any) -> None:
        waiters, self._evict_waiters = self._evict_waiters, []
        for d in waiters:
            d.callback(result)
        if self._evict_again:
            self._evict_again = False
            self.maybe_evict()

    def _scan(self) -> list[BlobInfo]:
        return list(self.storage.iter_blobs())

    def _links_of(self, digests: set[str]) -> dict[str, list[str]]:
        links: dict[str, list[str]] = collections.defaultdict(list)
        for name, digest in self.storage.blob_links():
            if digest in digests:
                links[digest].append(name)
        return dict(links)

    def _sweep(self, batch: list[BlobInfo], protected: set[str], changed: set[str],
               links: dict[str, list[str]]) -> tuple[list[str], int, int]:
        keep = self.expand(protected) if protected else set()
        evicted: list[str] = []
        freed = unlinked = 0
        for info in batch:
            if info.digest in keep or info.digest in changed:
                continue
            current = self.storage.blob_info(info.digest)
            if current is None:
                continue
            deleted, removed = self.storage.remove_blob(info.digest, links.get(info.digest, ()))
            if deleted:
                evicted.append(info.digest)
                freed += current.size
            unlinked += removed
        return evicted, freed, unlinked

    async def _evict(self) -> dict[str, Any]:
        started = time.monotonic()
        bound = self.config.max_bytes
        infos = await self._thread(self._scan)
        total = sum(info.size for info in infos)
        self.total_bytes, self.blob_count = total, len(infos)
        present = {info.digest for info in infos}
        for digest in [d for d in self.usage if d not in present]:
            del self.usage[digest]
        summary: dict[str, Any] = {"evicted": 0, "freed_bytes": 0, "links_removed": 0,
                                   "total_bytes": total, "max_bytes": bound,
                                   "blobs": len(infos), "protected": 0, "seconds": 0.0}
        if not bound or total <= bound:
            summary["seconds"] = round(time.monotonic() - started, 3)
            return summary
        keep = await self._thread(self.expand, self.protection())
        usage = dict(self.usage)
        candidates = sorted((info for info in infos if info.digest not in keep),
                            key=lambda info: (usage.get(info.digest, info.mtime), info.digest))
        summary["protected"] = len(infos) - len(candidates)
        victims: list[BlobInfo] = []
        planned = 0
        for info in candidates:
            if total - planned <= bound:
                break
            victims.append(info)
            planned += info.size
        if victims:
            links = await self._thread(self._links_of, {v.digest for v in victims})
        evicted_all: list[str] = []
        for i in range(0, len(victims), EVICT_BATCH):
            batch = victims[i:i + EVICT_BATCH]

            def sweep(batch: list[BlobInfo] = batch) -> Deferred[tuple[list[str], int, int]]:
                # Under the exclusive lock: what is leased, pinned or used now stays.
                changed = {v.digest for v in batch if self.usage.get(v.digest)
                           != usage.get(v.digest)}
                return self._thread(self._sweep, batch, self.protection(), changed, links)

            evicted, freed, unlinked = await under_lock(self.lock, sweep, exclusive=True)
            evicted_all += evicted
            summary["freed_bytes"] += freed
            summary["links_removed"] += unlinked
        for digest in evicted_all:
            self.usage.pop(digest, None)
            self._refs.pop(digest, None)
        self._usage_dirty = True
        summary["evicted"] = len(evicted_all)
        self.total_bytes = total - summary["freed_bytes"]
        self.blob_count = len(infos) - len(evicted_all)
        summary["total_bytes"] = self.total_bytes
        summary["seconds"] = round(time.monotonic() - started, 3)
        self.evict_runs += 1
        self.evicted_blobs += len(evicted_all)
        self.evicted_bytes += summary["freed_bytes"]
        self.last_eviction = summary
        if evicted_all:
            self.log.info("Cache eviction: {evicted} blobs ({freed_bytes} bytes) evicted; "
                          "{total_bytes} of {max_bytes} bytes used", **summary)
        if self.total_bytes > bound:
            self.log.warn("The cache holds {total} bytes, over its bound of {bound}: the rest "
                          "is leased or in use", total=self.total_bytes, bound=bound)
        return summary

    # -- maintenance --------------------------------------------------------------------

    async def expire_leases(self) -> int:
        now = self.now()
        expired = self.leases.expired(now)
        for lease in expired:
            if self.leases.leases.get(lease.id) is lease:
                del self.leases.leases[lease.id]
                self._forget_fetch(lease.id)
                self.touch(*lease.digests)
                await self._thread(self.leases.delete_file, lease.id)
        if expired:
            self.log.info("{count} leases expired", count=len(expired))
        return len(expired)

    async def maintain(self) -> dict[str, Any]:
        """The periodic work: expire leases, flush the last-use index, evict."""
        await self.expire_leases()
        await self.flush_usage()
        return await self.evict()

    # -- manifests (for the API and replication) -------------------------------------------

    def replication_client(self, url: str) -> RegistryClient:
        """A client for a replication target, with the ``replicate.*`` credentials."""
        config = self.config
        return registry_client(self.reactor, url, config.replicate, realm=self.realm,
                               retries=5, timeout=config.upstream_timeout,
                               chunk_size=config.replicate_chunk_size)

    async def before_manifest(self, name: str, reference: str) -> None:
        """Pull a manifest through if it is missing, or refresh a tag that is due."""
        tag, digest = check_reference(reference)
        if tag is not None:
            local = self.storage.read_tag(name, tag)
            if local is not None and self.storage.manifest_media_type(name, local) is not None:
                self.hits += 1
                mtime = self.storage.tag_mtime(name, tag) or 0.0
                if time.time() - mtime >= self.config.tag_refresh:
                    await self._refresh_tag(name, tag)
                return
        elif self.storage.manifest_media_type(name, digest) is not None:  # type: ignore[arg-type]
            self.hits += 1
            return
        self.misses += 1
        with contextlib.suppress(UpstreamNotFound):
            await self.pull.fetch_manifest(name, reference)

    async def _refresh_tag(self, name: str, tag: str) -> None:
        """Ask the upstreams for a tag again; a slow answer (over :data:`REFRESH_WAIT`
        seconds) is not waited for: the cached tag is served, and the fetch goes on."""
        d = self.pull.fetch_manifest(name, tag, retries=1)
        d.addTimeout(min(REFRESH_WAIT, self.config.upstream_timeout), self.reactor)
        try:
            await d
        except (UpstreamNotFound, OCIError, TimeoutError) as e:
            reason = "not upstream" if isinstance(e, UpstreamNotFound) \
                else "no answer yet" if isinstance(e, TimeoutError) else e.message
            self.log.info("Tag {name}:{tag} not refreshed ({reason}); serving the cached one",
                          name=name, tag=tag, reason=reason)
            await self._thread(self.storage.touch_tag, name, tag)

    async def manifest_for(self, name: str, reference: str) -> tuple[str, str, bytes]:
        """A manifest's digest, media type and bytes, pulled through if need be."""
        tag, digest = check_reference(reference)
        for attempt in (0, 1):
            found = self.storage.read_tag(name, tag) if tag is not None else digest
            media_type = self.storage.manifest_media_type(name, found) if found else None
            if found is not None and media_type is not None:
                body = await self._thread(self.storage.read_blob, found, 64 * 1024 * 1024)
                if body is not None:
                    self.touch(found)
                    return found, media_type, body
            if attempt == 0:
                try:
                    await self.pull.fetch_manifest(name, reference)
                except UpstreamNotFound:
                    break
        raise OCIError("MANIFEST_UNKNOWN", f"no manifest {reference} in {name}, here or "
                       "upstream")

    async def ensure_any(self, name: str, digest: str, seen: set[str] | None = None,
                         sem: DeferredSemaphore | None = None) -> None:
        """Make a manifest (and everything it needs, recursively) or a blob of ``name``
        present in the cache, pulling through what is missing."""
        seen = set() if seen is None else seen
        sem = sem or DeferredSemaphore(FETCH_PARALLEL)
        if digest in seen:
            return
        seen.add(digest)
        media_type = self.storage.manifest_media_type(name, digest)
        if media_type is None:
            if self.storage.blob_linked(name, digest):
                return
            try:
                await self.pull.fetch_manifest(name, digest)
            except UpstreamNotFound:
                try:
                    await sem.run(lambda: Deferred.fromCoroutine(
                        self.pull.ensure_blob(name, digest)))
                except UpstreamNotFound:
                    raise OCIError("BLOB_UNKNOWN", f"{digest} is neither a manifest nor a blob "
                                   f"of {name}, here or upstream") from None
                return
            media_type = self.storage.manifest_media_type(name, digest)
        body = await self._thread(self.storage.read_blob, digest, 64 * 1024 * 1024)
        if body is None or media_type is None:
            raise OCIError("MANIFEST_UNKNOWN", f"manifest {digest} vanished from the cache")
        blobs, children = manifests.parts(manifests.parse(body), media_type)

        async def blob(d: str) -> None:
            if d in seen:
                return
            seen.add(d)
            try:
                await sem.run(lambda: Deferred.fromCoroutine(self.pull.ensure_blob(name, d)))
            except UpstreamNotFound:
                raise OCIError("BLOB_UNKNOWN", f"blob {d} of manifest {digest} is not in "
                               f"{name}, here or upstream") from None

        work = [Deferred.fromCoroutine(blob(d)) for d in blobs]
        work += [Deferred.fromCoroutine(self.ensure_any(name, c, seen, sem)) for c in children]
        await _gather(work)

    # -- leases ---------------------------------------------------------------------------

    async def put_lease(self, *, lease_id: str | None, holder: str, digests: list[str] | None,
                        ttl: float | None, repository: str | None, owner: str | None,
                        owner_bound: bool) -> tuple[Lease, bool]:
        """Create or renew a lease; ``(lease, created)``.

        ``owner_bound``: the caller was authorised through a repository pull
        token, so an existing lease must be its own (same token subject and
        repository).
        """
        now = self.now()
        ttl = self.config.lease_default if ttl is None else ttl
        ttl = min(ttl, self.config.lease_max)
        existing = self.leases.get(lease_id, now) if lease_id else None
        if existing is not None:
            if existing.holder != holder:
                raise OCIError("LEASE_CONFLICT", f"lease {lease_id} is held by "
                               f"{existing.holder!r}, not {holder!r}")
            if owner_bound and (existing.owner != owner or existing.repository != repository):
                raise OCIError("DENIED", f"lease {lease_id} is not yours to renew")
            lease = Lease(existing.id, holder, list(digests or existing.digests),
                          existing.created_at, now + ttl,
                          repository or existing.repository, existing.owner)
        else:
            if not digests:
                raise OCIError("REQUEST_INVALID", "a new lease needs digests")
            lease = Lease(lease_id or new_lease_id(), holder, list(digests), now, now + ttl,
                          repository, owner)
        counted = owner if existing is None and owner_bound and owner is not None else None
        if counted is not None:
            self._check_room(counted, now)
            self._creating[counted] += 1

        def record(_: Any) -> None:
            self.leases.leases[lease.id] = lease

        # Under the shared lock: an eviction batch sees the lease before it looks,
        # or has finished (and the lease's state then says what is missing).
        try:
            await under_lock(self.lock, lambda: self._thread(self.leases.save, lease)
                             .addCallback(record))
        finally:
            if counted is not None:
                self._creating[counted] -= 1
                if not self._creating[counted]:
                    del self._creating[counted]
        self.touch(*lease.digests)
        return lease, existing is None

    def _check_room(self, owner: str, now: float) -> None:
        """Refuse ``owner`` a new repository-token lease beyond :attr:`leases_per_owner`."""
        held = sum(1 for lease in self.leases.active(now) if lease.owner == owner)
        held += self._creating[owner]
        if self.leases_per_owner and held >= self.leases_per_owner:
            raise OCIError("TOOMANYREQUESTS",
                           f"too many leases: {owner} holds {held} of the "
                           f"{self.leases_per_owner} a repository token's subject may hold; "
                           "delete one (DELETE /cache/leases/<id>) or let one expire",
                           headers={"Retry-After": str(self.config.retry_after)})

    async def delete_lease(self, lease_id: str) -> None:
        lease = self.leases.leases.pop(lease_id, None)
        if lease is None:
            raise OCIError("LEASE_UNKNOWN", f"no lease {lease_id}")
        self._forget_fetch(lease_id)
        self.touch(*lease.digests)
        await self._thread(self.leases.delete_file, lease_id)

    def _forget_fetch(self, lease_id: str) -> None:
        job = self.lease_fetches.pop(lease_id, None)
        if job is not None and job.work is not None and not job.work.called:
            job.work.cancel()

    def start_fetch(self, lease: Lease) -> LeaseFetch:
        """Fetch everything the lease names into the cache, in the background."""
        assert lease.repository is not None
        old = self.lease_fetches.get(lease.id)
        job = LeaseFetch()
        self.lease_fetches[lease.id] = job
        repository = lease.repository
        digests = list(lease.digests)

        async def run() -> None:
            if old is not None and old.work is not None and not old.work.called:
                await old.finished.wait()
            seen: set[str] = set()
            sem = DeferredSemaphore(FETCH_PARALLEL)
            await _gather([Deferred.fromCoroutine(self.ensure_any(repository, d, seen, sem))
                           for d in digests])

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                job.state = "failed"
                if result.check(OCIError):
                    job.error = f"{result.value.code}: {result.value.message}"
                elif result.check(CancelledError):
                    job.error = "cancelled"
                else:
                    self.log.failure("Fetching for lease {id} failed", result, id=lease.id)
                    job.error = f"internal error: {result.getErrorMessage()}"
            else:
                job.state = "done"
            job.finished.fire(None)

        job.work = Deferred.fromCoroutine(run())
        job.work.addBoth(done)
        return job

    async def wait_fetch(self, lease_id: str, seconds: float) -> None:
        job = self.lease_fetches.get(lease_id)
        if job is None or job.state != "fetching" or seconds <= 0:
            return
        d = job.finished.wait()
        d.addTimeout(seconds, self.reactor)
        with contextlib.suppress(TimeoutError):
            await d

    def _missing(self, digests: list[str]) -> list[str]:
        wanted = self.expand(set(digests))
        return sorted(d for d in wanted if not self.storage.has_blob(d))

    async def lease_status(self, lease: Lease) -> dict[str, Any]:
        missing = await self._thread(self._missing, lease.digests)
        job = self.lease_fetches.get(lease.id)
        if job is not None and job.state == "fetching":
            state = "fetching"
        elif not missing:
            state = "ready"
        elif job is not None and job.state == "failed":
            state = "failed"
        else:
            state = "incomplete"
        now = self.now()
        return {"lease": lease.id, "holder": lease.holder, "digests": lease.digests,
                "repository": lease.repository, "created_at": rfc3339(lease.created_at),
                "expires_at": rfc3339(lease.expires_at),
                "expires_in": max(0.0, round(lease.expires_at - now, 3)),
                "state": state, "missing": missing,
                "error": job.error if job is not None else None}

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {"upstreams": self.pull.upstreams, "max_bytes": self.config.max_bytes,
                "total_bytes": self.total_bytes, "blobs": self.blob_count,
                "leases": len(self.leases.active(self.now())), "pinned": len(self.pins),
                "fetching": len(self.pull.flights.active), "hits": self.hits,
                "misses": self.misses, "blob_fetches": self.pull.blob_fetches,
                "manifest_fetches": self.pull.manifest_fetches,
                "evicted_blobs": self.evicted_blobs, "evicted_bytes": self.evicted_bytes,
                "last_eviction": self.last_eviction}
