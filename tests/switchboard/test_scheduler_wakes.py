"""Which notifications make a scheduling pass: a freed or changed host only while a
job may be queued. The scheduler on a fake clock, with a store whose passes the
test ends by hand (the real passes: test_scheduler_reads.py, test_instances.py)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from treadmill.switchboard.notifications import HostNote, JobNote
from treadmill.switchboard.scheduler import Scheduler
from treadmill.switchboard.store.scheduler import ScheduleResult


class PassStore:
    """``schedule`` returns a Deferred the test fires with the pass's result."""

    def __init__(self) -> None:
        self.passes: list[Deferred[ScheduleResult]] = []

    def schedule(self, *_: Any) -> Deferred[ScheduleResult]:
        d: Deferred[ScheduleResult] = Deferred()
        self.passes.append(d)
        return d

    async def unrunnable_jobs(self, _: float) -> list[tuple[str, str | None]]:
        return []

    def end(self, queued: int) -> None:
        self.passes[-1].callback(ScheduleResult(queued=queued))


def started() -> tuple[Scheduler, PassStore, Clock]:
    clock, store = Clock(), PassStore()
    scheduler = Scheduler(clock, store, interval=60.0)  # type: ignore[arg-type]
    scheduler.startService()
    clock.advance(1)  # The timer's first pass.
    return scheduler, store, clock


def queued(scheduler: Scheduler) -> None:
    scheduler.job_changed(JobNote("j1", "queued", None).format())


def freed(scheduler: Scheduler) -> None:
    scheduler.job_changed(JobNote("j0", "terminated", 7).format())


def test_a_freed_host_makes_no_pass_while_nothing_is_queued() -> None:
    scheduler, store, clock = started()
    store.end(queued=0)
    freed(scheduler)
    scheduler.host_changed(HostNote(7, "a-session").format())
    clock.advance(1)
    assert (len(store.passes), scheduler.counts.skipped_wakes) == (1, 2)
    # A job queued: the next freed host is worth a pass again.
    queued(scheduler)
    clock.advance(1)
    store.end(queued=1)  # It stayed queued (no host for it).
    freed(scheduler)
    clock.advance(1)
    assert len(store.passes) == 3


def test_a_job_queued_during_a_pass_that_saw_none_keeps_freed_hosts_useful() -> None:
    scheduler, store, clock = started()
    queued(scheduler)  # Arrives while the pass runs, after it counted the queue.
    store.end(queued=0)
    clock.advance(1)  # The pass it asked for runs.
    assert len(store.passes) == 2
    freed(scheduler)  # While that pass runs: one more after it.
    store.end(queued=1)
    clock.advance(1)
    assert len(store.passes) == 3
    assert scheduler.counts.skipped_wakes == 0


def test_the_timer_passes_whatever_the_queue() -> None:
    _, store, clock = started()
    store.end(queued=0)
    clock.advance(60)  # The timer's wake-up...
    clock.advance(1)  # ...and its pass, a moment later.
    assert len(store.passes) == 2
