"""The log server's service tree.

    logserver (LogServerService)
    ├── keys        the switchboard's capability keys (file, or fetched and refreshed)
    ├── (after the store is loaded)
    │   ├── retention  deletes whole jobs by age and total size, oldest first
    │   └── http       the API listeners (Klein; WebSocket follow under it)
    ├── manhole     optional SSH manhole
    └── metrics     optional Prometheus listeners

Start-up scans the storage root (in a thread) before the listeners open, so
that every stream's length is known before the first append.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from treadmill.common.cors import with_cors
from treadmill.common.daemon import RoleService, listeners
from treadmill.common.http import limited_site, log_requests
from treadmill.common.keys import KeySource, attach_keys
from treadmill.common.timers import every
from treadmill.logserver.api import LogServerAPI
from treadmill.logserver.follow import FollowFactory
from treadmill.logserver.metrics import LogServerMetrics
from treadmill.logserver.streams import StreamStore

DAY = 24 * 3600.0


@dataclass
class LogServerConfig:
    """Everything a log server needs, already validated; its defaults are the settings'
    (``tap.Options``: each setting names its field here)."""

    root: str
    listen: list[str] = field(default_factory=lambda: ["tcp:8070:interface=127.0.0.1"])
    auth: dict[str, Any] = field(default_factory=dict)  # the auth.* settings
    service: str = "treadmill-logserver"
    max_append: int = 1024 * 1024
    fsync: str = "always"
    max_streams: int = 64
    retention_max_age: float | None = 30 * DAY
    retention_max_bytes: int | None = None
    retention_interval: float = 300.0
    access_log: bool = True
    ping_interval: float = 30.0
    cors_origins: tuple[str, ...] = ()  # web consoles that may read logs (docs/console.md)


LOG_HEADERS = "X-Stream-Length, X-Stream-Closed, Content-Range, Content-Length"
"""Response headers a web console may read (``http.cors_origins``)."""


class LogServerService(RoleService):
    """The root service of a log server process; ``ready()`` fires when the store is
    loaded and the API listens."""

    log = Logger()
    start_failure = "The log server cannot start"

    def __init__(self, reactor: Any, config: LogServerConfig, *, keys: KeySource | None = None):
        super().__init__()
        self.setName("logserver")
        self.reactor = reactor
        self.config = config
        self.keys, self.verifier = attach_keys(self, reactor, config.auth, config.service, keys)
        self.store = StreamStore(reactor, config.root, fsync=config.fsync,
                                 max_streams=config.max_streams)
        follow = FollowFactory(reactor, ping_interval=config.ping_interval,
                               ping_timeout=config.ping_interval)
        self.api = LogServerAPI(self.store, self.verifier, max_append=config.max_append,
                                follow_factory=follow)
        self.site = limited_site(with_cors(self.api.resource(), config.cors_origins,
                                           expose=LOG_HEADERS), config.max_append)
        self.metrics = LogServerMetrics(self)
        log_requests(self.site, config.access_log, self.metrics.observe)
        self._ports: list[Any] = []

    def namespace(self) -> dict[str, Any]:
        """What the manhole shows an operator."""
        store = self.store

        def list_streams(job_id: str | None = None) -> dict[str, dict[str, Any]]:
            """Streams on disk: job id -> stream name -> length and closed (one job's if
            ``job_id`` is given)."""
            return {job.id: {s.name: {"length": s.length, "closed": s.closed}
                             for s in job.existing()}
                    for job in store.jobs.values()
                    if job.on_disk and job_id in (None, job.id)}

        return {"logserver": self, "store": self.store, "api": self.api, "keys": self.keys,
                "metrics": self.metrics, "reactor": self.reactor, "list_streams": list_streams}

    async def _start(self) -> None:
        await self.store.start()
        if self._stopping:
            return
        if self.config.retention_max_age is not None or \
                self.config.retention_max_bytes is not None:
            every(self.config.retention_interval, self.retention, self.reactor, parent=self,
                  name="retention")
        http = listeners(self.reactor, self.config.listen, self.site, "http")
        http.setServiceParent(self)
        self._ports = [await service._waitingForPort  # type: ignore[attr-defined]
                       for service in http]
        self.log.info("Log server listening on {listen} (root {root}, fsync {fsync})",
                      listen=", ".join(self.config.listen), root=self.store.root,
                      fsync=self.config.fsync)

    async def retention(self) -> list[str]:
        """One retention pass (the timer runs it every ``retention.interval`` seconds)."""
        try:
            return await self.store.enforce_retention(self.config.retention_max_age,
                                                      self.config.retention_max_bytes)
        except Exception:
            self.log.failure("Retention pass failed")
            return []

    def ports(self) -> list[Any]:
        """The listening ports of the API (for tests that listen on port 0)."""
        return list(self._ports)

    async def _stop(self) -> None:
        await super().stopService()
        self.store.stop()

    def stopService(self) -> Deferred[None]:
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())

