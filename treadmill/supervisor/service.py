"""The supervisor's service tree.

    supervisor (SupervisorService)
    ├── link       SupervisorLink: the WebSocket to the switchboard (after start-up)
    │              (and, beside the tree, ``fetcher``: the ImageFetcher drivers use)
    ├── manhole    optional SSH manhole
    └── metrics    optional Prometheus listeners (``SupervisorMetrics``' registry)

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

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from treadmill.common.daemon import exit_failed
from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.drivers import IHostDriver, make_driver
from treadmill.supervisor.jobexposure import JobExposure
from treadmill.supervisor.joblogs import JobLogs
from treadmill.supervisor.journal import StateFiles
from treadmill.supervisor.link import SupervisorLink, SupervisorProtocol
from treadmill.supervisor.metrics import SupervisorMetrics
from treadmill.supervisor.runner import JobRunner

__all__ = ["SupervisorService"]


class SupervisorService(MultiService):
    """The root service of a supervisor (or one of a fleet's)."""

    log = Logger()

    def __init__(self, reactor: Any, config: SupervisorConfig, *,
                 driver: IHostDriver | None = None, run_io: Any = None,
                 exit_on_failure: bool = False):
        super().__init__()
        self.exit_on_failure = exit_on_failure
        self.setName("supervisor")
        self.reactor = reactor
        self.config = config
        self.fetcher = config.image_fetcher(reactor)
        self.driver = (driver if driver is not None
                       else make_driver(config.driver, config.driver_values, reactor=reactor,
                                        state_dir=config.state_dir, fetcher=self.fetcher))
        self.files = StateFiles(config.state_dir, durable=config.durable)
        self.runner = JobRunner(reactor, self.driver, self.files, run_io=run_io,
                                console_buffer=config.console_buffer, name=config.name,
                                ack_timeout=config.event_ack_timeout,
                                resend_max=config.event_resend_max)
        self.logs = JobLogs(reactor, config.state_dir, spool_limit=config.log_spool_limit,
                            durable=config.durable, ca_file=config.ca_file, name=config.name)
        self.runner.start_observers.append(self.logs.job_started)
        self.runner.console_observers.append(self.logs.console)
        self.runner.results_observers.append(self.logs.results)
        self.runner.observers.append(self.logs.event)
        self.exposure = JobExposure(reactor, self.runner.report_endpoints,
                                    ca_file=config.proxies_ca_file or config.ca_file,
                                    name=config.name,
                                    reconnect_initial=config.reconnect_initial,
                                    reconnect_max=min(30.0, config.reconnect_max))
        self.runner.start_observers.append(self.exposure.job_started)
        self.runner.service_observers.append(self.exposure.services)
        self.runner.observers.append(self.exposure.event)
        self.link = SupervisorLink(
            reactor, config.url, config.token, self.runner, ca_file=config.ca_file,
            reconnect_initial=config.reconnect_initial, reconnect_max=config.reconnect_max,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_timeout=config.heartbeat_timeout, name=config.name)
        self.link.setName("link")
        self.metrics = SupervisorMetrics(self)
        self._ready: Deferred[None] | None = None
        self._start_error: Failure | None = None
        self._stopping = False

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

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._start_error = None
        self._ready = Deferred.fromCoroutine(self._start())
        self._ready.addErrback(self._start_failed)

    async def _start(self) -> None:
        await self.runner.start()
        current = self.runner.current_job
        self.logs.resume(current["id"] if current is not None else None, self.runner.ended)
        if self._stopping:
            return
        self.link.setServiceParent(self)
        self.log.info("{name}: {driver} driver, connecting to {url}", name=self.config.name,
                      driver=self.driver.name, url=self.link.url)

    def _start_failed(self, failure: Failure) -> None:
        self._start_error = failure
        self.log.failure("{name}: start-up failed", failure, name=self.config.name)
        if self.exit_on_failure and not self._stopping:
            # A supervisor that cannot use its state directory must not run.
            exit_failed(self.reactor)

    def ready(self) -> Deferred[None]:
        """Fires when the state directory is read and the link is started (or fails
        with the start-up error, e.g. a state directory in use)."""
        if self._ready is None:
            return succeed(None)
        result: Deferred[None] = Deferred()

        def relay(_: Any) -> None:
            if self._start_error is not None:
                result.errback(self._start_error)
            else:
                result.callback(None)

        self._ready.addCallback(relay)
        return result

    def connected(self) -> Deferred[SupervisorProtocol]:
        """Fires with the open WebSocket session (now, or when it opens)."""
        return self.link.when_open()

    async def _stop(self) -> None:
        self.runner.stop_accepting()
        if self._ready is not None:
            await self._ready  # start-up errors were consumed (and logged) there
        if self.link.running and self.link.session is not None:
            flushed = await self.runner.flush(self.config.flush_timeout)
            if not flushed:
                self.log.warn("{name}: stopping with {count} unacknowledged job events; "
                              "they are journaled and will be sent after the restart",
                              name=self.config.name, count=len(self.runner.pending_events))
        await super().stopService()  # the link closes with 4005 (going away)
        await self.fetcher.close()  # keep cache leases: a running job is adopted later
        await self.runner.close()
        await self.exposure.stop()
        await self.logs.stop()

    def stopService(self) -> Deferred[None]:
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())
