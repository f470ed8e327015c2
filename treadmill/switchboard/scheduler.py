"""The scheduler service: assigns queued jobs to free hosts.

Woken by database notifications that can make a job runnable (a job queued,
a host freed by a finished job, a host connected or changed) and by a timer as
a fallback; wake-ups that arrive together make one pass, passes never overlap,
and a wake-up during a pass runs one more pass after it. A freed or changed
host makes no pass while the queue is known to be empty (the last pass left no
job queued and no job was queued since). The matching itself is
:mod:`treadmill.switchboard.scheduling`; the transaction is
:meth:`Store.schedule`.

With several instances, only the leader (``is_leader``: the oldest live
instance, :mod:`treadmill.switchboard.instances`) runs passes; the others
ignore wake-ups, so an enqueue costs one scheduling transaction whatever the
number of instances. The pass still tries the scheduling lock: if another
instance holds it (a leader that froze half-way, until PostgreSQL ends its
session), it tries again ``SchedulingPolicy.retry`` seconds later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from treadmill.common.timers import every
from treadmill.switchboard.database import unavailable
from treadmill.switchboard.jobstate import InvalidTransition, Reason, State, Status
from treadmill.switchboard.notifications import HostNote, JobNote
from treadmill.switchboard.store import Store
from treadmill.switchboard.store.errors import NotFound


@dataclass(frozen=True)
class SchedulingPolicy:
    """How the scheduler's passes choose and retry, in seconds (built from the settings
    by ``SwitchboardConfig.scheduling``)."""

    fresh_within: float = 15.0
    """How recently a host's link must have been touched for it to take a job."""
    unrunnable_grace: float = 30.0
    """How long a job no host could ever run stays queued (``scheduler.unrunnable_grace``)."""
    fairness_window: float = 3600.0
    """Recent assignments that count towards a user's share (``scheduler.fairness_window``)."""
    coalesce: float = 0.001
    """How long a wake-up waits for others to make one pass with."""
    retry: float = 0.5
    """Before another try when another instance held the scheduling lock."""


@dataclass
class SchedulerCounts:
    """What this instance's scheduler did since start (read by the metrics)."""

    passes: int = 0
    """Passes that held the scheduling lock."""
    lost: int = 0
    """Passes that found the lock held by another instance (no write)."""
    ignored: int = 0
    """Wake-ups ignored because another instance leads."""
    skipped_wakes: int = 0
    """Freed or changed hosts that made no pass: nothing was queued."""
    assigned: int = 0
    """Jobs assigned."""


class Scheduler(MultiService):
    """Runs scheduling passes when woken, one at a time."""

    log = Logger()

    def __init__(self, reactor: Any, store: Store,
                 policy: SchedulingPolicy = SchedulingPolicy(), *, interval: float = 2.0,
                 is_leader: Callable[[], bool] = lambda: True):
        super().__init__()
        self.reactor = reactor
        self.store = store
        self.policy = policy
        self.is_leader = is_leader
        self.counts = SchedulerCounts()
        self._queued_notes = 0
        """Notifications of a queued job seen (they make the queue not empty)."""
        self._queue_empty = False
        """Whether the last pass left no job queued and none was queued since."""
        self._running: Deferred[None] | None = None
        self._again = False
        self._pending_call: Any = None
        self._retry_call: Any = None
        every(interval, self.wake, reactor, parent=self)
        every(max(interval, 5.0), self.expire_unrunnable, reactor, parent=self)

    def job_changed(self, payload: str) -> None:
        """``treadmill_jobs`` (a :class:`JobNote`): a newly queued job, or a
        host freed by a finished job (not a pass's own assignments)."""
        note = JobNote.parse(payload)
        if note is None:
            return
        if note.state == "queued":
            self._queued_notes += 1
            self._queue_empty = False
            if note.host_id is None:
                self.wake()
        elif note.state == "terminated" and note.host_id is not None:
            self._host_freed()

    def host_changed(self, payload: str) -> None:
        """``treadmill_hosts`` (a :class:`HostNote`): a connected host changed
        (connected, enabled, re-tagged); a host without a link can take nothing."""
        note = HostNote.parse(payload)
        if note is not None and note.session is not None:
            self._host_freed()

    def _host_freed(self) -> None:
        """A host may have become free: worth a pass only if a job may be waiting."""
        if self._queue_empty:
            self.counts.skipped_wakes += 1
        else:
            self.wake()

    def wake(self, _: object = None) -> None:
        """Ask for a pass soon (coalescing wake-ups that arrive together)."""
        if not self.running:
            return
        if not self.is_leader():
            self.counts.ignored += 1
            return
        if self._running is not None:
            self._again = True
            return
        if self._pending_call is None or not self._pending_call.active():
            self._pending_call = self.reactor.callLater(self.policy.coalesce, self._start_pass)

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
        notes = self._queued_notes
        try:
            result = await self.store.schedule(self.policy.fresh_within,
                                               self.policy.fairness_window)
        except Exception as e:
            if not unavailable(e):
                self.log.failure("Scheduling pass failed")
            else:  # an outage: the next pass (timer or notification) tries again
                self.log.warn("Scheduling pass failed: the database is unavailable")
            return
        if not result.locked or result.skipped:
            # Another instance's pass, a frozen one until PostgreSQL ends it, or
            # a job locked elsewhere: try again soon, not at once.
            self.counts.lost += not result.locked
            if self._retry_call is None or not self._retry_call.active():
                self._retry_call = self.reactor.callLater(self.policy.retry, self.wake)
            if not result.locked:
                return
        self.counts.passes += 1
        self.counts.assigned += len(result.pairs)
        # A job queued during the pass may not have been seen by it.
        self._queue_empty = result.queued == 0 and notes == self._queued_notes
        if result.more:
            self._again = True
        if result.pairs:
            self.log.debug("Assigned {count} jobs", count=len(result.pairs))

    async def expire_unrunnable(self) -> None:
        """End queued jobs that no host could ever run (the leader's work)."""
        if not self.is_leader():
            return
        try:
            jobs = await self.store.unrunnable_jobs(self.policy.unrunnable_grace)
        except Exception as e:
            if not unavailable(e):
                self.log.failure("Looking for unrunnable jobs failed")
            else:
                self.log.warn("Looking for unrunnable jobs failed: the database is unavailable")
            return
        for job_id, kind in jobs:
            message = ("no host can run this job: none has all its tags and lets its "
                       "owner start jobs")
            if kind is not None:
                message = (f"no host can run this job: none that has all its tags and lets "
                           f"its owner start jobs runs {kind} images")
            try:
                await self.store.transition(
                    job_id, Status(State.TERMINATED, reason=Reason.QUEUE_TIMEOUT),
                    message=message)
            except (InvalidTransition, NotFound):
                pass

    def stopService(self) -> Deferred[None]:
        for call in (self._pending_call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        d = super().stopService()
        running = self._running
        if running is not None:
            d.addCallback(lambda _: running)
        return d
