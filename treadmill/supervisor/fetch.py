"""Fetching a job's image: from a site image cache's mount, or from image stores.

A job names its image by manifest digest (``JobStart.image``: ``{digest,
name, stores}``). :class:`ImageFetcher` (:class:`IImageFetcher`, what drivers
use) resolves that digest — never a tag — to a parsed
:class:`~treadmill.images.format.TreadmillImage` and a local path for every
layer, verifying every digest on the way:

1. **The manifest.** From the cache mount (``images.cache_mount``, the root of
   a site image cache, often NFS, in the image store's stable layout:
   ``ROOT/blobs/sha256/<hh>/<hex>``) if it holds the manifest blob — read and
   hashed in a thread — else from the job's stores in order, with
   :class:`~treadmill.supervisor.storeclient.StoreClient` (repository: the image's
   catalogue name, lowercased; the host token as the HTTP Basic password of the
   registry token flow, sent only to a trusted realm, the switchboard's). It
   must parse as a Treadmill image (``image_invalid`` otherwise).
2. **Every layer.** From the cache mount if it is there (opened read-only, in
   place), else from the supervisor's own directory (``images.dir``, the same
   layout; ``blobcache.py``) if it is there, else downloaded there from the
   stores (a temporary file verified while streaming, then renamed into place,
   mode 0444).

**Registered stores only.** With ``switchboard`` (its HTTP base URL; the
supervisor always gives it), the fetcher learns the registered image stores
from the switchboard (``GET /api/v1/stores`` with the host token, cached for
``stores_ttl`` seconds) and contacts only those of a job's stores: any other
URL is refused, unasked (``image_not_found`` if nothing else has the image),
and the switchboard drops such URLs from the job start already. Tokens are
asked of the switchboard's token endpoint only, for the store's registered
service only, whatever the store's challenge says; the site cache
(``cache_url``) is configured locally and trusted as such.

Verification policy: a blob file is hashed (in the reactor's thread pool) the
first time this supervisor process uses it, and its identity (device, inode,
size, mtime) is then remembered in memory; later jobs of the same run that use
the same unchanged file only ``stat`` it. Blobs are immutable in both layouts
(written once, renamed into place, never modified), so this is
trust-but-verify-once: a restart verifies again; a blob found corrupt on the
mount is skipped (logged) and fetched from the stores instead; a corrupt local
blob is deleted and downloaded again.

The local directory is garbage-collected by size after every fetch: blobs are
removed least recently used first (by atime, which the fetcher itself sets on
every use, so ``noatime`` mounts do not matter) until the total is at most
``images.local_limit`` bytes, never a blob *pinned* by a fetch in progress or a
job that holds a :class:`FetchedImage` (drivers :meth:`~ImageFetcher.release`
it when the job ends). Stale ``.part`` files of interrupted downloads go too.

Errors are :class:`ImageFetchError` with a ``code`` of the protocol's start
refusals: ``image_not_found`` (no source has it, or none could be reached) or
``image_invalid`` (not a Treadmill image, a digest mismatch that retrying did
not fix), and a message naming the image, the digest and every source tried.
Drivers end the job with ``failed("image_error", e.message)``.

The reactor never hashes nor reads a big file: hashing, stat, reads of the
mount and garbage collection run in threads; downloads stream through the
registry client.

**Cache leases** (``leases.py``). With ``cache_url`` (the cache's HTTP base URL;
the cache whose root is ``cache_mount``) and a job image that has a name,
:meth:`ImageFetcher.fetch` first takes a lease on the manifest digest, renewed
while a :class:`FetchedImage` of it is held and deleted on
:meth:`~ImageFetcher.release` of the last one. On :meth:`~ImageFetcher.close`
(the supervisor stops) renewals stop but leases are kept, since a job left
running is adopted by the next start: :meth:`~ImageFetcher.pin` with the job's
``image`` takes its lease again (same id: a renewal), and the matching
:meth:`~ImageFetcher.release_digests` deletes it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import treq
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import Interface, implementer

from treadmill.images import format as fmt
from treadmill.images.oci import (
    DigestMismatch,
    RegistryClient,
    RegistryError,
    RegistryUnreachable,
    canonical_store_url,
    check_store_url,
    repository_of,
)
from treadmill.supervisor import blobcache
from treadmill.supervisor.blobcache import DEFAULT_LOCAL_LIMIT
from treadmill.supervisor.leases import (
    LEASE_TTL,
    LEASE_WAIT,
    CacheClient,
    CacheLeases,
    Lease,
    lease_id,
)
from treadmill.supervisor.storeclient import StoreClient

__all__ = ["FetchedImage", "IImageFetcher", "ImageFetchError", "ImageFetcher", "http_url_for"]

MISMATCH_TRIES = 2  # downloads of one blob from one store while its digest does not match
HOST_USER = "host"  # the Basic user name sent with the host token (the switchboard ignores it)
STORES_TTL = 60.0  # seconds the registered store list from the switchboard is kept
MAX_STORES_ANSWER = 1024 * 1024

IMAGE_NOT_FOUND = "image_not_found"
IMAGE_INVALID = "image_invalid"


class ImageFetchError(Exception):
    """An image cannot be fetched; ``code`` is ``image_not_found`` or ``image_invalid``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class FetchedImage:
    """A fetched image: the parsed manifest and a read-only local path per layer.

    The paths are in the cache mount or in the supervisor's image directory;
    never write to them. The blobs stay pinned (safe from the local garbage
    collection) until :meth:`ImageFetcher.release`.
    """

    digest: str
    name: str | None
    image: fmt.TreadmillImage
    manifest: bytes
    paths: Mapping[str, str]  # layer digest -> path
    sources: Mapping[str, str] = field(default_factory=dict)  # digest -> "cache", "local", URL
    lease: str | None = None  # the id of the image cache lease held for it, if any

    def path(self, what: fmt.Descriptor | str) -> str:
        """The file of a layer (a descriptor of :attr:`image`, or a digest)."""
        digest = what.digest if isinstance(what, fmt.Descriptor) else what
        return self.paths[digest]

    @property
    def layers(self) -> tuple[str, ...]:
        """The distinct layer digests, in manifest order."""
        return tuple(self.paths)


def http_url_for(ws_url: str) -> str:
    """The HTTP base URL of a ``ws://``/``wss://`` switchboard URL (the trusted realm)."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


class IImageFetcher(Interface):
    """What a host driver uses of the supervisor's image fetcher (``docs/supervisor.md``)."""

    def can_fetch(image: Mapping[str, Any] | None) -> bool:
        """Whether there is anywhere to fetch ``image`` from (a cache mount, or stores)."""

    def fetch(image: Mapping[str, Any]) -> Any:
        """A coroutine: the image of a ``JobStart`` (``{digest, name, stores}``), a
        :class:`FetchedImage` with every layer local and pinned until :meth:`release`;
        raises :class:`ImageFetchError`."""

    def release(fetched: FetchedImage | None) -> None:
        """The job using ``fetched`` ended: unpin its blobs, drop its cache lease."""

    def pin(digests: Iterable[str], image: Mapping[str, Any] | None = None) -> None:
        """Keep these local blobs (a re-adopted job's), and with its ``image`` take its
        cache lease again, until :meth:`release_digests`."""

    def release_digests(digests: Iterable[str]) -> None:
        """Undo :meth:`pin`."""

    def registry_client(store: str) -> RegistryClient:
        """A new client for the image store ``store`` (the caller closes it)."""


def _failure_kind(e: RegistryError) -> str:
    if isinstance(e, DigestMismatch):
        return "corrupt"
    if isinstance(e, RegistryUnreachable):
        return "unreachable"
    if e.status == 404 or e.code in ("MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN"):
        return "missing"
    if e.status in (401, 403):
        return "denied"
    return "error"


def _describe(source: str, e: RegistryError) -> str:
    kind = _failure_kind(e)
    if kind == "missing":
        return f"image store {source}: not there ({e.code}: {e.message})"
    if kind == "denied":
        return f"image store {source}: access refused ({e.message})"
    return f"image store {source}: {e.message}"


class _Attempt:
    """What went wrong where, for the final message."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.corrupt = False

    def add(self, text: str, corrupt: bool = False) -> None:
        self.problems.append(text)
        self.corrupt = self.corrupt or corrupt

    def error(self, what: str) -> ImageFetchError:
        code = IMAGE_INVALID if self.corrupt else IMAGE_NOT_FOUND
        detail = "; ".join(self.problems) or "no cache mount is configured and the job lists no " \
            "image store"
        return ImageFetchError(code, f"{what}: {detail}")


@implementer(IImageFetcher)
class ImageFetcher(Service):
    """Fetches jobs' images for a supervisor's host driver (see the module docstring).

    ``token`` is the host token: offered (as the HTTP Basic password, user
    ``host``) only to token realms under one of ``trusted_realms`` — the
    switchboard's URL. ``ca_file`` verifies ``https`` stores, realms and the
    cache. ``cache_url`` (with ``cache_mount``) turns on cache leases, lasting
    ``lease_ttl`` seconds and renewed every third of that. ``switchboard``
    (its HTTP base URL) turns on the registered-store check and fixes the token
    realm (see the module docstring). Nothing is read,
    created or connected before the first :meth:`fetch`, so a fleet of
    thousands of mock supervisors pays nothing for it.
    """

    log = Logger()

    def __init__(self, reactor: Any, *, cache_mount: str | None, local_dir: str,
                 token: str | None, ca_file: str | None = None,
                 trusted_realms: Sequence[str] = (), local_limit: int = DEFAULT_LOCAL_LIMIT,
                 retries: int = 4, backoff: float = 0.5, timeout: float = 60.0,
                 label: str = "supervisor", cache_url: str | None = None,
                 lease_ttl: float = LEASE_TTL, lease_wait: float = LEASE_WAIT,
                 switchboard: str | None = None, stores_ttl: float = STORES_TTL,
                 retry_time: float = 60.0) -> None:
        self.reactor = reactor
        self.switchboard = switchboard.rstrip("/") if switchboard else None
        self.realm = f"{self.switchboard}/api/v1/registry/token" if self.switchboard else None
        self.stores_ttl = stores_ttl
        self.retry_time = retry_time
        self._registered: dict[str, str] | None = None  # canonical URL -> service
        self._registered_at = float("-inf")
        self._registered_error: str | None = None  # why the last listing failed
        self._http: treq.client.HTTPClient | None = None
        self.cache_mount = cache_mount or None
        self.cache_url = check_store_url(cache_url) if cache_url else None
        self.lease_ttl = max(3.0, float(lease_ttl))
        self.lease_wait = min(max(0.0, float(lease_wait)), 300.0)
        self.local_dir = local_dir
        self.local_limit = max(0, int(local_limit))
        self.ca_file = ca_file
        self.trusted_realms = tuple(trusted_realms)
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.label = label
        self._token = token or None
        self._verified: dict[str, blobcache.Identity] = {}
        self._pins: collections.Counter[str] = collections.Counter()
        self._lock = DeferredLock()  # layer fetching and local garbage collection
        self._host_key = hashlib.sha256((token or label).encode()).hexdigest()[:16]
        self._cache_leases = (CacheLeases(reactor, self.cache_url, self._cache_client,
                                          host_key=self._host_key, ttl=self.lease_ttl,
                                          label=label)
                              if self.cache_url and self.cache_mount else None)
        self._adopted: dict[frozenset[str], list[str]] = {}  # pinned digests -> lease ids
        self.fetches = 0
        self.downloaded_bytes = 0  # layers
        self.manifest_bytes = 0
        # Layers by where they came from: "cache" (the mount), "local", "store" (metrics).
        self.layer_sources: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:  # never show the token
        return (f"ImageFetcher(cache_mount={self.cache_mount!r}, local_dir={self.local_dir!r}, "
                f"local_limit={self.local_limit}, cache_url={self.cache_url!r})")

    # -- public ----------------------------------------------------------------------------

    def can_fetch(self, image: Mapping[str, Any] | None) -> bool:
        """Whether there is anywhere to fetch ``image`` from (a cache mount, or stores)."""
        return bool(self.cache_mount or (image or {}).get("stores"))

    async def fetch(self, image: Mapping[str, Any]) -> FetchedImage:
        """The image of a ``JobStart`` (``{digest, name, stores}``), every layer local.

        Raises :class:`ImageFetchError`. The result's blobs stay pinned until
        :meth:`release`.
        """
        digest = image.get("digest")
        name = image.get("name")
        shown = f"image {name} ({digest})" if name else f"image {digest}"
        if not fmt.is_digest(digest):
            raise ImageFetchError(IMAGE_INVALID, f"{shown}: not a sha256 digest")
        assert isinstance(digest, str)
        self.fetches += 1
        attempt = _Attempt()
        stores = self._stores(image, attempt, await self.registered_stores())
        repo = self._repository(name, stores, attempt)
        no_stores = "; ".join(attempt.problems) or "the job lists no image store"
        clients: dict[str, RegistryClient] = {}
        started = self.reactor.seconds()
        self.log.info("{who}: fetching {image}", who=self.label, image=shown)
        lease = self._hold(digest, name, shown)
        try:
            if lease is not None and self._cache_leases is not None:
                await self._cache_leases.ensure(lease, self.lease_wait)
            data, media_type, origin = await self._manifest(digest, repo, stores, clients,
                                                            attempt, shown)
            try:
                manifest = fmt.load_manifest(data)
                parsed = fmt.parse_image(manifest, media_type or str(manifest.get("mediaType")))
            except fmt.ManifestError as e:
                raise ImageFetchError(
                    IMAGE_INVALID, f"{shown} from {origin} is not a valid Treadmill image: "
                    f"{e.message}") from None
            layers: dict[str, fmt.Descriptor] = {}
            for _, desc in parsed.files():
                layers.setdefault(desc.digest, desc)
            # Prefer the store that served the manifest for the layers.
            if origin in stores:
                stores = [origin, *(s for s in stores if s != origin)]
            pinned = [digest, *layers]
            self.pin(pinned)
            try:
                paths, sources = await self._layers(layers, repo, stores, clients, shown,
                                                    no_stores)
            except BaseException:
                self._unpin(pinned)
                raise
        except BaseException:
            self._drop(lease.id if lease is not None else None)
            raise
        finally:
            for client in clients.values():
                await client.close()
        fetched = FetchedImage(digest, name, parsed, data, MappingProxyType(paths),
                               MappingProxyType(sources), lease.id if lease is not None else None)
        self.log.info("{who}: fetched {image} in {seconds:.2f} s ({layers} layers: {sources})",
                      who=self.label, image=shown, layers=len(paths),
                      seconds=self.reactor.seconds() - started,
                      sources=", ".join(sorted(set(sources.values()))))
        try:
            await self.collect()
        except BaseException:  # cancelled meanwhile: the caller never gets the image
            self.release(fetched)
            raise
        return fetched

    def pin(self, digests: Iterable[str], image: Mapping[str, Any] | None = None) -> None:
        """Keep these local blobs from garbage collection (e.g. a re-adopted job's).

        With the job's ``image`` (``{digest, name, ...}``) and cache leases on,
        also take its cache lease again (in the background: the same id, so a
        renewal), until :meth:`release_digests` of the same digests.
        """
        pinned = frozenset(digests)
        self._pins.update(pinned)
        if image is None or not fmt.is_digest(image.get("digest")):
            return
        digest, name = str(image["digest"]), image.get("name")
        lease = self._hold(digest, name, f"image {name} ({digest})")
        if lease is not None and self._cache_leases is not None:
            self._adopted.setdefault(pinned, []).append(lease.id)
            Deferred.fromCoroutine(self._cache_leases.ensure(lease, 0.0)).addErrback(
                lambda f: self.log.failure("{who}: lease {id}", f, who=self.label, id=lease.id))

    def release_digests(self, digests: Iterable[str]) -> None:
        """Undo :meth:`pin` (and drop the lease it took, if any)."""
        pinned = frozenset(digests)
        self._unpin(pinned)
        leases = self._adopted.get(pinned)
        if leases:
            self._drop(leases.pop())
            if not leases:
                del self._adopted[pinned]

    def _unpin(self, digests: Iterable[str]) -> None:
        for digest in set(digests):
            self._pins[digest] -= 1
            if self._pins[digest] <= 0:
                del self._pins[digest]

    def release(self, fetched: FetchedImage | None) -> None:
        """The job using ``fetched`` ended: its blobs may be collected again, its cache
        lease is deleted (unless another job holds it)."""
        if fetched is not None:
            self._unpin([fetched.digest, *fetched.paths])
            self._drop(fetched.lease)

    def registry_client(self, store: str) -> RegistryClient:
        """A new client for the image store ``store`` (e.g. to push a snapshot), with
        the host token flow towards the switchboard (trusted realms) only; the caller
        closes it. Raises ``ValueError`` for a malformed store URL."""
        return self._client(check_store_url(store), {})

    async def registered_stores(self) -> dict[str, str] | None:
        """The registered stores (canonical URL → service), from the switchboard, cached
        for ``stores_ttl`` s; ``None`` without a switchboard. If the switchboard cannot be
        asked, the last list known (empty at first): nothing unregistered is contacted."""
        if self.switchboard is None:
            return None
        now = self.reactor.seconds()
        if self._registered is not None and now - self._registered_at < self.stores_ttl:
            return self._registered
        url = f"{self.switchboard}/api/v1/stores"
        try:
            if self._http is None:
                from twisted.web.client import Agent

                from treadmill.common.tls import client_policy

                agent = (Agent(self.reactor, contextFactory=client_policy(self.ca_file))
                         if self.ca_file else Agent(self.reactor))
                self._http = treq.client.HTTPClient(agent)
            response = await self._http.get(
                url, headers={"Authorization": f"Bearer {self._token or ''}"},
                timeout=min(self.timeout, 15.0), reactor=self.reactor)
            raw = await treq.content(response)
            if response.code != 200 or len(raw) > MAX_STORES_ANSWER:
                raise ValueError(f"HTTP {response.code}")
            listed = json.loads(raw)["stores"]
            self._registered = {canonical_store_url(str(row["url"])): str(row["service"])
                                for row in listed}
            self._registered_at = now
            self._registered_error = None
        except Exception as e:
            self._registered_error = f"cannot list them at {url}: {str(e) or type(e).__name__}"
            self.log.warn("{who}: cannot list the registered image stores at {url}: {error}; "
                          "using the last list known", who=self.label, url=url,
                          error=str(e) or type(e).__name__)
            if self._registered is None:
                return {}
        return self._registered

    def lease_id(self, digest: str) -> str:
        """This host's cache lease id for a manifest digest (see the module docstring)."""
        return lease_id(self._host_key, digest)

    @property
    def leases(self) -> dict[str, int]:
        """The cache leases held now: id -> number of holders (for the manhole, tests)."""
        return self._cache_leases.held if self._cache_leases is not None else {}

    async def close(self) -> None:
        """The supervisor stops: stop renewing cache leases, but keep them (a job left
        running is adopted by the next start); later releases delete nothing."""
        self._adopted.clear()
        if self._cache_leases is not None:
            await self._cache_leases.close()

    def stopService(self) -> Deferred[None]:
        """As a child of the supervisor's service: :meth:`close`."""
        super().stopService()
        return Deferred.fromCoroutine(self.close())

    def pinned(self, digest: str) -> bool:
        return self._pins.get(digest, 0) > 0

    async def collect(self) -> blobcache.GCResult | None:
        """Trim the local directory to ``local_limit`` bytes (least recently used first)."""
        await self._lock.acquire()
        try:
            result: blobcache.GCResult = await self._in_thread(
                blobcache.collect, self.local_dir, self.local_limit, self.pinned, time.time())
        except Exception:
            self.log.failure("{who}: garbage collection of {dir} failed", who=self.label,
                             dir=self.local_dir)
            return None
        finally:
            self._lock.release()
        for path in result.deleted:
            self._verified.pop(path, None)
        if result.deleted:
            self.log.info("{who}: removed {count} least recently used image blobs ({freed} "
                          "bytes) from {dir}; {total} bytes remain", who=self.label,
                          count=len(result.deleted), freed=result.freed, dir=self.local_dir,
                          total=result.total)
        if result.total > self.local_limit:
            self.log.warn("{who}: {dir} holds {total} bytes of pinned image blobs, more than "
                          "images.local_limit ({limit})", who=self.label, dir=self.local_dir,
                          total=result.total, limit=self.local_limit)
        return result

    # -- cache leases ------------------------------------------------------------------------

    def _hold(self, digest: str, name: Any, shown: str) -> Lease | None:
        """One more holder of the image's cache lease (None when leases are off)."""
        if self._cache_leases is None:
            return None
        return self._cache_leases.hold(digest, name, shown)

    def _drop(self, lease_id: str | None) -> None:
        if self._cache_leases is not None:
            self._cache_leases.drop(lease_id)

    def _cache_client(self) -> CacheClient:
        """The client of the cache's lease API (made when first needed)."""
        assert self.cache_url is not None
        url = self.cache_url
        client = CacheClient(
            self.reactor, url, ca_file=self.ca_file,
            credentials=(HOST_USER, self._token) if self._token else None,
            service=self._service(url), realm=self.realm,
            trusted_realms=self.trusted_realms, retries=1, backoff=self.backoff,
            timeout=min(self.timeout, 15.0))
        if self.switchboard is not None:
            client.registered = self.registered_stores
        return client

    # -- plumbing --------------------------------------------------------------------------

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    def _stores(self, image: Mapping[str, Any], attempt: _Attempt,
                registered: Mapping[str, str] | None) -> list[str]:
        stores: list[str] = []
        for url in image.get("stores") or []:
            try:
                store = check_store_url(str(url))
            except ValueError as e:
                attempt.add(str(e))
                continue
            if registered is not None and canonical_store_url(store) not in registered:
                text = (f"image store {store} is not registered with the switchboard: "
                        "not contacted")
                if self._registered_error:
                    text += f" ({self._registered_error})"
                self.log.warn("{who}: {text}", who=self.label, text=text)
                attempt.add(text)
                continue
            if store not in stores:
                stores.append(store)
        return stores

    def _service(self, store: str) -> str | None:
        """The registered service of ``store`` (None: unknown, or no switchboard)."""
        try:
            return (self._registered or {}).get(canonical_store_url(store))
        except ValueError:
            return None

    @staticmethod
    def _repository(name: Any, stores: list[str], attempt: _Attempt) -> str | None:
        if not stores:
            return None
        if not name:
            attempt.add("the job names its image by digest only, and image stores are read "
                        "by repository (the catalogue name)")
            return None
        try:
            return repository_of(str(name))
        except ValueError as e:
            attempt.add(str(e))
            return None

    def _client(self, store: str, clients: dict[str, RegistryClient]) -> RegistryClient:
        client = clients.get(store)
        if client is None:
            client = StoreClient(
                self.reactor, store, ca_file=self.ca_file,
                credentials=(HOST_USER, self._token) if self._token else None,
                service=self._service(store), realm=self.realm,
                trusted_realms=self.trusted_realms, retries=self.retries, backoff=self.backoff,
                retry_time=self.retry_time, timeout=self.timeout,
                on_retry=lambda text: self.log.info("{who}: {store}: {text}", who=self.label,
                                                    store=store, text=text))
            if self.switchboard is not None:
                client.registered = self.registered_stores
            clients[store] = client
        return client

    async def _manifest(self, digest: str, repo: str | None, stores: list[str],
                        clients: dict[str, RegistryClient], attempt: _Attempt, shown: str
                        ) -> tuple[bytes, str | None, str]:
        """``(bytes, media type or None, where from)``; the digest is verified."""
        if self.cache_mount:
            status, value = await self._in_thread(blobcache.read_manifest, self.cache_mount,
                                                 digest, False)
            if status == "ok":
                return value, None, f"the cache mount {self.cache_mount}"
            text = f"cache mount {self.cache_mount}: {value}"
            attempt.add(text, corrupt=status == "bad")
            if status != "missing":
                self.log.warn("{who}: {shown}: {text}", who=self.label, shown=shown, text=text)
        status, value = await self._in_thread(blobcache.read_manifest, self.local_dir, digest,
                                             True)
        if status == "ok":
            return value, None, f"the local copy in {self.local_dir}"
        if status != "missing":
            self.log.warn("{who}: {shown}: local copy of the manifest in {dir}: {reason}; "
                          "fetching it again", who=self.label, shown=shown, dir=self.local_dir,
                          reason=value)
            await self._in_thread(blobcache.unlink, blobcache.blob_path(self.local_dir, digest))
        if repo is not None:
            for i, store in enumerate(stores):
                client = self._client(store, clients)
                last = i + 1 == len(stores)
                try:
                    # While other stores remain, one that does not answer at once is skipped.
                    got = await client.get_manifest(repo, digest, retries=None if last else 1)
                except RegistryError as e:
                    attempt.add(_describe(store, e), corrupt=isinstance(e, DigestMismatch))
                    self.log.info("{who}: {shown}: {text}", who=self.label, shown=shown,
                                  text=_describe(store, e))
                    continue
                try:
                    await self._in_thread(blobcache.save_blob, self.local_dir, digest, got.data)
                except OSError as e:
                    self.log.warn("{who}: cannot keep the manifest of {shown} in {dir}: {error}",
                                  who=self.label, shown=shown, dir=self.local_dir,
                                  error=e.strerror or str(e))
                self.manifest_bytes += len(got.data)
                return got.data, got.media_type, store
        raise attempt.error(f"cannot get the manifest of {shown}")

    async def _layers(self, layers: Mapping[str, fmt.Descriptor], repo: str | None,
                      stores: list[str], clients: dict[str, RegistryClient], shown: str,
                      no_stores: str) -> tuple[dict[str, str], dict[str, str]]:
        paths: dict[str, str] = {}
        sources: dict[str, str] = {}
        await self._lock.acquire()
        try:
            for digest, desc in layers.items():
                paths[digest], sources[digest] = await self._layer(desc, repo, stores, clients,
                                                                   shown, no_stores)
        finally:
            self._lock.release()
        return paths, sources

    async def _verify(self, path: str, desc: fmt.Descriptor, touch: bool) -> tuple[str, Any]:
        status, value = await self._in_thread(blobcache.check_blob, path, desc.digest, desc.size,
                                              self._verified.get(path), touch)
        if status == "ok":
            self._verified[path] = value
        else:
            self._verified.pop(path, None)
        return status, value

    async def _layer(self, desc: fmt.Descriptor, repo: str | None, stores: list[str],
                     clients: dict[str, RegistryClient], shown: str, no_stores: str
                     ) -> tuple[str, str]:
        attempt = _Attempt()
        if self.cache_mount:
            path = blobcache.blob_path(self.cache_mount, desc.digest)
            status, value = await self._verify(path, desc, touch=False)
            if status == "ok":
                self.layer_sources["cache"] += 1
                return path, "cache"
            if status != "missing":
                text = f"cache mount {self.cache_mount}: blob {path}: {value}"
                attempt.add(text, corrupt=status == "bad")
                self.log.warn("{who}: {shown}: {text}", who=self.label, shown=shown, text=text)
        local = blobcache.blob_path(self.local_dir, desc.digest)
        status, value = await self._verify(local, desc, touch=True)
        if status == "ok":
            self.layer_sources["local"] += 1
            return local, "local"
        if status == "bad":
            self.log.warn("{who}: {path}: {reason}; downloading it again", who=self.label,
                          path=local, reason=value)
            await self._in_thread(blobcache.unlink, local)
        if repo is None or not stores:
            if self.cache_mount and not attempt.problems:
                attempt.add(f"cache mount {self.cache_mount}: it does not have the blob")
            attempt.add(no_stores)
            raise attempt.error(f"cannot get layer {desc.digest} of {shown}")
        for store in stores:
            client = self._client(store, clients)
            for tries in range(1, MISMATCH_TRIES + 1):
                try:
                    await client.pull_blob(repo, desc.digest, local, size=desc.size)
                except DigestMismatch as e:
                    text = _describe(store, e)
                    self.log.warn("{who}: {shown}: {text} (try {tries} of {of})", who=self.label,
                                  shown=shown, text=text, tries=tries, of=MISMATCH_TRIES)
                    if tries == MISMATCH_TRIES:
                        attempt.add(text, corrupt=True)
                    continue
                except RegistryError as e:
                    attempt.add(_describe(store, e))
                    break
                except OSError as e:
                    raise ImageFetchError(
                        IMAGE_NOT_FOUND, f"cannot write layer {desc.digest} of {shown} to "
                        f"{local}: {e.strerror or e}") from None
                self._verified[local] = await self._in_thread(blobcache.finish_download, local)
                self.downloaded_bytes += desc.size
                self.layer_sources["store"] += 1
                return local, store
        raise attempt.error(f"cannot get layer {desc.digest} of {shown}")

