"""The switchboard's service tree.

    switchboard (SwitchboardService)
    ├── listener        LISTEN connection: jobs, hosts, auth notifications
    ├── (after the database is ready)
    │   ├── instance    this instance's heartbeat in ``instances``; who leads
    │   ├── timeouts    queue and execution timeouts
    │   ├── token-usage batched last-use times of API tokens
    │   ├── links       supervisor WebSockets: heartbeats, reconciliation
    │   ├── scheduler   assigns queued jobs to free hosts
    │   └── http        the API listeners (and /api/v1/supervisor)
    ├── manhole         optional SSH manhole
    └── metrics         optional Prometheus listeners

Start-up connects the pool and applies migrations, retrying with backoff
while PostgreSQL is unreachable; then it checks that the capability signing key
is the one the database records for every instance (:class:`SigningKeyMismatch`
if not); the HTTP listeners open only then.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from treadmill.common.captoken import (
    CapabilitySigner,
    load_or_create_signing_key,
    load_public_keys,
    public_jwk,
)
from treadmill.common.daemon import RoleService, listeners
from treadmill.common.http import limited_site, log_requests
from treadmill.common.timers import every
from treadmill.switchboard.api import Limits, SwitchboardAPI
from treadmill.switchboard.audit import RetentionService
from treadmill.switchboard.auth import Authenticator, PasswordGuard, PasswordPolicy
from treadmill.switchboard.database import Listener, Pool, Timeouts, migrate, unavailable
from treadmill.switchboard.events import JobWatchers
from treadmill.switchboard.healthwork import HealthWork
from treadmill.switchboard.instances import Instance
from treadmill.switchboard.links import LinkPolicy, SupervisorLinks
from treadmill.switchboard.metrics import SwitchboardMetrics
from treadmill.switchboard.scheduler import Scheduler, SchedulingPolicy
from treadmill.switchboard.store import Store
from treadmill.switchboard.timeouts import TimeoutEnforcer
from treadmill.switchboard.web import console_root


@dataclass
class SwitchboardConfig:
    """Everything the switchboard needs, already validated; its defaults are the
    settings' (``tap.Options``: each setting names its field here)."""

    dsn: str
    listen: list[str] = field(default_factory=lambda: ["tcp:8080:interface=127.0.0.1"])
    signing_key: str = "/var/lib/treadmill-switchboard/capability-key.pem"
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
    health_interval: float = 10.0
    links: LinkPolicy = field(default_factory=LinkPolicy)
    timeouts: Timeouts = field(default_factory=Timeouts)
    passwords: PasswordPolicy = field(default_factory=PasswordPolicy)
    heartbeat_interval: float = 1.0
    address: str = ""
    adopt_signing_key: bool = False
    published_keys: tuple[str, ...] = ()
    rebalance_interval: float = 10.0
    audit_retention: float = 365.0

    def scheduling(self) -> SchedulingPolicy:
        """The scheduler's policy: its settings, and hosts whose link was touched within
        the last three touch intervals (15 s at least)."""
        return SchedulingPolicy(fresh_within=max(15.0, 3 * self.links.touch_interval),
                                unrunnable_grace=self.unrunnable_grace,
                                fairness_window=self.fairness_window)


class SigningKeyMismatch(RuntimeError):
    """This instance's capability signing key is not the one the database records."""


class SwitchboardService(RoleService):
    """The root service of a switchboard process; ``ready()`` fires when the database
    is migrated and the API listens."""

    log = Logger()

    def __init__(self, reactor: Any, config: SwitchboardConfig):
        super().__init__()
        self.setName("switchboard")
        self.reactor = reactor
        self.config = config
        self.pool = Pool(reactor, config.dsn, config.pool_size, config.timeouts)
        self.store = Store(self.pool, max_host_failures=config.max_host_failures)
        self.signer = CapabilitySigner(
            load_or_create_signing_key(config.signing_key), config.issuer, reactor,
            published_keys=[key for path in config.published_keys
                            for key in load_public_keys(path).values()])
        self.auth = Authenticator(self.store, reactor, ttl=config.auth_cache_ttl)
        self.watchers = JobWatchers(self.store, reactor)
        self.links = SupervisorLinks(
            reactor, self.store, config.instance, config.links, signer=self.signer,
            log_service=config.limits.log_service, proxies=config.proxies,
            proxy_service=config.proxy_service)
        self.links.setName("links")
        self.instance = Instance(reactor, self.store, config.instance,
                                 config.address or " ".join(config.listen),
                                 interval=config.heartbeat_interval)
        self.instance.setName("instance")
        self.links.instance_id = self.instance.id
        self.scheduler = Scheduler(reactor, self.store, config.scheduling(),
                                   interval=config.scheduler_interval,
                                   is_leader=self.instance.is_leader)
        self.scheduler.setName("scheduler")
        self.instance.observe(self._heartbeat)
        self.api = SwitchboardAPI(reactor, self.store, self.auth, self.signer, self.watchers,
                                  replace(config.limits, proxy_service=config.proxy_service),
                                  supervisor_resource=self.links.resource,
                                  passwords=PasswordGuard(reactor, config.passwords))
        self.listener = Listener(reactor, config.dsn, config.timeouts)
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
        self.site = limited_site(console_root(self.api, [*config.limits.log_servers,
                                                         *config.proxies]),
                                 config.max_body)
        self.job_counts: dict[str, int] = {}
        self.host_counts: dict[str, int] = {}
        self.metrics = SwitchboardMetrics(self)
        log_requests(self.site, config.access_log, self.metrics.observe)
        self._ports: list[Any] = []
        self._was_leader = False
        self._live = 0

    def namespace(self) -> dict[str, Any]:
        """What the manhole shows an operator (helpers: ``treadmill.switchboard.manhole``)."""
        from treadmill.switchboard.manhole import helpers

        return {"switchboard": self, "store": self.store, "pool": self.pool, "api": self.api,
                "auth": self.auth, "watchers": self.watchers, "links": self.links,
                "scheduler": self.scheduler, "metrics": self.metrics, "reactor": self.reactor,
                "instance": self.instance, **helpers(self)}

    def _heartbeat(self, instance: Instance) -> None:
        """After each heartbeat: a new leader schedules at once, and so does the leader
        when an instance came back (its hosts are schedulable again); links rebalance."""
        cluster = instance.cluster
        if cluster.leader and (not self._was_leader or cluster.live > self._live):
            self.scheduler.wake()
        self._was_leader, self._live = cluster.leader, cluster.live
        self.links.rebalance(cluster.live, cluster.links, self.config.rebalance_interval)

    async def _check_signing_key(self) -> None:
        """Record this instance's signing key if the database has none (or on
        ``adopt_signing_key``); refuse to start with another key."""
        row = await self.store.record_capability_key(
            self.signer.key_id, public_jwk(self.signer.public_key)["x"], self.config.instance,
            replace=self.config.adopt_signing_key)
        if row["key_id"] != self.signer.key_id:
            raise SigningKeyMismatch(
                f"the capability signing key {self.config.signing_key} (key id "
                f"{self.signer.key_id}) is not the key every switchboard instance of this "
                f"database uses (key id {row['key_id']}, recorded by {row['recorded_by']} at "
                f"{row['recorded_at']:%Y-%m-%d %H:%M:%S %Z}): copy that key file here, or "
                "see \"Rotating the capability signing key\" in docs/operations.md")
        if self.config.adopt_signing_key:
            self.log.warn("Capability signing key {key_id} adopted for every instance",
                          key_id=self.signer.key_id)

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
        await self._check_signing_key()
        await self.listener.ready()
        await self.instance.register()
        self.instance.setServiceParent(self)
        await self.instance.beat()
        timeouts = TimeoutEnforcer(self.store, self.reactor, self.config.timeout_interval)
        timeouts.setName("timeouts")
        timeouts.setServiceParent(self)
        usage = self.auth.usage_service()
        usage.setName("token-usage")
        usage.setServiceParent(self)
        self.links.setServiceParent(self)
        self.scheduler.setServiceParent(self)
        every(15.0, self._count_jobs, self.reactor, parent=self, name="job-counts")
        retention = RetentionService(self.reactor, self.store, self.config.audit_retention,
                                     is_leader=self.instance.is_leader)
        retention.setName("audit-retention")
        retention.setServiceParent(self)
        health = HealthWork(self.reactor, self.store, self.instance.is_leader,
                            self.config.health_interval)
        health.setName("health")
        health.setServiceParent(self)
        http = listeners(self.reactor, self.config.listen, self.site, "http")
        http.setServiceParent(self)
        # StreamServerEndpointService keeps the pending listen here.
        self._ports = [await service._waitingForPort  # type: ignore[attr-defined]
                       for service in http]
        self.log.info("Switchboard {instance} listening on {listen}",
                      instance=self.config.instance, listen=", ".join(self.config.listen))

    async def _count_jobs(self) -> None:
        if not self.instance.is_leader():
            return  # Cluster-wide: the leader counts (and exports) them.
        try:
            self.job_counts = await self.store.job_counts()
            self.host_counts = await self.store.host_counts()
        except Exception as e:
            if not unavailable(e):
                self.log.failure("Could not count jobs")
            else:  # the gauge keeps its last counts until the next pass
                self.log.warn("Could not count jobs: the database is unavailable")

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
