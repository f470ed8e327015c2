"""Each job's services, published on the job's rendezvous proxies.

The switchboard names a job's proxies, each with a publish token, in
``start_job`` (``proxies``, protocol minor 2). When the host driver reports
the job's services (``IJobReporter.services``), :class:`JobExposure` makes an
:class:`~treadmill.supervisor.exposure.ExposureManager` for the job (or gives
the one it has the new set), and hands every change of the public endpoints
to the runner, which reports them to the switchboard (``job_endpoints``).
The job's end closes its tunnels at once (a held job's, when its hold ends:
``ssh`` and consoles work while it is held); a supervisor shutting down leaves
them to the proxies' grace period, and a restarted supervisor that re-adopts
the job publishes again on the same tunnels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from treadmill.supervisor.exposure import ExposureManager
from treadmill.supervisor.observers import JobObserver


class JobExposure(JobObserver, Service):
    """Proxy publishing for the jobs of one supervisor (an ``IJobObserver`` of its runner)."""

    log = Logger()

    def __init__(self, reactor: Any, report: Callable[[str, list[dict[str, Any]]], None], *,
                 console: Callable[[str, dict[str, Any]], None] | None = None,
                 ca_file: str | None = None, label: str = "supervisor",
                 reconnect_initial: float = 1.0, reconnect_max: float = 30.0):
        self.reactor = reactor
        self.report = report
        self.console_report = console
        """``console_report(job_id, notice)``: a proxy reported a console client opened or
        closed (not :meth:`console`, the observer's console output)."""
        self.ca_file = ca_file
        self.label = label
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.proxies: dict[str, list[dict[str, str]]] = {}
        self.managers: dict[str, ExposureManager] = {}
        self._closing: set[Deferred[Any]] = set()

    def job_started(self, job: dict[str, Any]) -> None:
        """A job was accepted or re-adopted: remember its proxies (fresh tokens too)."""
        proxies = job.get("proxies")
        if not proxies:
            return
        self.proxies[job["id"]] = list(proxies)
        manager = self.managers.get(job["id"])
        if manager is not None:
            for proxy in proxies:
                manager.set_token(proxy["url"], proxy["token"])

    def tokens_renewed(self, job: dict[str, Any]) -> None:
        """The job (or its hold) was extended: new control and pooled connections use the
        fresh tokens."""
        self.job_started(job)

    def services(self, job_id: str, services: dict[str, tuple[str, int]]) -> None:
        """The job's host offers ``services`` now."""
        proxies = self.proxies.get(job_id)
        if not proxies:
            if services:
                self.log.info("{name}: job {job} offers {services} but names no proxy",
                              name=self.label, job=job_id, services=", ".join(sorted(services)))
            return
        manager = self.managers.get(job_id)
        if manager is None:
            if not services:
                return
            try:
                manager = ExposureManager(
                    self.reactor, job_id, proxies, services, ca_file=self.ca_file,
                    reconnect_initial=self.reconnect_initial,
                    reconnect_max=self.reconnect_max, name=f"{self.label}: job {job_id}")
            except ValueError as e:
                self.log.error("{name}: cannot publish the services of job {job}: {error}",
                               name=self.label, job=job_id, error=str(e))
                return
            self.managers[job_id] = manager
            manager.on_change(lambda endpoints: self.report(job_id, endpoints))
            if self.console_report is not None:
                report = self.console_report
                manager.on_console(lambda notice: report(job_id, notice))
            manager.start()
        else:
            manager.set_services(services)

    def event(self, event: dict[str, Any]) -> None:
        """A job event: the job's end closes its tunnels, unless its host is held."""
        if event.get("state") == "terminated" and not event.get("held"):
            self._close(event["job_id"], final=True)

    def hold_ended(self, job_id: str) -> None:
        self._close(job_id, final=True)

    def _close(self, job_id: str, final: bool) -> Deferred[Any] | None:
        self.proxies.pop(job_id, None)
        manager = self.managers.pop(job_id, None)
        if manager is None:
            return None
        closing = Deferred.fromCoroutine(manager.close(final=final))
        self._closing.add(closing)

        def done(result: Any) -> None:
            self._closing.discard(closing)
            if hasattr(result, "check"):
                self.log.failure("{name}: closing the tunnels of job {job} failed", result,
                                 name=self.label, job=job_id)

        closing.addBoth(done)
        return closing

    async def stop(self) -> None:
        """Supervisor shutdown: the job lives on, its tunnels wait for the next start."""
        for job_id in list(self.managers):
            self._close(job_id, final=False)
        await DeferredList(list(self._closing), consumeErrors=True)

    def stopService(self) -> Deferred[None]:
        """As a child of the supervisor's service: :meth:`stop`."""
        super().stopService()
        return Deferred.fromCoroutine(self.stop())
