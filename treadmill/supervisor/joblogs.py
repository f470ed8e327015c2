"""Each job's console output and events, shipped to the job's log servers.

The switchboard names a job's log servers, with a write token, in
``start_job`` (``log_servers``, protocol minor 1). :class:`JobLogs` keeps one
:class:`~treadmill.supervisor.logship.LogShipper` per job, made when the job
first produces output: the host's console goes to the ``console`` stream,
each job event (one JSON line) to ``events``. When the job ends its streams
are closed on every server, in the background; a supervisor restarted before
that resumes shipping from its spool.

One shipper per job, always: a job's shipper lives from its first output (or
the restart that finds its spool) until its streams are closed everywhere and
its spool is gone, whether the job still runs (:attr:`shippers`) or is over
(:attr:`closing`). A restart that reports the interrupted job as dropped (the
runner starts first) makes that job's shipper from the spool, and
:meth:`resume` then leaves the job alone; :meth:`stop` stops every shipper,
closing ones too, so none outlives its supervisor.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from treadmill.supervisor.logship import LogShipper


class JobLogs:
    """Log shipping for the jobs of one supervisor."""

    log = Logger()

    def __init__(self, reactor: Any, state_dir: str, *, spool_limit: int = 64 * 1024 * 1024,
                 durable: bool = True, ca_file: str | None = None, name: str = "supervisor"):
        self.reactor = reactor
        self.state_dir = state_dir
        self.spool_limit = spool_limit
        self.durable = durable
        self.ca_file = ca_file
        self.name = name
        self.servers: dict[str, list[dict[str, str]]] = {}
        self.shippers: dict[str, LogShipper] = {}  # jobs that still produce output
        self.closing: dict[str, LogShipper] = {}  # ended jobs: shipping the rest, then closing
        self._closing: set[Deferred[Any]] = set()
        self._stopped = False

    def _options(self) -> dict[str, Any]:
        return {"spool_limit": self.spool_limit, "durable": self.durable,
                "ca_file": self.ca_file, "on_spool_full": self._spool_full}

    def _spool_full(self, shipper: LogShipper, stream: str, nbytes: int) -> None:
        self.log.error("{name}: the log spool of job {job} is full; {count} bytes of {stream} "
                       "were refused (a log server is unreachable or slow)", name=self.name,
                       job=shipper.job_id, count=nbytes, stream=stream)

    def resume(self, current_job: str | None) -> None:
        """After a restart: ship what the spool still holds, finishing ended jobs."""
        for job_id in LogShipper.unfinished(self.state_dir):
            if job_id in self.shippers or job_id in self.closing:
                continue  # made already, from the spool (the runner reported it dropped)
            shipper = LogShipper.resume(self.reactor, self.state_dir, job_id,
                                        **self._options())
            if shipper is None:
                continue
            self.shippers[job_id] = shipper
            if job_id != current_job:
                self._finish(job_id)

    def job_started(self, job: dict[str, Any]) -> None:
        """A job was accepted: remember where its logs go (fresh tokens too)."""
        servers = job.get("log_servers")
        if not servers:
            return
        self.servers[job["id"]] = servers
        shipper = self.shippers.get(job["id"])
        if shipper is not None:
            shipper.set_servers(servers)

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

    def event(self, event: dict[str, Any]) -> None:
        """A job event was queued for the switchboard: log it, and finish on the end."""
        job_id = event["job_id"]
        shipper = self._shipper(job_id)
        if shipper is None:
            return
        line = json.dumps({key: value for key, value in event.items() if key != "request_id"},
                          separators=(",", ":"), sort_keys=True)
        shipper.append("events", line.encode("utf-8") + b"\n")
        if event.get("state") == "terminated":
            self._finish(job_id)

    def _finish(self, job_id: str) -> None:
        shipper = self.shippers.pop(job_id, None)
        self.servers.pop(job_id, None)
        if shipper is None:
            return
        self.closing[job_id] = shipper
        closing = Deferred.fromCoroutine(self._close(job_id, shipper))
        self._closing.add(closing)

        def failed(failure: Any) -> None:
            self.log.failure("{name}: closing the logs of job {job} failed", failure,
                             name=self.name, job=job_id)

        closing.addErrback(failed).addBoth(lambda _: self._closing.discard(closing))

    async def _close(self, job_id: str, shipper: LogShipper) -> None:
        """Close a job's streams; forget its shipper once it finished."""
        warned = False
        while not await shipper.close(timeout=30.0):
            if self._stopped:
                return  # the next start resumes it
            if not warned:
                self.log.warn("{name}: logs of job {job} are still being shipped",
                              name=self.name, job=job_id)
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
