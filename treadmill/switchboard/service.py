"""The switchboard's service tree.

    switchboard (SwitchboardService)
    ├── listener        LISTEN connection: jobs, hosts, auth notifications
    ├── (after the database is ready)
    │   ├── timeouts    queue and execution timeouts
    │   ├── token-usage batched last-use times of API tokens
    │   ├── links       supervisor WebSockets: heartbeats, reconciliation
    │   ├── scheduler   assigns queued jobs to free hosts
    │   └── http        the API listeners (and /api/v1/supervisor)
    ├── manhole         optional SSH manhole
    └── metrics         optional Prometheus listeners

Start-up connects the pool and applies migrations, retrying with backoff
while PostgreSQL is unreachable; the HTTP listeners open only then.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from treadmill.common.captoken import CapabilitySigner, load_or_create_signing_key
from treadmill.common.daemon import RoleService, listeners
from treadmill.common.http import limited_site
from treadmill.switchboard.api import Limits, SwitchboardAPI
from treadmill.switchboard.auth import Authenticator, PasswordGuard, PasswordPolicy
from treadmill.switchboard.database import Listener, Pool, migrate
from treadmill.switchboard.events import JobWatchers
from treadmill.switchboard.links import SupervisorLinks
from treadmill.switchboard.metrics import SwitchboardMetrics
from treadmill.switchboard.scheduler import Scheduler
from treadmill.switchboard.store import Store
from treadmill.switchboard.timeouts import TimeoutEnforcer


@dataclass
class SwitchboardConfig:
    """Everything the switchboard needs, already validated."""

    dsn: str
    listen: list[str]
    signing_key: str
    issuer: str = "treadmill"
    pool_size: int = 4
    max_body: int = 64 * 1024
    access_log: bool = True
    instance: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    auth_cache_ttl: float = 5.0
    timeout_interval: float = 1.0
    limits: Limits = field(default_factory=Limits)
    scheduler_interval: float = 2.0
    fairness_window: float = 3600.0
    proxies: tuple[str, ...] = ()
    proxy_service: str = "treadmill-proxy"
    unrunnable_grace: float = 30.0
    max_host_failures: int = 3
    ping_interval: float = 5.0
    ping_timeout: float = 10.0
    reconcile_interval: float = 30.0
    unreachable_after: float = 60.0
    passwords: PasswordPolicy = field(default_factory=PasswordPolicy)


class SwitchboardService(RoleService):
    """The root service of a switchboard process; ``ready()`` fires when the database
    is migrated and the API listens."""

    log = Logger()

    def __init__(self, reactor: Any, config: SwitchboardConfig):
        super().__init__()
        self.setName("switchboard")
        self.reactor = reactor
        self.config = config
        self.pool = Pool(reactor, config.dsn, config.pool_size)
        self.store = Store(self.pool, max_host_failures=config.max_host_failures)
        self.signer = CapabilitySigner(load_or_create_signing_key(config.signing_key),
                                       config.issuer, reactor)
        self.auth = Authenticator(self.store, reactor, ttl=config.auth_cache_ttl)
        self.watchers = JobWatchers(self.store, reactor)
        self.links = SupervisorLinks(
            reactor, self.store, config.instance, ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout, reconcile_interval=config.reconcile_interval,
            touch_interval=min(5.0, config.unreachable_after / 4),
            unreachable_after=config.unreachable_after, signer=self.signer,
            log_service=config.limits.log_service, proxies=config.proxies,
            proxy_service=config.proxy_service)
        self.links.setName("links")
        self.scheduler = Scheduler(reactor, self.store, interval=config.scheduler_interval,
                                   fresh_within=max(15.0, 3 * min(5.0,
                                                                  config.unreachable_after / 4)),
                                   unrunnable_grace=config.unrunnable_grace,
                                   fairness_window=config.fairness_window)
        self.scheduler.setName("scheduler")
        self.api = SwitchboardAPI(reactor, self.store, self.auth, self.signer, self.watchers,
                                  replace(config.limits, proxy_service=config.proxy_service),
                                  supervisor_resource=self.links.resource,
                                  passwords=PasswordGuard(reactor, config.passwords))
        self.listener = Listener(reactor, config.dsn)
        self.listener.setName("listener")
        self.listener.observe("treadmill_jobs", self.watchers.notify)
        self.listener.observe("treadmill_auth", self.auth.invalidate)
        self.listener.observe("treadmill_jobs", self.links.job_changed)
        self.listener.observe("treadmill_jobs", self.scheduler.job_changed)
        self.listener.observe("treadmill_hosts", self.links.host_changed)
        self.listener.observe("treadmill_snapshots", self.links.snapshot_requested)
        self.listener.observe("treadmill_hosts", self.scheduler.host_changed)
        self.listener.on_reconnect(self.watchers.wake_all)
        self.listener.on_reconnect(self.auth.invalidate)
        self.listener.on_reconnect(self.links.database_reconnected)
        self.listener.on_reconnect(self.scheduler.wake)
        self.listener.setServiceParent(self)
        self.site = limited_site(self.api.resource(), config.max_body)
        self.job_counts: dict[str, int] = {}
        self.metrics = SwitchboardMetrics(self)
        access_log = self.site.log

        def log(request: Any) -> None:
            self.metrics.observe(request)
            if config.access_log:
                access_log(request)

        self.site.log = log  # type: ignore[method-assign]
        self._ports: list[Any] = []

    def namespace(self) -> dict[str, Any]:
        """What the manhole shows an operator."""
        return {"switchboard": self, "store": self.store, "pool": self.pool, "api": self.api,
                "auth": self.auth, "watchers": self.watchers, "links": self.links,
                "scheduler": self.scheduler, "metrics": self.metrics, "reactor": self.reactor}

    async def _start(self) -> None:
        delay = 0.5
        while not self._stopping:
            try:
                await self.pool.start()
                applied = await migrate(self.pool)
                break
            except Exception as e:
                self.pool.close()
                self.log.error("Database not ready ({error}); retrying in {delay:.1f} s",
                               error=str(e).strip() or type(e).__name__, delay=delay)
                await deferLater(self.reactor, delay, lambda: None)
                delay = min(delay * 2, 30.0)
        if self._stopping:
            return
        self.log.info("Database ready ({count} migrations applied)", count=len(applied))
        await self.listener.ready()
        timeouts = TimeoutEnforcer(self.store, self.reactor, self.config.timeout_interval)
        timeouts.setName("timeouts")
        timeouts.setServiceParent(self)
        usage = self.auth.usage_service()
        usage.setName("token-usage")
        usage.setServiceParent(self)
        self.links.setServiceParent(self)
        self.scheduler.setServiceParent(self)
        counts = TimerService(15.0, lambda: Deferred.fromCoroutine(self._count_jobs()))
        counts.clock = self.reactor
        counts.setName("job-counts")
        counts.setServiceParent(self)
        http = listeners(self.reactor, self.config.listen, self.site, "http")
        http.setServiceParent(self)
        # StreamServerEndpointService keeps the pending listen here.
        self._ports = [await service._waitingForPort  # type: ignore[attr-defined]
                       for service in http]
        self.log.info("Switchboard {instance} listening on {listen}",
                      instance=self.config.instance, listen=", ".join(self.config.listen))

    async def _count_jobs(self) -> None:
        try:
            self.job_counts = await self.store.job_counts()
        except Exception:
            self.log.failure("Could not count jobs")

    def ports(self) -> list[Any]:
        """The listening ports of the API (for tests that listen on port 0)."""
        return list(self._ports)

    async def _stop(self) -> None:
        await super().stopService()
        await self.auth.flush_usage()
        self.pool.close()

    def stopService(self) -> Deferred[None]:
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())
