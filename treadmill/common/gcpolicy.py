"""When a daemon's cyclic garbage collector runs over its long-lived objects.

A full collection scans every tracked object not frozen. A switchboard with
1,000 supervisor links holds hundreds of thousands of them, nearly all alive
for hours; with 3,333 links, full collections paused the reactor 200 to 850 ms
(measured with ``gc.callbacks`` on a busy 2-CPU machine), long enough to miss
a load balancer's health check and to put spikes into job dispatch.

:class:`FreezePolicy` freezes (``gc.freeze``) what survived a young collection
every ``freeze_interval`` seconds (10), so links, sessions and caches leave the
scanned generations seconds after they appear, and full collections only see
what is new. Cycles among frozen objects (a link closed after it was frozen)
are not collected until the next ``full_interval``, when everything is unfrozen,
collected once, and frozen again: one full pause per interval instead of one
whenever the heap grew by a quarter (the default: every 30 minutes). The
mock fleet (``treadmill.dev.fleet``) runs it too: with 3,333 supervisors in one
process, its full collections took 1.8 to 2.8 s each, 33 s of a four-minute
run. Each pass's duration is kept (``stats``: :class:`FreezeStats`) for operators.

What survives a full collection the interpreter starts by itself (the heap grew
by a quarter) is frozen too, at once (``after_full``): while thousands of
links arrive within seconds (a failover), the next full collection then scans
only what came since, instead of everything since the last 10 s tick.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService
from twisted.logger import Logger

from treadmill.common.timers import every


@dataclass
class FreezeStats:
    """What a :class:`FreezePolicy` did, for operators."""

    last_freeze: float = 0.0
    """Seconds the last freeze (a young collection, then ``gc.freeze``) took."""
    last_full: float = 0.0
    """Seconds the last full pass (unfreeze, collect, freeze) took."""
    frozen_after_full: int = 0
    """Full collections of the interpreter's own whose survivors were frozen."""


class FreezePolicy(MultiService):
    """Freeze the surviving heap every ``freeze_interval`` s; collect it all every
    ``full_interval`` s."""

    log = Logger()

    def __init__(self, reactor: Any, freeze_interval: float = 10.0,
                 full_interval: float = 1800.0):
        super().__init__()
        self.reactor = reactor
        self.freeze_interval = freeze_interval
        self.full_interval = full_interval
        self.stats = FreezeStats()
        self._next_full = 0.0
        self._in_full = False
        self.after_full_pending = False
        every(freeze_interval, self.tick, reactor, parent=self)

    def startService(self) -> None:
        self._next_full = self.reactor.seconds() + self.full_interval
        gc.callbacks.append(self._collected)
        super().startService()

    def stopService(self) -> Any:
        if self._collected in gc.callbacks:
            gc.callbacks.remove(self._collected)
        return super().stopService()

    def _collected(self, phase: str, info: dict[str, Any]) -> None:
        """``gc.callbacks``: after a full collection (any thread), freeze its survivors
        on the reactor's thread, outside the collector."""
        if phase == "stop" and info.get("generation") == 2 and not self._in_full:
            self.after_full_pending = True
            self.reactor.callFromThread(self.after_full)

    def after_full(self) -> None:
        """Freeze what the interpreter's own full collection left alive."""
        if self.after_full_pending:
            self.after_full_pending = False
            gc.freeze()
            self.stats.frozen_after_full += 1

    def tick(self) -> None:
        if self.reactor.seconds() >= self._next_full:
            self._next_full = self.reactor.seconds() + self.full_interval
            self.full()
        else:
            self.freeze()

    def freeze(self) -> None:
        """Collect the young generations, then freeze every object left."""
        t0 = time.perf_counter()
        gc.collect(1)
        gc.freeze()
        self.stats.last_freeze = time.perf_counter() - t0

    def full(self) -> int:
        """Unfreeze, collect everything, freeze again; the objects collected."""
        t0 = time.perf_counter()
        self._in_full = True
        try:
            gc.unfreeze()
            found = gc.collect()
            gc.freeze()
        finally:
            self._in_full = False
        self.stats.last_full = time.perf_counter() - t0
        self.log.debug("Full garbage collection: {found} objects in {ms:.1f} ms",
                       found=found, ms=1000 * self.stats.last_full)
        return found
