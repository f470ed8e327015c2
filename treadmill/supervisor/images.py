"""Fetching a job's image: from a site image cache's mount, or from image stores.

A job names its image by manifest digest (``JobStart.image``: ``{digest,
name, stores}``). :class:`ImageFetcher` resolves that digest — never a tag —
to a parsed :class:`~treadmill.images.format.TreadmillImage` and a local path
for every layer, verifying every digest on the way:

1. **The manifest.** From the cache mount (``images.cache_mount``, the root of
   a site image cache, often NFS, in the image store's stable layout:
   ``ROOT/blobs/sha256/<hh>/<hex>``) if it holds the manifest blob — read and
   hashed in a thread — else from the job's stores in order, with
   :class:`~treadmill.images.oci.RegistryClient` (repository: the image's
   catalogue name, lowercased; the host token as the HTTP Basic password of the
   registry token flow, sent only to a trusted realm, the switchboard's). It
   must parse as a Treadmill image (``image_invalid`` otherwise).
2. **Every layer.** From the cache mount if it is there (opened read-only, in
   place), else from the supervisor's own directory (``images.dir``, the same
   layout) if it is there, else downloaded there from the stores (a temporary
   file verified while streaming, then renamed into place, mode 0444).

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

**Cache leases.** A site image cache evicts least recently used blobs unless a
lease protects them (``docs/imagestore.md``, "Leases"). With ``cache_url``
(the cache's HTTP base URL; the cache whose root is ``cache_mount``) and a
job image that has a name, :meth:`ImageFetcher.fetch` first takes a lease on
the manifest digest (``POST /cache/leases`` with ``fetch: true`` and ``wait:
lease_wait``), so a cache miss is pulled through by the cache and then read
from the mount rather than downloaded from the stores. The request carries a
pull token for the image's repository, obtained with the same registry token
flow as the store downloads (host token as the Basic password, trusted realms
only). The lease is renewed every ``lease_ttl/3`` seconds (reactor clock) while
a :class:`FetchedImage` of it is held, and deleted on :meth:`~ImageFetcher.release`
of the last one. Its id is ``<host key>-<manifest hex>``, the host key being
the first 16 hex digits of the sha256 of the host token: stable across
restarts (a restarted supervisor renews rather than duplicates), distinct per
host, and revealing nothing of the token.

A cache that cannot be reached, refuses, or cannot get the whole image in time
is not an error: a warning is logged and the fetch goes on as without a lease
(the mount for what is there, the stores for the rest); renewals keep trying,
so the lease is taken as soon as the cache answers. On :meth:`~ImageFetcher.close`
(the supervisor stops) renewals stop but leases are kept, since a job left
running is adopted by the next start: :meth:`~ImageFetcher.pin` with the job's
``image`` takes its lease again (same id: a renewal), and the matching
:meth:`~ImageFetcher.release_digests` deletes it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import treq
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

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

__all__ = ["DEFAULT_LOCAL_LIMIT", "FetchedImage", "ImageFetchError", "ImageFetcher",
           "http_url_for"]

DEFAULT_LOCAL_LIMIT = 20 * 2**30  # bytes kept in images.dir
MAX_MANIFEST = 4 * 1024 * 1024
PART_MAX_AGE = 3600.0  # seconds after which an abandoned download's .part file goes
STORE_MARKER = "treadmill-imagestore.json"
STORE_LAYOUT = 1
READ_SIZE = 1024 * 1024
MISMATCH_TRIES = 2  # downloads of one blob from one store while its digest does not match
HOST_USER = "host"  # the Basic user name sent with the host token (the switchboard ignores it)
LEASE_TTL = 600.0  # seconds a cache lease lasts unless renewed (renewed every third of it)
LEASE_WAIT = 60.0  # seconds the first lease request lets the cache pull the image in
MAX_LEASE_ANSWER = 1024 * 1024
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


def blob_path(root: str, digest: str) -> str:
    """``ROOT/blobs/sha256/<hh>/<hex>`` (the image store's layout)."""
    hex_ = digest.split(":", 1)[1]
    return os.path.join(root, "blobs", "sha256", hex_[:2], hex_)


# -- blocking helpers (run in threads) ---------------------------------------------------

Identity = tuple[int, int, int, int]


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _check_blob(path: str, digest: str, size: int, known: Identity | None,
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
    ident = _identity(st)
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


def _read_manifest(root: str, digest: str, local: bool) -> tuple[str, Any]:
    """A manifest blob from a store layout: ``("ok", bytes)``, ``("missing", reason)``,
    ``("bad", reason)`` or ``("error", reason)``. In the cache mount the layout
    marker is checked first; in the ``local`` directory the atime is set to now."""
    if not local:
        problem = _check_marker(root)
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


def _check_marker(root: str) -> str | None:
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


def _save_blob(root: str, digest: str, data: bytes) -> None:
    """Write a small verified blob into a layout (temporary file, rename, mode 0444)."""
    path = blob_path(root, digest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{os.getpid()}.part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o444)
    os.replace(tmp, path)


def _finish_download(path: str) -> Identity:
    os.chmod(path, 0o444)
    now = time.time_ns()
    os.utime(path, ns=(now, now))
    return _identity(os.stat(path))


@dataclass
class GCResult:
    deleted: list[str] = field(default_factory=list)  # paths
    freed: int = 0
    total: int = 0  # bytes left


def _collect(root: str, limit: int, pinned: Callable[[str], bool], now: float) -> GCResult:
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


# -- image cache leases --------------------------------------------------------------------


class _StoreClient(RegistryClient):
    """A store client of a fetcher with a switchboard: before asking for a token it looks
    the store's registered service up (so a client made before any fetch, e.g. to push a
    snapshot, asks for the right audience) and refuses a store that is not registered."""

    fetcher: ImageFetcher | None = None

    async def _authenticate(self, repo: str, params: dict[str, str], url: str,
                            actions: Sequence[str] = ("pull",)) -> None:
        fetcher = self.fetcher
        if fetcher is not None and fetcher.switchboard is not None:
            registered = await fetcher.registered_stores() or {}
            service = registered.get(canonical_store_url(self.base_url))
            if service is None:
                raise RegistryError(
                    401, "UNAUTHORIZED", f"image store {self.base_url} is not registered "
                    "with the switchboard; no token was requested", url)
            self.service = service
        await super()._authenticate(repo, params, url, actions)


class _CacheClient(_StoreClient):
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
class _Lease:
    """A cache lease this fetcher holds: one per manifest digest, counted."""

    id: str
    digest: str
    repository: str
    shown: str
    holders: int = 0
    held: bool = False  # the cache granted it at least once
    dropped: bool = False
    loop: LoopingCall | None = None
    lock: DeferredLock = field(default_factory=DeferredLock)  # one request at a time


# -- the fetcher ---------------------------------------------------------------------------


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
        self._verified: dict[str, Identity] = {}
        self._pins: collections.Counter[str] = collections.Counter()
        self._lock = DeferredLock()  # layer fetching and local garbage collection
        self._host_key = hashlib.sha256((token or label).encode()).hexdigest()[:16]
        self._leases: dict[str, _Lease] = {}  # lease id -> lease
        self._adopted: dict[frozenset[str], list[str]] = {}  # pinned digests -> lease ids
        self._cache_client: _CacheClient | None = None
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
        lease = self._hold_lease(digest, name, shown)
        try:
            if lease is not None:
                await self._ensure_lease(lease, self.lease_wait)
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
            self._drop_lease(lease.id if lease is not None else None)
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
        lease = self._hold_lease(digest, name, f"image {name} ({digest})")
        if lease is not None:
            self._adopted.setdefault(pinned, []).append(lease.id)
            Deferred.fromCoroutine(self._ensure_lease(lease, 0.0)).addErrback(
                lambda f: self.log.failure("{who}: lease {id}", f, who=self.label, id=lease.id))

    def release_digests(self, digests: Iterable[str]) -> None:
        """Undo :meth:`pin` (and drop the lease it took, if any)."""
        pinned = frozenset(digests)
        self._unpin(pinned)
        leases = self._adopted.get(pinned)
        if leases:
            self._drop_lease(leases.pop())
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
            self._drop_lease(fetched.lease)

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
        return f"{self._host_key}-{digest.split(':', 1)[1]}"

    @property
    def leases(self) -> dict[str, int]:
        """The cache leases held now: id -> number of holders (for the manhole, tests)."""
        return {lease_id: lease.holders for lease_id, lease in self._leases.items()}

    async def close(self) -> None:
        """The supervisor stops: stop renewing cache leases, but keep them (a job left
        running is adopted by the next start); later releases delete nothing."""
        for lease in self._leases.values():
            lease.dropped = True
            if lease.loop is not None and lease.loop.running:
                lease.loop.stop()
        self._leases.clear()
        self._adopted.clear()
        if self._cache_client is not None:
            client, self._cache_client = self._cache_client, None
            await client.close()

    def stopService(self) -> Deferred[None]:
        """As a child of the supervisor's service: :meth:`close`."""
        super().stopService()
        return Deferred.fromCoroutine(self.close())

    def pinned(self, digest: str) -> bool:
        return self._pins.get(digest, 0) > 0

    async def collect(self) -> GCResult | None:
        """Trim the local directory to ``local_limit`` bytes (least recently used first)."""
        await self._lock.acquire()
        try:
            result: GCResult = await self._in_thread(
                _collect, self.local_dir, self.local_limit, self.pinned, time.time())
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

    def _hold_lease(self, digest: str, name: Any, shown: str) -> _Lease | None:
        """Count one more holder of the image's lease (None when leases are off, or
        the image has no name: a lease is authorised by its repository)."""
        if not (self.cache_url and self.cache_mount and name):
            return None
        try:
            repository = repository_of(str(name))
        except ValueError:
            return None
        lease_id = self.lease_id(digest)
        lease = self._leases.get(lease_id)
        if lease is None:
            lease = self._leases[lease_id] = _Lease(lease_id, digest, repository, shown)
        lease.holders += 1
        return lease

    async def _ensure_lease(self, lease: _Lease, wait: float) -> None:
        """Take the lease (once per holding), then renew it every ttl/3."""
        await lease.lock.acquire()
        try:
            if lease.loop is None and not lease.dropped:
                await self._put_lease(lease, wait, renewal=False)
                if lease.dropped:  # released (or the fetcher closed) meanwhile
                    return
                lease.loop = LoopingCall(self._renew_lease, lease)
                lease.loop.clock = self.reactor
                lease.loop.start(self.lease_ttl / 3, now=False).addErrback(
                    lambda f: self.log.failure("{who}: renewing lease {id}", f, who=self.label,
                                               id=lease.id))
        finally:
            lease.lock.release()

    def _cache(self) -> _CacheClient:
        if self._cache_client is None:
            assert self.cache_url is not None
            url = self.cache_url
            self._cache_client = _CacheClient(
                self.reactor, url, ca_file=self.ca_file,
                credentials=(HOST_USER, self._token) if self._token else None,
                service=self._service(url), realm=self.realm,
                trusted_realms=self.trusted_realms, retries=1, backoff=self.backoff,
                timeout=min(self.timeout, 15.0))
            self._cache_client.fetcher = self
        return self._cache_client

    async def _put_lease(self, lease: _Lease, wait: float, renewal: bool) -> None:
        """``POST /cache/leases``; failures are logged, never raised."""
        body = {"lease": lease.id, "holder": f"{self.label} (host {self._host_key})",
                "digests": [lease.digest], "repository": lease.repository,
                "ttl": self.lease_ttl, "fetch": not renewal, "wait": wait}
        try:
            code, status = await self._cache().put_lease(lease.repository, body, wait)
        except RegistryError as e:
            then = (f"trying again in {self.lease_ttl / 3:g} s" if renewal else
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

    def _renew_lease(self, lease: _Lease) -> Deferred[None]:
        async def renew() -> None:
            await lease.lock.acquire()
            try:
                if not lease.dropped:
                    await self._put_lease(lease, 0.0, renewal=True)
            finally:
                lease.lock.release()

        d = Deferred.fromCoroutine(renew())
        d.addErrback(lambda f: self.log.failure("{who}: renewing lease {id}", f,
                                                who=self.label, id=lease.id))
        return d

    def _drop_lease(self, lease_id: str | None) -> None:
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
                                  ttl=self.lease_ttl)
                    return
                self.log.info("{who}: {shown}: lease {id} released", who=self.label,
                              shown=lease.shown, id=lease.id)
            finally:
                lease.lock.release()

        Deferred.fromCoroutine(delete()).addErrback(
            lambda f: self.log.failure("{who}: deleting lease {id}", f, who=self.label,
                                       id=lease.id))

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
            client = _StoreClient(
                self.reactor, store, ca_file=self.ca_file,
                credentials=(HOST_USER, self._token) if self._token else None,
                service=self._service(store), realm=self.realm,
                trusted_realms=self.trusted_realms, retries=self.retries, backoff=self.backoff,
                retry_time=self.retry_time, timeout=self.timeout,
                on_retry=lambda text: self.log.info("{who}: {store}: {text}", who=self.label,
                                                    store=store, text=text))
            client.fetcher = self
            clients[store] = client
        return client

    async def _manifest(self, digest: str, repo: str | None, stores: list[str],
                        clients: dict[str, RegistryClient], attempt: _Attempt, shown: str
                        ) -> tuple[bytes, str | None, str]:
        """``(bytes, media type or None, where from)``; the digest is verified."""
        if self.cache_mount:
            status, value = await self._in_thread(_read_manifest, self.cache_mount, digest, False)
            if status == "ok":
                return value, None, f"the cache mount {self.cache_mount}"
            text = f"cache mount {self.cache_mount}: {value}"
            attempt.add(text, corrupt=status == "bad")
            if status != "missing":
                self.log.warn("{who}: {shown}: {text}", who=self.label, shown=shown, text=text)
        status, value = await self._in_thread(_read_manifest, self.local_dir, digest, True)
        if status == "ok":
            return value, None, f"the local copy in {self.local_dir}"
        if status != "missing":
            self.log.warn("{who}: {shown}: local copy of the manifest in {dir}: {reason}; "
                          "fetching it again", who=self.label, shown=shown, dir=self.local_dir,
                          reason=value)
            await self._in_thread(_unlink, blob_path(self.local_dir, digest))
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
                    await self._in_thread(_save_blob, self.local_dir, digest, got.data)
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
        status, value = await self._in_thread(_check_blob, path, desc.digest, desc.size,
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
            path = blob_path(self.cache_mount, desc.digest)
            status, value = await self._verify(path, desc, touch=False)
            if status == "ok":
                self.layer_sources["cache"] += 1
                return path, "cache"
            if status != "missing":
                text = f"cache mount {self.cache_mount}: blob {path}: {value}"
                attempt.add(text, corrupt=status == "bad")
                self.log.warn("{who}: {shown}: {text}", who=self.label, shown=shown, text=text)
        local = blob_path(self.local_dir, desc.digest)
        status, value = await self._verify(local, desc, touch=True)
        if status == "ok":
            self.layer_sources["local"] += 1
            return local, "local"
        if status == "bad":
            self.log.warn("{who}: {path}: {reason}; downloading it again", who=self.label,
                          path=local, reason=value)
            await self._in_thread(_unlink, local)
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
                self._verified[local] = await self._in_thread(_finish_download, local)
                self.downloaded_bytes += desc.size
                self.layer_sources["store"] += 1
                return local, store
        raise attempt.error(f"cannot get layer {desc.digest} of {shown}")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
