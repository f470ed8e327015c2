"""Leases on a site image cache, so that it keeps a running job's image.

A site image cache evicts least recently used blobs unless a lease protects
them (``docs/imagestore.md``, "Leases"). With a cache URL (the cache whose root
the supervisor mounts), :meth:`ImageFetcher.fetch
<treadmill.supervisor.fetch.ImageFetcher.fetch>` first takes a lease on a named
image's manifest digest (``POST /cache/leases`` with ``fetch: true`` and
``wait``), so a cache miss is pulled through by the cache and then read from the
mount rather than downloaded from the stores. The request carries a pull token
for the image's repository, obtained with the registry token flow
(:class:`CacheClient`). :class:`CacheLeases` counts a lease's holders, renews it
every ``ttl/3`` seconds (reactor clock) while one holds it, and deletes it when
the last one drops it. Its id is ``<host key>-<manifest hex>``, the host key being
the first 16 hex digits of the sha256 of the host token: stable across restarts (a
restarted supervisor renews rather than duplicates), distinct per host, and
revealing nothing of the token.

A cache that cannot be reached, refuses, or cannot get the whole image in time
is not an error: a warning is logged and the fetch goes on as without a lease;
renewals keep trying, so the lease is taken as soon as the cache answers. On
:meth:`CacheLeases.close` (the supervisor stops) renewals stop but leases are
kept, since a job left running is adopted by the next start.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from treadmill.images.oci import RegistryError, repository_of
from treadmill.supervisor.storeclient import StoreClient

__all__ = ["LEASE_TTL", "LEASE_WAIT", "CacheClient", "CacheLeases", "Lease", "lease_id"]

LEASE_TTL = 600.0  # seconds a cache lease lasts unless renewed (renewed every third of it)
LEASE_WAIT = 60.0  # seconds the first lease request lets the cache pull the image in
MAX_LEASE_ANSWER = 1024 * 1024


def lease_id(host_key: str, digest: str) -> str:
    """A host's cache lease id for a manifest digest (see the module docstring)."""
    return f"{host_key}-{digest.split(':', 1)[1]}"


class CacheClient(StoreClient):
    """An image cache's lease API (``/cache/leases``), with the registry token flow.

    A pull token for the lease's repository authorises it (the client never
    asks for the challenge's ``cache:leases:lease`` scope, which the
    switchboard does not hand out). Each request is tried once: the caller
    falls back to the stores, and renewals come again.
    """

    async def put_lease(self, repo: str, body: Mapping[str, Any], wait: float
                        ) -> tuple[int, dict[str, Any]]:
        """``POST /cache/leases``: ``(201 created or 200 renewed, the lease's status)``."""
        url = f"{self.base_url}/cache/leases"
        data = json.dumps(body).encode()
        response = await self._request(
            "POST", url, repo, headers={b"Content-Type": b"application/json"},
            body=lambda: data, ok=(200, 201), timeout=wait + self.timeout, actions=("pull",))
        raw = await self._read(response, url, MAX_LEASE_ANSWER)
        try:
            status = json.loads(raw)
        except ValueError:
            status = None
        if not isinstance(status, dict):
            raise RegistryError(response.code, "BAD_RESPONSE", f"{url}: not a lease", url)
        return response.code, status

    async def delete_lease(self, repo: str, lease_id: str) -> bool:
        """``DELETE /cache/leases/<id>``; False if the cache did not have it (expired)."""
        url = f"{self.base_url}/cache/leases/{lease_id}"
        response = await self._request("DELETE", url, repo, ok=(204, 404), actions=("pull",))
        await self._discard(response)
        return response.code == 204


@dataclass(eq=False)
class Lease:
    """A cache lease this host holds: one per manifest digest, counted."""

    id: str
    digest: str
    repository: str
    shown: str
    holders: int = 0
    held: bool = False  # the cache granted it at least once
    dropped: bool = False
    loop: LoopingCall | None = None
    lock: DeferredLock = field(default_factory=DeferredLock)  # one request at a time


class CacheLeases:
    """The cache leases of one fetcher (see the module docstring).

    ``client()`` makes the :class:`CacheClient` (once, when first needed);
    ``label`` names the supervisor in log lines and, with ``host_key``, in the
    leases' ``holder``.
    """

    log = Logger()

    def __init__(self, reactor: Any, cache_url: str, client: Callable[[], CacheClient], *,
                 host_key: str, ttl: float = LEASE_TTL, label: str = "supervisor") -> None:
        self.reactor = reactor
        self.cache_url = cache_url
        self.host_key = host_key
        self.ttl = ttl
        self.label = label
        self._make_client = client
        self._client: CacheClient | None = None
        self._leases: dict[str, Lease] = {}  # lease id -> lease

    def lease_id(self, digest: str) -> str:
        return lease_id(self.host_key, digest)

    @property
    def held(self) -> dict[str, int]:
        """The leases held now: id -> number of holders."""
        return {lease_id: lease.holders for lease_id, lease in self._leases.items()}

    async def close(self) -> None:
        """Stop renewing, but keep the leases (a job left running is adopted by the next
        start); later drops delete nothing."""
        for lease in self._leases.values():
            lease.dropped = True
            if lease.loop is not None and lease.loop.running:
                lease.loop.stop()
        self._leases.clear()
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def _cache(self) -> CacheClient:
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def hold(self, digest: str, name: Any, shown: str) -> Lease | None:
        """Count one more holder of the image's lease (None when the image has no name:
        a lease is authorised by its repository)."""
        if not name:
            return None
        try:
            repository = repository_of(str(name))
        except ValueError:
            return None
        lease_id = self.lease_id(digest)
        lease = self._leases.get(lease_id)
        if lease is None:
            lease = self._leases[lease_id] = Lease(lease_id, digest, repository, shown)
        lease.holders += 1
        return lease

    async def ensure(self, lease: Lease, wait: float) -> None:
        """Take the lease (once per holding), then renew it every ttl/3."""
        await lease.lock.acquire()
        try:
            if lease.loop is None and not lease.dropped:
                await self._put(lease, wait, renewal=False)
                if lease.dropped:  # released (or the fetcher closed) meanwhile
                    return
                lease.loop = LoopingCall(self._renew, lease)
                lease.loop.clock = self.reactor
                lease.loop.start(self.ttl / 3, now=False).addErrback(
                    lambda f: self.log.failure("{who}: renewing lease {id}", f, who=self.label,
                                               id=lease.id))
        finally:
            lease.lock.release()

    async def _put(self, lease: Lease, wait: float, renewal: bool) -> None:
        """``POST /cache/leases``; failures are logged, never raised."""
        body = {"lease": lease.id, "holder": f"{self.label} (host {self.host_key})",
                "digests": [lease.digest], "repository": lease.repository,
                "ttl": self.ttl, "fetch": not renewal, "wait": wait}
        try:
            code, status = await self._cache().put_lease(lease.repository, body, wait)
        except RegistryError as e:
            then = (f"trying again in {self.ttl / 3:g} s" if renewal else
                    "the cache may evict its blobs while the job runs; reading the mount for "
                    "what is there, the job's stores for the rest")
            self.log.warn("{who}: {shown}: cannot {what} lease {id} on the image cache {url}: "
                          "{error}; {then}", who=self.label, shown=lease.shown,
                          what="renew" if renewal else "take", id=lease.id, url=self.cache_url,
                          error=e.message, then=then)
            return
        state, missing = status.get("state"), status.get("missing") or []
        if (renewal and code == 201) or not lease.held:
            self.log.info("{who}: {shown}: leased on the image cache {url} as {id} "
                          "({state})", who=self.label, shown=lease.shown, url=self.cache_url,
                          id=lease.id, state=state)
        lease.held = True
        if not renewal and state != "ready":
            self.log.warn(
                "{who}: {shown}: the image cache {url} lacks {count} of its blobs ({state}"
                "{error}); they come from the job's stores", who=self.label, shown=lease.shown,
                url=self.cache_url, count=len(missing), state=state,
                error=f": {status['error']}" if status.get("error") else "")

    def _renew(self, lease: Lease) -> Deferred[None]:
        async def renew() -> None:
            await lease.lock.acquire()
            try:
                if not lease.dropped:
                    await self._put(lease, 0.0, renewal=True)
            finally:
                lease.lock.release()

        d = Deferred.fromCoroutine(renew())
        d.addErrback(lambda f: self.log.failure("{who}: renewing lease {id}", f,
                                                who=self.label, id=lease.id))
        return d

    def drop(self, lease_id: str | None) -> None:
        """One holder fewer; the last one deletes the lease on the cache (in the background)."""
        lease = self._leases.get(lease_id) if lease_id is not None else None
        if lease is None:
            return
        lease.holders -= 1
        if lease.holders > 0:
            return
        del self._leases[lease.id]
        lease.dropped = True
        if lease.loop is not None and lease.loop.running:
            lease.loop.stop()

        async def delete() -> None:
            await lease.lock.acquire()  # after a request in flight
            try:
                if not lease.held:
                    return
                try:
                    await self._cache().delete_lease(lease.repository, lease.id)
                except RegistryError as e:
                    self.log.warn("{who}: cannot delete lease {id} on the image cache {url}: "
                                  "{error}; it expires within {ttl:g} s", who=self.label,
                                  id=lease.id, url=self.cache_url, error=e.message,
                                  ttl=self.ttl)
                    return
                self.log.info("{who}: {shown}: lease {id} released", who=self.label,
                              shown=lease.shown, id=lease.id)
            finally:
                lease.lock.release()

        Deferred.fromCoroutine(delete()).addErrback(
            lambda f: self.log.failure("{who}: deleting lease {id}", f, who=self.label,
                                       id=lease.id))

