"""Enforcement of queue and execution timeouts."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from treadmill.switchboard.database import unavailable
from treadmill.switchboard.jobstate import InvalidTransition, Reason
from treadmill.switchboard.store import Store
from treadmill.switchboard.store.errors import NotFound

AFTER_OUTAGE = 10.0
"""Seconds after the database's return before execution timeouts are enforced again:
supervisors resend the events they could not report meanwhile (a job that exited in
time must end ``workload_exited``, not ``execution_timeout``)."""


class TimeoutEnforcer(TimerService):
    """Ends queued jobs past their queue deadline, stops running jobs past theirs.

    A queued job terminates at once (``queue_timeout``); a job that holds a
    host moves to ``terminating`` (``execution_timeout``) and its supervisor
    is told to stop it. After a database outage execution timeouts wait
    ``after_outage`` seconds (:data:`AFTER_OUTAGE`).
    """

    log = Logger()

    def __init__(self, store: Store, clock: Any, interval: float = 1.0):
        super().__init__(interval, lambda: Deferred.fromCoroutine(self.check()))
        self.clock = clock
        self.store = store
        self.after_outage = AFTER_OUTAGE
        self._failing = False
        self._back_at: float | None = None  # when the database answered after failing

    async def check(self) -> int:
        """End every expired job; return how many changed."""
        changed = 0
        try:
            expired = await self.store.expired_jobs()
        except Exception as e:
            if not unavailable(e):
                self.log.failure("Could not look for expired jobs")
                return 0
            self.log.warn("Could not look for expired jobs: the database is unavailable")
            self._failing = True
            return 0
        now = self.clock.seconds()
        if self._failing:
            self._failing, self._back_at = False, now
        if self._back_at is not None and now - self._back_at < self.after_outage:
            expired = [(job, reason) for job, reason in expired
                       if reason is not Reason.EXECUTION_TIMEOUT]
        for job_id, reason in expired:
            try:
                if await self.store.request_termination(job_id, reason):
                    changed += 1
                    self.log.info("Job {job} ended: {reason}", job=job_id, reason=reason.value)
            except (InvalidTransition, NotFound):
                pass  # It moved on since we looked.
            except Exception:
                self.log.failure("Could not expire job {job}", job=job_id)
        return changed
