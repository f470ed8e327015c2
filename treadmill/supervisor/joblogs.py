"""Each job's console output and events, shipped to the job's log servers.

The switchboard names a job's log servers, with a write token, in
``start_job`` (``log_servers``, protocol minor 1). :class:`JobLogs` keeps one
:class:`~treadmill.supervisor.logship.LogShipper` per job, made when the job
first produces output: the host's console goes to the ``console`` stream,
each job event (one JSON line) to ``events``, its test results to ``results``.
When the job ends its streams are closed on every server, in the background; a
supervisor restarted before that resumes shipping from its spool.

A failed job whose host is held (``hold.py``) keeps its streams open until the hold
ends: the held host's console goes on into ``console`` (between two marker lines,
``protocol/logs.py``), and ``events`` gets a line
when the hold starts, resumes after a supervisor restart, is extended and ends
(``{"job_id", "hold": "started"|"resumed"|"extended"|"ended", "at",
"until"|"reason", "message"}``); then the
streams are closed. A restart that re-adopts the held host (:meth:`resume` with
``held``) goes on shipping; one that cannot ends the hold, and the job's ``events``
stream, whose last line still says the hold goes on, gets its ``ended`` line
(``supervisor_restarted``) before its streams are closed.

One shipper per job, always: a job's shipper lives from its first output (or
the restart that finds its spool) until its streams are closed everywhere and
its spool is gone, whether the job still runs (:attr:`shippers`) or is over
(:attr:`closing`). A restart that reports the interrupted job as dropped (the
runner starts first) makes that job's shipper from the spool, and
:meth:`resume` then leaves the job alone; :meth:`stop` stops every shipper,
closing ones too, so none outlives its supervisor. A job's streams are closed
only once its final event line is spooled, and :meth:`resume` adds that line
if a crash lost it (the runner journaled the event, the spool missed it).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from treadmill.protocol.logs import (
    hold_end_marker,
    hold_extended_marker,
    hold_marker,
    hold_resumed_marker,
)
from treadmill.protocol.results import STREAM as RESULTS
from treadmill.supervisor.hold import hold_change
from treadmill.supervisor.logship import EVENTS, LogShipper
from treadmill.supervisor.observers import JobObserver


def _line(event: dict[str, Any]) -> bytes:
    """A job event as a line of the ``events`` stream."""
    text = json.dumps({key: value for key, value in event.items() if key != "request_id"},
                      separators=(",", ":"), sort_keys=True)
    return text.encode("utf-8") + b"\n"


def _kind(line: bytes) -> str | None:
    """What an ``events`` line says of the job's end: ``ended`` (its final event, or its
    hold's end), ``held`` (the job ended held, or its hold started or resumed), or None."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    if event.get("state") == "terminated":
        return "held" if event.get("held") else "ended"
    if event.get("hold") in ("started", "resumed", "extended"):
        return "held"
    return "ended" if event.get("hold") == "ended" else None


class JobLogs(JobObserver, Service):
    """Log shipping for the jobs of one supervisor (an ``IJobObserver`` of its runner)."""

    log = Logger()

    def __init__(self, reactor: Any, state_dir: str, *, spool_limit: int = 64 * 1024 * 1024,
                 durable: bool = True, ca_file: str | None = None, label: str = "supervisor"):
        self.reactor = reactor
        self.state_dir = state_dir
        self.spool_limit = spool_limit
        self.durable = durable
        self.ca_file = ca_file
        self.label = label
        self.servers: dict[str, list[dict[str, str]]] = {}
        self.shippers: dict[str, LogShipper] = {}  # jobs that still produce output
        self.held: set[str] = set()  # of those, ended jobs whose host is held
        self.closing: dict[str, LogShipper] = {}  # ended jobs: shipping the rest, then closing
        self._closing: set[Deferred[Any]] = set()
        self._stopped = False

    def _options(self) -> dict[str, Any]:
        return {"spool_limit": self.spool_limit, "durable": self.durable,
                "ca_file": self.ca_file, "on_spool_full": self._spool_full}

    def _spool_full(self, shipper: LogShipper, stream: str, nbytes: int) -> None:
        self.log.error("{name}: the log spool of job {job} is full; {count} bytes of {stream} "
                       "were refused (a log server is unreachable or slow)", name=self.label,
                       job=shipper.job_id, count=nbytes, stream=stream)

    def resume(self, current_job: str | None,
               ended: list[dict[str, Any]] | None = None, held: str | None = None) -> None:
        """After a restart: ship what the spool still holds, finishing ended jobs.

        ``ended`` holds the final events of the jobs that ended here (the runner's):
        an ended job whose ``events`` stream lacks its final line (a crash after
        the runner journaled the event, before the line was spooled) gets it, and
        one whose stream says its host is held gets the hold's end. ``held`` is the
        ended job whose held host the runner re-adopted: its streams stay open.
        """
        finals = {e.get("job_id"): e for e in ended or ()}
        for job_id in LogShipper.unfinished(self.state_dir):
            if job_id in self.shippers or job_id in self.closing:
                if job_id == held:
                    self.held.add(job_id)
                continue  # made already, from the spool (the runner reported it dropped)
            shipper = LogShipper.resume(self.reactor, self.state_dir, job_id,
                                        **self._options())
            if shipper is None:
                continue
            self.shippers[job_id] = shipper
            if job_id == held:
                self.held.add(job_id)
            elif job_id != current_job:
                self._finish(job_id, finals.get(job_id), resumed=True)

    def job_started(self, job: dict[str, Any]) -> None:
        """A job was accepted: remember where its logs go (fresh tokens too)."""
        servers = job.get("log_servers")
        if not servers:
            return
        self.servers[job["id"]] = servers
        shipper = self.shippers.get(job["id"])
        if shipper is not None:
            shipper.set_servers(servers)

    def tokens_renewed(self, job: dict[str, Any]) -> None:
        """The job (or its hold) was extended: its shipper uses the fresh tokens from now
        on."""
        self.job_started(job)

    def _shipper(self, job_id: str) -> LogShipper | None:
        shipper = self.shippers.get(job_id)
        if shipper is None and job_id in self.servers and job_id not in self.closing:
            # Continues the spool a restart left, if any (the LogShipper reads it).
            shipper = LogShipper(self.reactor, self.state_dir, job_id, self.servers[job_id],
                                 **self._options())
            self.shippers[job_id] = shipper
        return shipper

    def console(self, job_id: str, data: bytes) -> None:
        shipper = self._shipper(job_id)
        if shipper is not None:
            shipper.append("console", data)

    def results(self, job_id: str, line: bytes) -> None:
        """A line of the job's ``results`` stream (docs/results.md)."""
        shipper = self._shipper(job_id)
        if shipper is not None:
            shipper.append(RESULTS, line)

    def event(self, event: dict[str, Any]) -> None:
        """A job event was queued for the switchboard: log it, and finish on the end."""
        job_id = event["job_id"]
        shipper = self._shipper(job_id)
        if shipper is None:
            return
        shipper.append(EVENTS, _line(event))
        if event.get("state") == "terminated":
            if event.get("held"):
                self.held.add(job_id)  # its streams stay open until the hold ends
            else:
                self._finish(job_id)

    def hold_changed(self, change: dict[str, Any]) -> None:
        """A held job's hold started, resumed, was extended or ended: its ``events`` line;
        the end closes the job's streams."""
        job_id = change["job_id"]
        shipper = self._shipper(job_id)
        if shipper is None:
            return
        if change.get("hold") == "started":
            shipper.append("console", hold_marker(change["until"]))
        elif change.get("hold") == "resumed":
            shipper.append("console", hold_resumed_marker())
        elif change.get("hold") == "extended":
            shipper.append("console", hold_extended_marker(change["until"]))
        elif change.get("hold") == "ended":
            shipper.append("console", hold_end_marker(change["message"]))
        shipper.append(EVENTS, _line(change))
        if change.get("hold") == "ended":
            self._finish(job_id)
        else:
            self.held.add(job_id)

    def _finish(self, job_id: str, final: dict[str, Any] | None = None,
                resumed: bool = False) -> None:
        shipper = self.shippers.pop(job_id, None)
        self.servers.pop(job_id, None)
        self.held.discard(job_id)
        if shipper is None:
            return
        self.closing[job_id] = shipper
        closing = Deferred.fromCoroutine(self._close(job_id, shipper, final, resumed))
        self._closing.add(closing)

        def failed(failure: Any) -> None:
            self.log.failure("{name}: closing the logs of job {job} failed", failure,
                             name=self.label, job=job_id)

        closing.addErrback(failed).addBoth(lambda _: self._closing.discard(closing))

    async def _close(self, job_id: str, shipper: LogShipper,
                     final: dict[str, Any] | None, resumed: bool = False) -> None:
        """Close a job's streams (its final event line spooled first, and after a
        restart its hold's end); forget its shipper once it finished."""
        if (final is not None or resumed) and not shipper.closing:
            last = await shipper.last_line(EVENTS)
            if self._stopped:
                return  # the next start looks again
            kind = _kind(last) if last is not None else "ended"
            if kind is None and final is not None:
                self.log.warn("{name}: the events log of job {job} lacks its final line; "
                              "adding it", name=self.label, job=job_id)
                shipper.append(EVENTS, _line(final))
            elif kind == "held":  # the hold ended with the supervisor's restart
                change = hold_change(job_id, "ended", self.reactor.seconds(),
                                     reason="supervisor_restarted")
                shipper.append("console", hold_end_marker(change["message"]))
                shipper.append(EVENTS, _line(change))
        # Closing is recorded in the spool's cursors: only once the last line is in it.
        await shipper.flushed()
        if self._stopped:
            return
        warned = False
        while not await shipper.close(timeout=30.0):
            if self._stopped:
                return  # the next start resumes it
            if not warned:
                self.log.warn("{name}: logs of job {job} are still being shipped",
                              name=self.label, job=job_id)
                warned = True
        if self.closing.get(job_id) is shipper:
            del self.closing[job_id]

    async def stop(self) -> None:
        """Supervisor shutdown: keep spools and cursors for the next start (closing
        shippers stop too: the next start resumes them)."""
        self._stopped = True
        for shipper in [*self.shippers.values(), *self.closing.values()]:
            await shipper.stop()
        self.shippers.clear()
        self.closing.clear()
        self.held.clear()

    def stopService(self) -> Deferred[None]:
        """As a child of the supervisor's service: :meth:`stop`."""
        super().stopService()
        return Deferred.fromCoroutine(self.stop())
