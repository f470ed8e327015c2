"""The image store's service tree.

    imagestore (ImageStoreService)
    ├── keys            capability keys (auth.keys_file / auth.keys_url), unless auth.disabled
    ├── upload-expiry   removes upload sessions idle for uploads.max_age
    ├── gc              periodic garbage collection (gc.interval > 0; hourly by default)
    ├── cache-maintenance  cache mode: expire leases, flush the last-use index, evict
    ├── http            the registry listeners
    ├── manhole         optional SSH manhole (namespace: imagestore, storage, uploads, ...)
    └── metrics         optional Prometheus listeners

Start-up locks the root (a second store process on it refuses to start), checks
the storage layout, removes expired uploads and temporary
files, loads the cache's leases and last-use index (cache mode), then
listens. Disk work runs in a thread pool of the service's own
(``io_threads``), started and stopped with it.

For tests, build it in-process::

    config = ImageStoreConfig(root=str(tmp_path / "store"),
                              listen=["tcp:0:interface=127.0.0.1"],
                              keys_file=str(public_key_pem), realm="http://sb/token")
    store = ImageStoreService(reactor, config)
    store.startService()
    await store.ready()
    port = store.ports()[0].getHost().port
    ...
    await store.stopService()
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from treadmill.common.daemon import RoleService, listeners
from treadmill.common.http import log_requests
from treadmill.common.keys import KeySource, attach_keys
from treadmill.imagestore.api import RegistryAPI
from treadmill.imagestore.auth import Authorizer
from treadmill.imagestore.cache import Cache, CacheConfig
from treadmill.imagestore.cache_api import CacheRoutes
from treadmill.imagestore.gc import Collector, SharedExclusiveLock
from treadmill.imagestore.metrics import ImageStoreMetrics
from treadmill.imagestore.modes import CacheMode, PlainStore
from treadmill.imagestore.quota import Ledger, QuotaConfig
from treadmill.imagestore.site import registry_site
from treadmill.imagestore.storage import Storage
from treadmill.imagestore.uploads import Uploads

DEFAULT_LISTEN = "tcp:8081:interface=127.0.0.1:backlog=1024"


@dataclass
class ImageStoreConfig:
    """Everything an image store needs, already validated."""

    root: str
    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    service: str = "treadmill-imagestore"
    keys_url: str | None = None
    keys_file: str | None = None
    keys_refresh: float = 300.0
    issuer: str = "treadmill"
    ca_file: str | None = None
    realm: str | None = None
    auth_disabled: bool = False
    anonymous_pull: list[str] = field(default_factory=list)
    upload_max_age: float = 3600.0
    manifest_max_size: int = 4 * 1024 * 1024
    gc_interval: float = 3600.0
    gc_grace: float = 3600.0
    access_log: bool = True
    io_threads: int = 8
    cache: CacheConfig | None = None  # cache mode (cache.enabled)
    # Namespace byte quotas (not in cache mode) and open sessions per subject.
    quota: QuotaConfig = field(default_factory=QuotaConfig)


class _Periodic(Service):
    """Calls ``fn`` every ``interval`` seconds (not at start); logs its failures."""

    log = Logger()

    def __init__(self, reactor: Any, interval: float, fn: Any, what: str):
        self.reactor = reactor
        self.interval = interval
        self.fn = fn
        self.what = what
        self._call: LoopingCall | None = None

    def _run(self) -> Deferred[Any]:
        d = Deferred.fromCoroutine(_call(self.fn))
        d.addErrback(lambda f: self.log.failure("{what} failed", f, what=self.what))
        return d

    def startService(self) -> None:
        super().startService()
        self._call = LoopingCall(self._run)
        self._call.clock = self.reactor
        self._call.start(self.interval, now=False)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._call is not None and self._call.running:
            self._call.stop()
        return None


async def _call(fn: Any) -> Any:
    result = fn()
    if isinstance(result, Deferred) or inspect.isawaitable(result):
        result = await result
    return result


class ImageStoreService(RoleService):
    """The root service of an image store process; ``ready()`` fires when the store
    listens."""

    log = Logger()

    def __init__(self, reactor: Any, config: ImageStoreConfig):
        super().__init__()
        self.setName("imagestore")
        self.reactor = reactor
        self.config = config
        self.storage = Storage(config.root)
        self.pool = ThreadPool(minthreads=0, maxthreads=config.io_threads,
                               name="imagestore-io")
        self.lock = SharedExclusiveLock()
        self.collector = Collector(reactor, self.storage, self.pool, self.lock,
                                   grace=config.gc_grace)
        # Byte quotas apply to a store, not to a cache (its bound is cache.max_bytes).
        self.ledger: Ledger | None = None
        if config.cache is None:
            self.ledger = Ledger(config.quota)
            self.storage.ledger = self.ledger
        self.uploads = Uploads(reactor, self.storage, self.pool, self.lock,
                               max_age=config.upload_max_age, ledger=self.ledger,
                               per_subject=config.quota.uploads_per_subject)
        self.keys: KeySource | None = None
        verifier = None
        if not config.auth_disabled:
            self.keys, verifier = attach_keys(
                self, reactor, {"auth.issuer": config.issuer}, config.service,
                KeySource(reactor, url=config.keys_url, file=config.keys_file,
                          refresh=config.keys_refresh, ca_file=config.ca_file))
        self.auth = Authorizer(verifier, realm=config.realm, service=config.service,
                               anonymous_pull=config.anonymous_pull,
                               disabled=config.auth_disabled)
        self.cache: Cache | None = None
        if config.cache is not None:
            self.cache = Cache(reactor, self.storage, self.pool, self.lock, self.collector,
                               config.cache, realm=config.realm)
            self.uploads.on_commit = self.cache.committed
        self.api = RegistryAPI(
            reactor, self.storage, self.uploads, self.collector, self.auth, self.lock,
            self.pool, max_manifest=config.manifest_max_size,
            mode=CacheMode(self.cache) if self.cache is not None else PlainStore(),
            cache_routes=CacheRoutes(self.auth, self.cache) if self.cache is not None else None)
        self.site = registry_site(self.api)
        self.metrics = ImageStoreMetrics(self)
        log_requests(self.site, config.access_log, self.metrics.observe)
        expiry = _Periodic(reactor, self.uploads.expiry_interval, self.uploads.expire,
                           "Upload expiry")
        expiry.setName("upload-expiry")
        expiry.setServiceParent(self)
        if config.gc_interval > 0:
            gc = _Periodic(reactor, config.gc_interval, self.collector.collect,
                           "Garbage collection")
            gc.setName("gc")
            gc.setServiceParent(self)
        if self.cache is not None and config.cache is not None \
                and config.cache.maintenance_interval > 0:
            maintenance = _Periodic(reactor, config.cache.maintenance_interval,
                                    self.cache.maintain, "Cache maintenance")
            maintenance.setName("cache-maintenance")
            maintenance.setServiceParent(self)
        self._ports: list[Any] = []
        self._http: MultiService | None = None

    def namespace(self) -> dict[str, Any]:
        """What the manhole shows an operator (``collect_garbage()`` runs a GC)."""
        uploads = self.uploads

        def list_uploads() -> list[dict[str, Any]]:
            """Uploads in flight: id, repository, bytes so far, whether a client writes now."""
            return [{"id": u.id, "repository": u.repository, "size": u.size,
                     "writing": u.holder is not None} for u in uploads.active.values()]

        return {"imagestore": self, "storage": self.storage, "uploads": self.uploads,
                "collector": self.collector, "api": self.api, "auth": self.auth,
                "collect_garbage": self.collect_garbage, "reactor": self.reactor,
                "cache": self.cache, "quota": self.ledger, "list_uploads": list_uploads}

    def collect_garbage(self) -> Deferred[dict[str, Any]]:
        """Delete unreferenced blobs now; fires with a summary."""
        return self.collector.collect()

    def startService(self) -> None:
        # Fail the start (and twistd) at once if the root is unusable.
        self.storage.init()
        self.pool.start()
        super().startService()

    async def _start(self) -> None:
        await self.uploads.expire()
        if self.ledger is not None:
            usage = await deferToThreadPool(self.reactor, self.pool, self.ledger.rebuild,
                                            self.storage)
            self.log.info("Quotas: {namespaces} namespaces store {bytes} bytes",
                          namespaces=len(usage), bytes=sum(usage.values()))
        await self.uploads.load()
        if self.cache is not None:
            await self.cache.start()
        http = listeners(self.reactor, self.config.listen, self.site, "http")
        http.setServiceParent(self)
        self._http = http
        self._ports = [await service._waitingForPort  # type: ignore[attr-defined]
                       for service in http]
        self.log.info("Image store on {root} listening on {listen}", root=self.storage.root,
                      listen=", ".join(self.config.listen))

    def ports(self) -> list[Any]:
        """The listening ports (for tests that listen on port 0)."""
        return list(self._ports)

    async def _stop(self) -> None:
        await super().stopService()
        if self.cache is not None:
            await self.cache.stop()
        self.pool.stop()
        self.storage.close()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())
