"""This switchboard process as one of several instances on one database.

Each instance has a row in ``instances`` (a new id per process) and refreshes
its heartbeat every ``interval`` seconds; a clean stop marks it stopped. An
instance whose heartbeat is older than ``dead_after`` seconds is dead: the
supervisor links it held are gone, so their hosts are not scheduled (see
:meth:`Store.schedule`) and a job that ends ``host_unreachable`` there does not
count against its host. Every heartbeat also tells which live instance is the
oldest: that one is the *leader*, the only one that runs scheduling passes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from treadmill.common.timers import every
from treadmill.switchboard.store import Store
from treadmill.switchboard.store.base import INSTANCE_DEAD_AFTER


@dataclass(frozen=True)
class Cluster:
    """The instances as this one's last heartbeat saw them."""

    leader: bool = False
    """Whether this instance is the oldest live one (it schedules)."""
    live: int = 1
    """Live instances."""
    links: int = 0
    """Supervisor links held by all live instances together."""


class Instance(MultiService):
    """This process's row in ``instances``: heartbeat, leadership, the cluster's size."""

    log = Logger()

    def __init__(self, reactor: Any, store: Store, name: str, address: str = "", *,
                 interval: float = 1.0, dead_after: float = INSTANCE_DEAD_AFTER):
        super().__init__()
        self.reactor = reactor
        self.store = store
        self.id = str(uuid.uuid4())
        self.instance_name = name
        self.address = address
        self.dead_after = dead_after
        self.cluster = Cluster()
        self.beats = 0
        self._observers: list[Callable[[Instance], object]] = []
        every(interval, self.beat, reactor, parent=self, name="heartbeat")

    def is_leader(self) -> bool:
        """Whether this instance led at its last heartbeat (stopped: no)."""
        return self.cluster.leader

    def observe(self, fn: Callable[[Instance], object]) -> None:
        """Call ``fn(self)`` after every successful heartbeat."""
        self._observers.append(fn)

    async def register(self) -> None:
        """Record this instance (before it holds links or schedules)."""
        await self.store.register_instance(self.id, self.instance_name, self.address)

    async def beat(self) -> None:
        """Refresh the heartbeat and learn who leads."""
        try:
            row = await self.store.instance_heartbeat(self.id, self.dead_after)
            if not row["found"]:
                await self.register()
        except Exception as e:
            self.log.warn("Instance heartbeat failed: {error}", error=str(e).strip() or
                          type(e).__name__)
            return
        self.beats += 1
        cluster = Cluster(row["leader"] == self.id, row["live"], row["links"])
        if cluster.leader != self.cluster.leader:
            self.log.info("Instance {name} {what} the scheduler", name=self.instance_name,
                          what="now runs" if cluster.leader else "no longer runs")
        self.cluster = cluster
        for fn in list(self._observers):
            try:
                fn(self)
            except Exception:
                self.log.failure("Heartbeat observer failed")

    async def _stop(self) -> None:
        await super().stopService()
        self.cluster = replace(self.cluster, leader=False)
        try:
            await self.store.instance_stopped(self.id)
        except Exception:
            self.log.failure("Could not record that this instance stopped")

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())
