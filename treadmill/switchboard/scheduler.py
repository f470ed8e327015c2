"""The scheduler service: assigns queued jobs to free hosts.

Woken by database notifications (a job queued or finished, a host changed)
and by a timer as a fallback; passes never overlap, and a wake-up during a
pass runs one more pass after it. The matching itself is
:mod:`treadmill.switchboard.scheduling`; the transaction is
:meth:`Store.schedule`, which only one switchboard instance runs at a time.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from treadmill.switchboard.jobstate import InvalidTransition, Reason, State, Status
from treadmill.switchboard.store import NotFound, Store


class Scheduler(MultiService):
    """Runs scheduling passes when woken, one at a time."""

    log = Logger()

    def __init__(self, reactor: Any, store: Store, *, interval: float = 2.0,
                 fresh_within: float = 15.0, unrunnable_grace: float = 30.0,
                 fairness_window: float = 3600.0):
        super().__init__()
        self.reactor = reactor
        self.store = store
        self.fresh_within = fresh_within
        self.unrunnable_grace = unrunnable_grace
        self.fairness_window = fairness_window
        self.passes = 0
        self.assigned = 0
        self._running: Deferred[None] | None = None
        self._again = False
        self._pending_call: Any = None
        timer = TimerService(interval, self.wake)
        timer.clock = reactor
        timer.setServiceParent(self)
        expiry = TimerService(max(interval, 5.0), lambda: Deferred.fromCoroutine(
            self.expire_unrunnable()))
        expiry.clock = reactor
        expiry.setServiceParent(self)

    def job_changed(self, payload: str) -> None:
        """``treadmill_jobs``: a queued job, or a host freed by a finished job."""
        state = payload.split(" ")[1] if " " in payload else ""
        if state in ("queued", "terminated"):
            self.wake()

    def host_changed(self, payload: str) -> None:
        self.wake()

    def wake(self, _: object = None) -> None:
        """Ask for a pass soon (coalescing wake-ups that arrive together)."""
        if not self.running:
            return
        if self._running is not None:
            self._again = True
            return
        if self._pending_call is None or not self._pending_call.active():
            self._pending_call = self.reactor.callLater(0, self._start_pass)

    def _start_pass(self) -> None:
        self._pending_call = None
        self._running = Deferred.fromCoroutine(self._pass())

        def done(_: object) -> None:
            self._running = None
            if self._again:
                self._again = False
                self.wake()

        self._running.addBoth(done)

    async def _pass(self) -> None:
        try:
            pairs = await self.store.schedule(self.fresh_within, self.fairness_window)
        except Exception:
            self.log.failure("Scheduling pass failed")
            return
        self.passes += 1
        self.assigned += len(pairs)
        if pairs:
            self._again = True  # More may fit: hosts freed or jobs queued meanwhile.
            self.log.debug("Assigned {count} jobs", count=len(pairs))

    async def expire_unrunnable(self) -> None:
        """End queued jobs that no host could ever run."""
        try:
            jobs = await self.store.unrunnable_jobs(self.unrunnable_grace)
        except Exception:
            self.log.failure("Looking for unrunnable jobs failed")
            return
        for job_id in jobs:
            try:
                await self.store.transition(
                    job_id, Status(State.TERMINATED, reason=Reason.QUEUE_TIMEOUT),
                    message="no host can run this job: none has all its tags and lets its "
                            "owner start jobs")
            except (InvalidTransition, NotFound):
                pass

    def stopService(self) -> Deferred[None]:
        if self._pending_call is not None and self._pending_call.active():
            self._pending_call.cancel()
        d = super().stopService()
        running = self._running
        if running is not None:
            d.addCallback(lambda _: running)
        return d
