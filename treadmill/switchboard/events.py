"""Live job events for watchers, woken by PostgreSQL notifications.

Every change to a job row raises a ``treadmill_jobs`` notification (a trigger
in the schema; the payload is a :class:`~treadmill.switchboard.notifications.JobNote`,
``"<job id> <state> <host id or ->"``); :class:`JobWatchers` wakes the watchers
of that job, which then read the events they have not seen yet from the database. A watcher
registers before it reads, so no notification falls between the two; after
the LISTEN connection recovers every watcher re-reads, since notifications
sent meanwhile are lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from twisted.internet.defer import Deferred

from treadmill.switchboard.notifications import JobNote
from treadmill.switchboard.store import Store

_TIMEOUT = object()


class JobWatchers:
    """Wakes the watchers of a job when it changes."""

    def __init__(self, store: Store, clock: Any):
        self.store = store
        self.clock = clock
        self._waiters: dict[str, set[Deferred[object]]] = {}

    def notify(self, payload: str) -> None:
        """Handle a ``treadmill_jobs`` notification (a :class:`JobNote`)."""
        note = JobNote.parse(payload)
        if note is None:
            return
        for waiter in self._waiters.pop(note.job_id, set()):
            if not waiter.called:
                waiter.callback(None)

    def wake_all(self) -> None:
        """Make every watcher re-read (after notifications may have been lost)."""
        waiters, self._waiters = self._waiters, {}
        for group in waiters.values():
            for waiter in group:
                if not waiter.called:
                    waiter.callback(None)

    @property
    def count(self) -> int:
        return sum(len(group) for group in self._waiters.values())

    async def events(self, job_id: str, after: int, keepalive: float
                     ) -> AsyncIterator[dict[str, Any] | None]:
        """Yield the job's events after ``after`` as they happen, until it terminates.

        Yields ``None`` when nothing happened for ``keepalive`` seconds, so
        that the caller can keep its connection alive.
        """
        while True:
            waiter: Deferred[object] = Deferred()
            group = self._waiters.setdefault(job_id, set())
            group.add(waiter)
            timer = None
            try:
                rows = await self.store.job_events(job_id, after)
                for row in rows:
                    yield row
                    after = row["seq"]
                    if row["state"] == "terminated":
                        return
                if rows:
                    continue
                if await self.store.job_terminated(job_id):
                    # It terminated, maybe since the read above: its final event
                    # committed with that state, so one more read has it.
                    for row in await self.store.job_events(job_id, after):
                        yield row
                        after = row["seq"]
                    return
                timer = self.clock.callLater(keepalive, waiter.callback, _TIMEOUT)
                woken = await waiter
                if woken is _TIMEOUT:
                    yield None
            finally:
                if timer is not None and timer.active():
                    timer.cancel()
                group = self._waiters.get(job_id)
                if group is not None:
                    group.discard(waiter)
                    if not group:
                        del self._waiters[job_id]
