"""Admission control for supervisor link handshakes.

A fleet that connects at once (a failover, a restart, a new balancer) would
otherwise queue hundreds of handshakes behind the database pool, and the
instance's reactor would be too busy to answer a load balancer's health check
in time: marked down, the instance loses every session and the fleet comes
back into the same overload. :class:`HandshakeGate` lets at most ``limit``
handshakes (from the WebSocket upgrade until the link is refused, or registered
and through its first reconciliation: all the work a new link brings) be under
way. An upgrade beyond them waits in a FIFO queue, its
request held open without any database work, until a handshake ends and hands
it the slot; only when ``queue`` upgrades wait already, or one waited ``wait``
seconds, is it answered ``503`` with ``Retry-After`` (longer the longer the
queue), and the supervisor retries with backoff and jitter
(``treadmill.supervisor.link``).

The queue drains only while the reactor keeps up: :class:`ReactorLag` notes how
late a 50 ms timer fires, and while it is later than ``MAX_LAG`` (on a machine
short of CPU) no waiter is handed a slot, so the handshakes this instance takes
on never make it too slow to answer a load balancer's health check (marked down,
it would lose every link, and they would all come back at once). Waiters that
wait too long are refused, and their supervisors back off.

Waiting, not refusing, matters behind a balancer: a held upgrade is a
connection to HAProxy's ``balance leastconn``, so the surviving instances of a
failover share the returning fleet, where refused supervisors came back to
whichever instance had the fewest connections, and it spent itself on
refusals.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, succeed

__all__ = ["MAX_LAG", "RETRY_AFTER", "RETRY_AFTER_MAX", "HandshakeGate", "QueueTimeout",
           "ReactorLag", "Slot"]

RETRY_AFTER = 1
"""Seconds a refused supervisor is told to wait at least (it adds jitter and backoff)."""
RETRY_AFTER_MAX = 10
"""The longest ``Retry-After`` a full queue asks for."""


MAX_LAG = 0.1
"""Seconds late the reactor may run before the queue stops draining for a while."""


class ReactorLag:
    """How late the reactor runs: :meth:`tick` every ``interval`` seconds on ``clock``
    (a ``TimerService``) notes how late it came; :meth:`lag` is that, or how late the
    next tick is already."""

    def __init__(self, clock: Any, interval: float = 0.05):
        self.clock = clock
        self.interval = interval
        self._last: float | None = None
        self._late = 0.0

    def tick(self) -> None:
        now = self.clock.seconds()
        if self._last is not None:
            self._late = max(0.0, now - self._last - self.interval)
        self._last = now

    def lag(self) -> float:
        if self._last is None:
            return 0.0
        overdue = self.clock.seconds() - self._last - self.interval
        return max(self._late, overdue)


class QueueTimeout(Exception):
    """An upgrade waited ``wait`` seconds in the queue without getting a slot."""


class Slot:
    """One admitted handshake; :meth:`release` is idempotent, so every way a
    handshake can end (registered, refused, closed, timed out) may call it."""

    __slots__ = ("_gate",)

    def __init__(self, gate: HandshakeGate):
        self._gate: HandshakeGate | None = gate

    @property
    def held(self) -> bool:
        return self._gate is not None

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._released()


class HandshakeGate:
    """At most ``limit`` handshakes in progress, at most ``queue`` waiting for one (each
    at most ``wait`` seconds on ``clock``); counts what it admits, queues and refuses."""

    def __init__(self, limit: int, *, queue: int = 0, wait: float = 0.0,
                 clock: Any = None, lag: Any = None, max_lag: float = MAX_LAG):
        if limit < 1:
            raise ValueError(f"the handshake limit must be at least 1, not {limit}")
        if queue < 0 or wait < 0:
            raise ValueError("the handshake queue and its wait cannot be negative")
        self.limit = limit
        self.queue_limit = queue if wait > 0 else 0
        if self.queue_limit and clock is None:
            raise ValueError("a handshake queue needs a clock for its wait")
        self.wait = wait
        self.clock = clock
        self._in_progress = 0
        self._queue: deque[Deferred[Slot]] = deque()
        self._draining = False
        self.admitted = 0
        self.queued = 0  # upgrades that waited for their slot (since start)
        self.timed_out = 0  # of those, refused after ``wait`` seconds
        self.refused = 0  # turned away: the queue full (or none), a wait ran out
        self.peak = 0  # the most in progress at once
        self.peak_waiting = 0
        self._window = (0.0, 0, 0)  # (start of this second, ended in it, in the one before)
        self.lag = lag  # a ReactorLag.lag, or None: never wait for the reactor
        self.max_lag = max_lag
        self.paused = 0  # times the queue stopped draining, the reactor running late
        self._resume: Any = None  # the pending drain after a pause

    @property
    def in_progress(self) -> int:
        return self._in_progress

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def full(self) -> bool:
        return self._in_progress >= self.limit

    def acquire(self) -> Slot | None:
        """A slot now, or ``None`` (counted as refused) when ``limit`` are in progress or
        upgrades wait for one (they come first)."""
        if self.full or self._queue:
            self.refused += 1
            return None
        return self._admit()

    def enter(self) -> Deferred[Slot] | None:
        """A slot: now (a fired Deferred), or once the upgrades queued before this one
        have theirs; ``None`` (counted as refused) when the queue is full.

        The Deferred fails with :class:`QueueTimeout` after ``wait`` seconds; cancel it
        when the client goes, which gives up its place.
        """
        if not self.full and not self._queue and not self._late():
            return succeed(self._admit())
        if len(self._queue) >= self.queue_limit:
            self.refused += 1
            return None
        waiter: Deferred[Slot] = Deferred(lambda d: self._leave(d))
        self._queue.append(waiter)
        self.queued += 1
        self.peak_waiting = max(self.peak_waiting, len(self._queue))
        timer = self.clock.callLater(self.wait, self._expire, waiter)
        self._drain()  # a free slot held back while the reactor ran late

        def stop_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return waiter.addBoth(stop_timer)

    def retry_after(self) -> int:
        """Seconds a refused supervisor should wait: about how long the queue takes to
        drain at the rate handshakes ended lately, at least ``RETRY_AFTER``."""
        self._tick()
        _, now, before = self._window
        rate = max(now, before, 1)
        seconds = math.ceil(len(self._queue) / rate)
        return max(RETRY_AFTER, min(RETRY_AFTER_MAX, seconds))

    # -- internals ---------------------------------------------------------------------

    def _admit(self) -> Slot:
        self._in_progress += 1
        self.admitted += 1
        self.peak = max(self.peak, self._in_progress)
        return Slot(self)

    def _released(self) -> None:
        self._in_progress -= 1
        if self.clock is not None:
            self._tick()
            start, now, before = self._window
            self._window = (start, now + 1, before)
        self._drain()

    def _drain(self) -> None:
        """Hand free slots to the oldest waiters. A waiter's callback may end its
        handshake at once (a bad token) and release again: that release only counts,
        and this loop goes on (no recursion however long the queue)."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue and not self.full:
                if self._late():
                    self._pause()
                    break
                self._queue.popleft().callback(self._admit())
        finally:
            self._draining = False

    def _late(self) -> bool:
        """The reactor runs late (only a queue waits for it: without one, a handshake
        that would wait is refused)."""
        return bool(self.queue_limit) and self.lag is not None and self.lag() > self.max_lag

    def _pause(self) -> None:
        """Drain again in ``max_lag`` seconds (the reactor runs late now)."""
        if self._resume is None or not self._resume.active():
            self.paused += 1
            self._resume = self.clock.callLater(self.max_lag, self._drain)

    def _leave(self, waiter: Deferred[Slot]) -> None:
        """A waiter cancelled (its client went): it gives up its place."""
        try:
            self._queue.remove(waiter)
        except ValueError:
            pass

    def _expire(self, waiter: Deferred[Slot]) -> None:
        if waiter in self._queue:
            self._queue.remove(waiter)
            self.timed_out += 1
            self.refused += 1
            waiter.errback(QueueTimeout(f"no handshake slot within {self.wait:g} s"))

    def _tick(self) -> None:
        """Move the one-second window of ended handshakes along ``clock``."""
        if self.clock is None:
            return
        start, now, _ = self._window
        t = self.clock.seconds()
        if t - start >= 2.0:
            self._window = (t, 0, 0)
        elif t - start >= 1.0:
            self._window = (t, 0, now)

