"""The supervisor's service tree.

    supervisor (SupervisorService)
    ├── logs       JobLogs: each job's console, events and results, to its log servers
    ├── exposure   JobExposure: each job's services, published on its proxies (console
    │              clients they report go to the runner's outbox: ``ConsoleNotices``)
    ├── runner     JobRunner: the switchboard's job commands on the host driver
    ├── fetcher    ImageFetcher: jobs' images, for the driver
    ├── gc-freeze  optional FreezePolicy: when the collector scans the heap (common.gcpolicy)
    ├── manhole    optional SSH manhole
    ├── metrics    optional Prometheus listeners (``SupervisorMetrics``' registry)
    └── link       SupervisorLink: the WebSocket to the switchboard (after start-up)

Children start in this order and stop one after the other in the reverse order:
the link closes first; the fetcher stops renewing cache leases before the runner
releases the driver (a job left running keeps its leases); the observers of the
runner (``logs``, ``exposure``: ``IJobObserver``) stop last.

Start-up locks and reads the state directory and re-adopts (or reports) the
job it names; only then does the link connect. A graceful stop (SIGTERM,
SIGINT) leaves the job alone: it sends the journaled events still unacknowledged
(for at most ``flush_timeout`` seconds), closes the WebSocket with 4005 (going
away) and keeps the state directory for the next start.

For tests and tools, in-process::

    service = SupervisorService(reactor, SupervisorConfig(url=..., token=..., state_dir=...))
    service.startService()
    await service.ready()       # state directory read, link started
    await service.connected()   # the WebSocket is open
    ...
    await service.stopService()
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred

from treadmill.common.daemon import RoleService
from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.consolenotices import ConsoleNotices
from treadmill.supervisor.drivers import IHostDriver, make_driver
from treadmill.supervisor.jobexposure import JobExposure
from treadmill.supervisor.joblogs import JobLogs
from treadmill.supervisor.journal import StateFiles
from treadmill.supervisor.link import SupervisorLink, SupervisorProtocol
from treadmill.supervisor.metrics import SupervisorMetrics
from treadmill.supervisor.runner import JobRunner

__all__ = ["SupervisorService"]


class SupervisorService(RoleService):
    """The root service of a supervisor (or one of a fleet's).

    :meth:`ready` fails with the start-up error (e.g. a state directory in use),
    which is logged either way.
    """

    start_failure = "The supervisor cannot start"

    def __init__(self, reactor: Any, config: SupervisorConfig, *,
                 driver: IHostDriver | None = None, run_io: Any = None,
                 exit_on_failure: bool = False):
        super().__init__()
        self.exit_on_failure = exit_on_failure
        self.setName("supervisor")
        self.reactor = reactor
        self.config = config
        self.logs = JobLogs(reactor, config.state_dir, spool_limit=config.log_spool_limit,
                            durable=config.durable, ca_file=config.ca_file, label=config.name)
        self._add("logs", self.logs)
        self.fetcher = config.image_fetcher(reactor)
        self.driver = (driver if driver is not None
                       else make_driver(config.driver, config.driver_values, reactor=reactor,
                                        state_dir=config.state_dir, fetcher=self.fetcher))
        self.files = StateFiles(config.state_dir, durable=config.durable)
        self.runner = JobRunner(reactor, self.driver, self.files, run_io=run_io,
                                console_buffer=config.console_buffer, label=config.name,
                                ack_timeout=config.event_ack_timeout,
                                resend_max=config.event_resend_max)
        self.console_notices = ConsoleNotices(reactor, self.runner.outbox, label=config.name)
        self.exposure = JobExposure(reactor, self.runner.report_endpoints,
                                    console=self.console_notices.report,
                                    ca_file=config.proxies_ca_file or config.ca_file,
                                    label=config.name,
                                    reconnect_initial=config.reconnect_initial,
                                    reconnect_max=min(30.0, config.reconnect_max))
        self._add("exposure", self.exposure)
        self._add("runner", self.runner)
        self._add("fetcher", self.fetcher)
        self.runner.add_observer(self.logs)
        self.runner.add_observer(self.exposure)
        self.runner.add_observer(self.console_notices)
        self.link = SupervisorLink(
            reactor, config.url, config.token, self.runner, ca_file=config.ca_file,
            reconnect_initial=config.reconnect_initial, reconnect_max=config.reconnect_max,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_timeout=config.heartbeat_timeout, name=config.name)
        self.link.setName("link")
        self.metrics = SupervisorMetrics(self)

    def _add(self, name: str, child: Any) -> None:
        child.setName(name)
        child.setServiceParent(self)

    def namespace(self) -> dict[str, Any]:
        """What the manhole shows an operator."""

        def status() -> dict[str, Any]:
            """The current job (id, state, stage), unacknowledged events, log shipping per job."""
            shipping = {**self.logs.shippers, **self.logs.closing}
            return {"job": self.runner.status(), "pending_events": len(self.runner.pending_events),
                    "logs": {job: shipper.status() for job, shipper in shipping.items()}}

        return {"supervisor": self, "runner": self.runner, "driver": self.driver,
                "link": self.link, "logs": self.logs, "fetcher": self.fetcher,
                "exposure": self.exposure, "metrics": self.metrics,
                "reactor": self.reactor, "status": status}

    async def _start(self) -> None:
        try:
            await self.runner.start()
            current = self.runner.current_job
            self.logs.resume(current["id"] if current is not None else None, self.runner.ended,
                             held=self.runner.held)
        except Exception:
            if not self.exit_on_failure:  # else RoleService logs it, and the process ends
                self.log.failure("{name}: start-up failed", name=self.config.name)
            raise
        if self._stopping:
            return
        self.link.setServiceParent(self)
        self.log.info("{name}: {driver} driver, connecting to {url}", name=self.config.name,
                      driver=self.driver.name, url=self.link.url)

    def connected(self) -> Deferred[SupervisorProtocol]:
        """Fires with the open WebSocket session (now, or when it opens)."""
        return self.link.when_open()

    async def _stop(self) -> None:
        self.runner.stop_accepting()
        if self._ready is not None:
            try:
                await self._ready
            except Exception:
                pass  # logged by _start
        if self.link.running and self.link.session is not None:
            flushed = await self.runner.flush(self.config.flush_timeout)
            if not flushed:
                self.log.warn("{name}: stopping with {count} unacknowledged job events; "
                              "they are journaled and will be sent after the restart",
                              name=self.config.name, count=len(self.runner.pending_events))
        Service.stopService(self)  # not running; then the children, one by one:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)  # the link closes with 4005 (going away)
            except Exception:
                self.log.failure("{name}: stopping {child} failed", name=self.config.name,
                                 child=child.name)

    def stopService(self) -> Deferred[None]:
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())
