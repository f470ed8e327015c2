"""Pull-through: an image cache fetches what it lacks from its upstream stores.

A manifest (by tag or digest) or blob that a client asks for and the cache
does not hold is fetched from the upstreams, tried in order, with
:class:`treadmill.images.oci.RegistryClient` (the registry token flow,
digest-verified downloads resumed with ``Range``). It is verified, committed
into the ordinary layout (blobs, then repository links, exactly as an upload
is committed) and then served from disk.

- **One fetch per digest.** Concurrent misses share one fetch: a dict of
  in-flight fetches (:class:`Flight`) keyed by what is fetched; every waiter
  gets its own Deferred, so a client that goes away cancels only its wait,
  never the fetch. A blob's fetch is keyed by its digest alone; a waiter for
  another repository whose shared fetch found nothing asks again for its own
  repository.
- **Repository membership.** A blob already on disk (fetched through another
  repository) is linked into a new repository only once an upstream confirms
  (``HEAD``) that the repository has it, as a store would answer 404.
- **Errors.** Every upstream answering 404 gives the client the ordinary 404.
  An upstream that cannot be reached or answers 5xx (after
  ``cache.upstream_retries`` attempts, 503s and refused connections included)
  makes the cache try the next one; if none could answer, the client
  gets ``503 UNAVAILABLE`` with ``Retry-After`` and a message naming the
  upstreams and why. An upstream that refuses the cache's credentials or sends
  content that does not match its digest gives ``502 UNAVAILABLE``; nothing
  it sent is committed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from treadmill.images.oci import (
    MANIFEST_ACCEPT,
    DigestMismatch,
    RegistryClient,
    RegistryError,
    RegistryUnreachable,
)
from treadmill.imagestore import manifests
from treadmill.imagestore.errors import OCIError
from treadmill.imagestore.gc import Collector, SharedExclusiveLock, under_lock
from treadmill.imagestore.names import check_reference
from treadmill.imagestore.storage import Storage

T = TypeVar("T")

ACCEPT = MANIFEST_ACCEPT + ", " + manifests.OCI_ARTIFACT
USER_AGENT = b"treadmill-imagecache/0.1"
_UNSET = object()


class UpstreamNotFound(Exception):
    """Every upstream answered 404 (the caller answers its ordinary 404)."""


class Flight:
    """One fetch in progress, awaited by any number of requests.

    :meth:`wait` gives each waiter its own Deferred: cancelling it (Klein
    does when a client goes away) removes that waiter only.
    """

    def __init__(self, repository: str | None = None):
        self.repository = repository
        self.work: Deferred[Any] | None = None
        self._waiters: list[Deferred[Any]] = []
        self._result: Any = _UNSET

    @property
    def done(self) -> bool:
        return self._result is not _UNSET

    def wait(self) -> Deferred[Any]:
        if self._result is not _UNSET:
            return fail(self._result) if isinstance(self._result, Failure) \
                else succeed(self._result)

        def cancel(d: Deferred[Any]) -> None:
            with contextlib.suppress(ValueError):
                self._waiters.remove(d)

        d: Deferred[Any] = Deferred(cancel)
        self._waiters.append(d)
        return d

    def fire(self, result: Any) -> None:
        self._result = result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(result)  # a Failure fires the errbacks


class Flights:
    """In-flight work by key: the second caller for a key joins the first's work."""

    log = Logger()

    def __init__(self) -> None:
        self.active: dict[Any, Flight] = {}

    def get(self, key: Any) -> Flight | None:
        return self.active.get(key)

    def join(self, key: Any, fn: Callable[[], Awaitable[Any]],
             repository: str | None = None) -> Deferred[Any]:
        flight = self.active.get(key)
        if flight is None:
            flight = Flight(repository)
            self.active[key] = flight

            def done(result: Any) -> None:
                if self.active.get(key) is flight:
                    del self.active[key]
                flight.fire(result)

            flight.work = Deferred.fromCoroutine(fn())  # type: ignore[arg-type]
            flight.work.addBoth(done)
        return flight.wait()

    def cancel_all(self) -> None:
        for flight in list(self.active.values()):
            if flight.work is not None and not flight.work.called:
                flight.work.cancel()


def file_credentials(user: str, path: str) -> Callable[[], Awaitable[tuple[str, str]]]:
    """HTTP Basic credentials for a token realm: a user and an API token read from a file
    at each use (so that rotating the file needs no restart)."""

    async def credentials() -> tuple[str, str]:
        with open(path, encoding="utf-8") as f:
            return user, f.read().strip()

    return credentials


@dataclass
class Credentials:
    """What the store sends to other image stores (``cache.upstream_*``, ``replicate.*``):
    a fixed ``token``, or a ``user`` and ``token_file`` for their token flow; the token
    services (``realms``) they may go to, default the store's own realm; a CA file."""

    token: str | None = None
    user: str | None = None
    token_file: str | None = None
    realms: list[str] = field(default_factory=list)
    ca_file: str | None = None


def registry_client(reactor: Any, url: str, credentials: Credentials, *, realm: str | None,
                    retries: int, timeout: float, backoff: float = 0.5,
                    retry_time: float = 60.0, chunk_size: int | None = None,
                    ) -> RegistryClient:
    """A :class:`RegistryClient` for ``url`` with ``credentials`` (their realms, else the
    store's ``realm``); ``retry_time`` 0 makes ``retries`` bound an unavailable store's
    attempts too."""
    token_flow = None
    if credentials.user and credentials.token_file:
        token_flow = file_credentials(credentials.user, credentials.token_file)
    kwargs: dict[str, Any] = {}
    if chunk_size is not None:
        kwargs["chunk_size"] = chunk_size
    return RegistryClient(reactor, url, token=credentials.token, credentials=token_flow,
                          trusted_realms=list(credentials.realms) or ([realm] if realm else []),
                          ca_file=credentials.ca_file, retries=retries, backoff=backoff,
                          retry_time=retry_time, timeout=timeout, user_agent=USER_AGENT, **kwargs)


class PullThrough:
    """Fetches manifests and blobs from the upstreams into the store (see the module doc)."""

    log = Logger()

    def __init__(self, reactor: Any, storage: Storage, pool: Any, lock: SharedExclusiveLock,
                 collector: Collector, clients: list[RegistryClient], *,
                 retry_after: int = 10, on_commit: Callable[[str, int, bool], None] | None = None):
        self.reactor = reactor
        self.storage = storage
        self.pool = pool
        self.lock = lock
        self.collector = collector
        self.clients = clients
        self.retry_after = retry_after
        self.on_commit = on_commit
        self.flights = Flights()
        self.blob_fetches = 0
        self.manifest_fetches = 0
        self.fetched_bytes = 0
        self.failures = 0

    def _thread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    @property
    def upstreams(self) -> list[str]:
        return [client.base_url for client in self.clients]

    async def close(self) -> None:
        self.flights.cancel_all()
        for client in self.clients:
            await client.close()

    # -- trying the upstreams --------------------------------------------------------

    async def _try(self, what: str, op: Callable[[RegistryClient], Awaitable[T]]) -> T:
        """``op(client)`` on each upstream in turn until one answers (see the module doc)."""
        unavailable: list[str] = []
        refused: list[str] = []
        for client in self.clients:
            try:
                return await op(client)
            except DigestMismatch as e:
                self.log.warn("Upstream {url} sent bad content for {what}: {error}",
                              url=client.base_url, what=what, error=e.message)
                refused.append(f"{client.base_url} sent content that does not match its "
                               f"digest ({e.message})")
            except RegistryError as e:
                if e.status == 404:
                    continue
                if isinstance(e, RegistryUnreachable) or e.status is None \
                        or e.status >= 500 or e.status in (408, 429):
                    unavailable.append(f"{client.base_url}: {e.message}")
                else:
                    refused.append(f"{client.base_url} answered {e.status} {e.code}: "
                                   f"{e.message}")
        if unavailable or refused:
            self.failures += 1
            reasons = "; ".join(unavailable + refused)
            self.log.warn("Cannot fetch {what} from the upstreams: {reasons}", what=what,
                          reasons=reasons)
            if unavailable:
                raise OCIError("UNAVAILABLE", f"{what} is not cached and no upstream store "
                               f"could be reached: {reasons}", status=503,
                               headers={"Retry-After": str(self.retry_after)})
            raise OCIError("UNAVAILABLE", f"{what} is not cached and the upstream stores "
                           f"refused it: {reasons}", status=502)
        raise UpstreamNotFound(what)

    # -- manifests -----------------------------------------------------------------

    def fetch_manifest(self, name: str, reference: str, *, retries: int | None = None
                       ) -> Deferred[str]:
        """Fetch a manifest by tag or digest and commit it (a tag is updated); fires with its
        digest. Fails with :class:`UpstreamNotFound` or an ``OCIError``."""
        return self.flights.join(("manifest", name, reference),
                                 lambda: self._fetch_manifest(name, reference, retries))

    async def _fetch_manifest(self, name: str, reference: str, retries: int | None) -> str:
        tag, _digest = check_reference(reference)
        what = f"manifest {name}:{reference}" if tag else f"manifest {name}@{reference}"
        self.manifest_fetches += 1
        fetched = await self._try(what, lambda c: c.get_manifest(name, reference, ACCEPT,
                                                                 retries=retries))
        try:
            manifest = manifests.parse(fetched.data)
            try:
                media_type = manifests.media_type_of(manifest, fetched.media_type or None)
            except OCIError:
                media_type = manifests.media_type_of(manifest, None)
        except OCIError as e:
            raise OCIError("UNAVAILABLE", f"{what}: the upstream sent an unusable manifest: "
                           f"{e.message}", status=502) from None

        def commit() -> Deferred[tuple[str, bool]]:
            return self._thread(self._commit_manifest, name, tag, fetched.data, media_type)

        digest, new = await under_lock(self.lock, commit)
        self.collector.note_referenced([digest, *manifests.referenced_digests(manifest)])
        self.collector.note_seen(digest)
        self.fetched_bytes += len(fetched.data)
        if self.on_commit is not None:
            self.on_commit(digest, len(fetched.data), new)
        self.log.info("Pulled {what} ({digest}) through from the upstreams", what=what,
                      digest=digest)
        return digest

    def _commit_manifest(self, name: str, tag: str | None, data: bytes,
                         media_type: str) -> tuple[str, bool]:
        digest, new = self.storage.put_blob_bytes(data)
        self.storage.link_manifest(name, digest, media_type)
        if tag is not None:
            self.storage.write_tag(name, tag, digest)
        return digest, new

    # -- blobs -------------------------------------------------------------------------

    async def ensure_blob(self, name: str, digest: str) -> None:
        """Make blob ``digest`` of repository ``name`` present and linked, fetching it if
        need be. Fails with :class:`UpstreamNotFound` or an ``OCIError``."""
        for _ in range(4):
            if self.storage.blob_linked(name, digest):
                return
            if self.storage.has_blob(digest):
                if await self.flights.join(("link", name, digest),
                                           lambda: self._link_if_upstream(name, digest)):
                    return
                continue
            flight = self.flights.get(("blob", digest))
            if flight is not None and flight.repository != name:
                # Another repository's fetch of the same bytes: wait for it, then
                # confirm that this repository has the blob too.
                with contextlib.suppress(UpstreamNotFound, OCIError):
                    await flight.wait()
                continue
            await self.flights.join(("blob", digest), lambda: self._fetch_blob(name, digest),
                                    repository=name)
            return
        raise OCIError("UNAVAILABLE", f"blob {digest} keeps disappearing from the cache "
                       "(evicted while being fetched?)", status=503,
                       headers={"Retry-After": str(self.retry_after)})

    async def _link_if_upstream(self, name: str, digest: str) -> bool:
        """Link a blob that is on disk into ``name`` if an upstream has it there."""

        async def head(client: RegistryClient) -> int:
            size = await client.blob_size(name, digest)
            if size is None:
                raise RegistryError(404, "BLOB_UNKNOWN", "no such blob")
            return size

        await self._try(f"blob {digest} of {name}", head)

        def link() -> bool:
            if not self.storage.has_blob(digest):
                return False
            self.storage.link_blob(name, digest)
            return True

        linked = await under_lock(self.lock, lambda: self._thread(link))
        if linked:
            self.collector.note_seen(digest)
        return bool(linked)

    async def _fetch_blob(self, name: str, digest: str) -> None:
        self.blob_fetches += 1
        dest = os.path.join(self.storage.tmp, "fetch-" + secrets.token_hex(12))
        try:
            blob = await self._try(f"blob {digest} of {name}",
                                   lambda c: c.pull_blob(name, digest, dest))

            def commit() -> Deferred[bool]:
                return self._thread(self._commit_blob, dest, name, digest)

            new = await under_lock(self.lock, commit)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(dest)
        self.collector.note_seen(digest)
        self.fetched_bytes += blob.size
        if self.on_commit is not None:
            self.on_commit(digest, blob.size, new)
        self.log.info("Pulled blob {digest} ({size} bytes) of {name} through from the "
                      "upstreams", digest=digest, size=blob.size, name=name)

    def _commit_blob(self, path: str, name: str, digest: str) -> bool:
        new = self.storage.commit_file(path, digest)
        self.storage.link_blob(name, digest)
        return new
