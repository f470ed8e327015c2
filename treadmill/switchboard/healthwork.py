"""The leader's periodic health work: start the health checks due by the clock on
idle hosts, and say in queued jobs that only hosts out of service match them
(``docs/operations.md``, "Host health")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from treadmill.switchboard.database import unavailable


class HealthWork(TimerService):
    """Every ``interval`` seconds, on the leader only: :meth:`Store.run_due_checks` and
    :meth:`Store.refresh_queue_messages`."""

    log = Logger()

    def __init__(self, reactor: Any, store: Any, is_leader: Callable[[], bool],
                 interval: float = 10.0):
        super().__init__(interval, lambda: Deferred.fromCoroutine(self.run()))
        self.clock = reactor
        self.store = store
        self.is_leader = is_leader

    async def run(self) -> None:
        """One pass (nothing on an instance that does not lead)."""
        if not self.is_leader():
            return
        try:
            started = await self.store.run_due_checks()
            await self.store.refresh_queue_messages()
        except Exception as e:
            if unavailable(e):
                self.log.warn("Health work skipped: the database is unavailable")
            else:
                self.log.failure("Health work failed")
            return
        if started:
            self.log.info("Started {count} health checks due by the clock: {jobs}",
                          count=len(started), jobs=", ".join(started))
