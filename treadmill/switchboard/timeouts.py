"""Enforcement of queue and execution timeouts."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from treadmill.switchboard.jobstate import InvalidTransition
from treadmill.switchboard.store import NotFound, Store


class TimeoutEnforcer(TimerService):
    """Ends queued jobs past their queue deadline, stops running jobs past theirs.

    A queued job terminates at once (``queue_timeout``); a job that holds a
    host moves to ``terminating`` (``execution_timeout``) and its supervisor
    is told to stop it.
    """

    log = Logger()

    def __init__(self, store: Store, clock: Any, interval: float = 1.0):
        super().__init__(interval, lambda: Deferred.fromCoroutine(self.check()))
        self.clock = clock
        self.store = store

    async def check(self) -> int:
        """End every expired job; return how many changed."""
        changed = 0
        try:
            expired = await self.store.expired_jobs()
        except Exception:
            self.log.failure("Could not look for expired jobs")
            return 0
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
