"""A link's side of held hosts (``hold_on_failure``, docs/jobs.md).

A supervisor at protocol minor 6 may end a failed job ``held``: it keeps the host
as it is until the hold expires or a ``stop_job`` names the ended job. The database
records the hold (``store/holds.py``); :class:`HostHold`, one per supervisor link,
ends it: once its ``held_until`` has passed (expired, or released by ``tml job
cancel``) it sends that ``stop_job`` and, once acknowledged (the supervisor acks
after its teardown), frees the host. Reconciliation compares ``status.held`` with
the database: a hold the supervisor no longer names is over; one it names that the
database does not know (any more) is released; one whose end or timeout the supervisor
knows as earlier than the database's (minor 9: an extension it missed, or a hold that
began while the link was down) gets ``renew_tokens`` (``renewal.py``).

The hold ends on time: :class:`HostHold` arms a timer at the hold's ``held_until``
(:func:`plan`), moved when the hold is extended or released and cancelled when the link
goes; the links' sweep every ``touch_interval`` (``SupervisorLinks.end_holds``) is the
backstop. A supervisor below minor 9 cannot learn of an extension and ends the hold at its
first end, reporting nothing: from then on the timer asks for its ``status`` every
:data:`PROBE_INTERVAL` seconds (a reconciliation), and the first one that no longer names
the hold frees the host.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import TimeoutError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from treadmill.protocol import supervisor as protocol
from treadmill.switchboard.jobstate import Reason
from treadmill.switchboard.renewal import hold_outdated, renew_tokens

PROBE_INTERVAL = 0.5
"""Seconds between the ``status`` requests to a supervisor below minor 9 past the first end
of a hold extended beyond it (it tears the host down then, and says nothing)."""

PROBE_FOR = 60.0
"""Seconds past that first end the probes go on (the supervisor's teardown may take
``RELEASE_WAIT``); then the periodic reconciliation."""


def plan(row: dict[str, Any], minor: int) -> tuple[float, bool]:
    """When the hold ``row`` (:data:`~treadmill.switchboard.store.holds.HELD_JOB`, not due)
    of a supervisor of ``minor`` needs the link next: ``(delay, probe)``, seconds from now
    and whether to ask for a ``status`` then (a supervisor below minor 9 ending an
    extended hold at its first end) rather than to end the hold."""
    left, first = float(row["held_for"]), row.get("first_for")
    if (minor < protocol.HOLD_RENEW_MINOR and first is not None and first < left
            and first > -PROBE_FOR):
        return max(float(first), 0.0) + PROBE_INTERVAL, True
    return max(left, 0.0), False


class HostHold:
    """The hold on one link's host. ``link`` is its ``SupervisorSession``."""

    log = Logger()

    def __init__(self, link: Any):
        self.link = link
        self.job_id: str | None = None  # the ended job the host holds, if known
        self._releasing: set[str] = set()
        self._timer: IDelayedCall | None = None  # at the hold's end (plan)

    def started(self, job_id: str) -> None:
        """The job's held final event was stored: the timer is armed at its end."""
        self.job_id = job_id
        self.link.links.spawn(self.check())

    def cancel(self) -> None:
        """The link is gone (or the hold over): no timer."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def arm(self, row: dict[str, Any]) -> None:
        """(Re-)arm the timer for the hold ``row`` (not due), see :func:`plan`."""
        self.cancel()
        if self.link.lost:
            return
        delay, probe = plan(row, self.link.minor)
        self._timer = self.link.links.reactor.callLater(delay, self._due, probe)

    def _due(self, probe: bool) -> None:
        self._timer = None
        if self.link.lost or self.job_id is None:
            return
        links = self.link.links
        links.spawn(self.link.reconcile() if probe else self.check())

    def concerns(self, job_id: str) -> bool:
        """Whether a change of job ``job_id`` may end this host's hold."""
        return self.job_id == job_id

    async def check(self) -> None:
        """End the host's hold if its time has come."""
        if self.job_id is None or self.link.host_id is None:
            return
        row = await self.link.links.store.held_job(self.link.host_id)
        self.job_id = str(row["id"]) if row is not None else None
        if row is None:
            self.cancel()
        elif row["due"]:
            await self._release(str(row["id"]), bool(row["released"]))
        else:
            self.arm(row)  # not yet, or extended

    async def reconcile(self, answer: dict[str, Any], row: dict | None) -> None:
        """Bring the database's hold on the host in line with the supervisor's ``status``
        (``answer``); ``row`` is the host's
        :meth:`~treadmill.switchboard.store.holds.HoldQueries.held_job`, read with the rest
        of the link's state."""
        store = self.link.links.store
        reported = answer.get("held")
        known = str(row["id"]) if row is not None else None
        if known is not None and known != reported:
            await store.end_hold(known)  # the supervisor no longer keeps it
            self.log.info("{host}: the hold of job {job} is over", host=self.link.host_name,
                          job=known)
            known = None
        self.job_id = known
        if known is None:
            self.cancel()
        elif not row["due"]:  # type: ignore[index]
            self.arm(row)  # type: ignore[arg-type]
        if reported is not None and known is None:
            await self._release(reported, True)  # a hold nobody asks for any more
        elif row is not None and known is not None and row["due"]:
            await self._release(known, bool(row["released"]))
        elif known is not None and hold_outdated(row, answer):
            await renew_tokens(self.link, known)

    async def _release(self, job_id: str, released: bool) -> None:
        """``stop_job`` for the held job; once acknowledged, the host is free."""
        if job_id in self._releasing:
            return
        self._releasing.add(job_id)
        reason = Reason.USER_TERMINATED if released else Reason.EXECUTION_TIMEOUT
        try:
            self.log.info("{host}: ending the hold of job {job} ({reason})",
                          host=self.link.host_name, job=job_id, reason=reason.value)
            try:
                answer = await self.link.request(protocol.stop_job(0, job_id, reason.value))
            except (TimeoutError, ConnectionError):
                return  # the next check (or the next link's reconciliation) tries again
            if not answer["ok"]:
                self.log.warn("{host} refused to end the hold of {job}: {error}",
                              host=self.link.host_name, job=job_id, error=answer.get("error"))
                return
            await self.link.links.store.end_hold(job_id)
            if self.job_id == job_id:
                self.job_id = None
                self.cancel()
        finally:
            self._releasing.discard(job_id)
