"""Console connections, forwarded to the switchboard's audit log.

A proxy reports each console client of a job's tunnel that opened (its
console token verified) or closed (the proxy's ``console`` message, control
minor 1; ``exposure.ExposureManager.on_console``). :class:`ConsoleNotices`
turns each into a ``console_event`` (supervisor protocol minor 7) in the
runner's outbox: journaled, sent in order with the job events and resent
until the switchboard acknowledges it, so a notice survives a reconnect or a
restart. A token bucket per job and user bounds them (``burst``, then ``rate``
per second): the notices over it are dropped, counted, and the count travels
as ``suppressed`` on that user's next notice for the job, so a flood of
connections costs the switchboard's database a bounded number of rows, still
leaves a trace, and does not hide another user's connections.

A console still open when its job's tunnels close at the job's end (or its
hold's) gets no ``closed`` from the proxy: the control connection that would
carry it is closed first. As an observer of the runner, :class:`ConsoleNotices`
remembers the consoles that opened and did not close, and reports them
``closed`` itself when the job ends (``at``: the end), once per connection.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from twisted.logger import Logger

from treadmill.common.ratelimit import RateLimiter
from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.observers import JobObserver
from treadmill.supervisor.outbox import EventOutbox

__all__ = ["ConsoleNotices"]


OPEN_LIMIT = 4096
"""Open consoles remembered (for their ``closed`` at the job's end), all jobs together."""


class ConsoleNotices(JobObserver):
    """Puts proxies' console notices into the outbox (see the module docstring); an
    ``IJobObserver`` of the runner for the jobs' ends."""

    log = Logger()

    def __init__(self, reactor: Any, outbox: EventOutbox, *, rate: float = 0.5,
                 burst: int = 30, label: str = "supervisor"):
        self.reactor = reactor
        self.outbox = outbox
        self.label = label
        self._open: dict[str, dict[str, dict[str, Any]]] = {}  # job -> conn_id -> notice
        self._closed: deque[str] = deque(maxlen=OPEN_LIMIT)  # conn_ids closed here
        self._limiter = RateLimiter(reactor, rate, burst, size=1024)
        self._suppressed: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()  # forwarded, suppressed, invalid

    def report(self, job_id: str, notice: dict[str, Any], *, bounded: bool = True) -> None:
        """A proxy's ``console`` notice (its ``proxy`` URL added) for job ``job_id``.
        The ``closed`` of a console whose ``opened`` got through is not bounded again
        (the ``opened`` spent the token); ``bounded=False`` forwards any."""
        fields = {"event": notice.get("event"), "conn_id": notice.get("conn_id"),
                  "service": notice.get("service"), "proxy": notice.get("proxy"),
                  "user": notice.get("subject"), "jti": notice.get("jti"),
                  "access": notice.get("access"), "peer": notice.get("peer"),
                  "at": notice.get("at")}
        if isinstance(fields["proxy"], str):
            fields["proxy"] = fields["proxy"][:1024]
        try:
            protocol.validate(protocol.console_event(0, job_id, **fields))
        except protocol.ProtocolError as e:
            self.counts["invalid"] += 1
            self.log.warn("{name}: a console notice for job {job} is not forwarded: {error}",
                          name=self.label, job=job_id, error=str(e))
            return
        if fields["event"] == "closed":
            known = self._forget(job_id, fields["conn_id"])
            if not known and fields["conn_id"] in self._closed:
                return  # reported closed at its job's end already
            bounded = bounded and not known  # its opened spent the token
        key = f"{job_id} {fields['user']}"  # one user's flood does not hide another's
        if bounded and self._limiter.wait(key) > 0:
            self.counts["suppressed"] += 1
            if not self._suppressed[key]:
                self.log.warn("{name}: console notices of {user} for job {job} over the rate "
                              "bound; counting the next ones", name=self.label,
                              user=fields["user"], job=job_id)
            self._suppressed[key] += 1
            return
        if bounded:
            self._limiter.take(key)
        if fields["event"] == "opened":
            self._remember(job_id, notice)
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        self.counts["forwarded"] += 1
        self.outbox.add({"job_id": job_id, "console": {k: v for k, v in fields.items()
                                                       if v is not None}})

    def _forget(self, job_id: str, conn_id: str) -> bool:
        """Forget an open console that closes; whether it was known open."""
        consoles = self._open.get(job_id, {})
        known = consoles.pop(conn_id, None) is not None
        if not consoles:
            self._open.pop(job_id, None)
        return known

    def _remember(self, job_id: str, notice: dict[str, Any]) -> None:
        if sum(len(v) for v in self._open.values()) < OPEN_LIMIT:
            self._open.setdefault(job_id, {})[notice["conn_id"]] = dict(notice)

    def _ended(self, job_id: str) -> None:
        """The job's tunnels close now: its consoles still open close with it."""
        consoles = self._open.pop(job_id, {})
        now = self.reactor.seconds()
        for conn_id, opened in consoles.items():
            self.report(job_id, {**opened, "event": "closed", "at": now}, bounded=False)
            self._closed.append(conn_id)

    # -- IJobObserver ----------------------------------------------------------------

    def event(self, event: dict[str, Any]) -> None:
        if event.get("state") == "terminated" and not event.get("held"):
            self._ended(event["job_id"])

    def hold_ended(self, job_id: str) -> None:
        self._ended(job_id)
