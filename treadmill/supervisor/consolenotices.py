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
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.logger import Logger

from treadmill.common.ratelimit import RateLimiter
from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.outbox import EventOutbox

__all__ = ["ConsoleNotices"]


class ConsoleNotices:
    """Puts proxies' console notices into the outbox (see the module docstring)."""

    log = Logger()

    def __init__(self, reactor: Any, outbox: EventOutbox, *, rate: float = 0.5,
                 burst: int = 30, label: str = "supervisor"):
        self.outbox = outbox
        self.label = label
        self._limiter = RateLimiter(reactor, rate, burst, size=1024)
        self._suppressed: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()  # forwarded, suppressed, invalid

    def report(self, job_id: str, notice: dict[str, Any]) -> None:
        """A proxy's ``console`` notice (its ``proxy`` URL added) for job ``job_id``."""
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
        key = f"{job_id} {fields['user']}"  # one user's flood does not hide another's
        if self._limiter.wait(key) > 0:
            self.counts["suppressed"] += 1
            if not self._suppressed[key]:
                self.log.warn("{name}: console notices of {user} for job {job} over the rate "
                              "bound; counting the next ones", name=self.label,
                              user=fields["user"], job=job_id)
            self._suppressed[key] += 1
            return
        self._limiter.take(key)
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        self.counts["forwarded"] += 1
        self.outbox.add({"job_id": job_id, "console": {k: v for k, v in fields.items()
                                                       if v is not None}})
