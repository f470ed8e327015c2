"""The supervisor's half of the dial-back pool (proxy control minor 2, ``docs/proxy.md``).

A proxy whose ``welcome`` names ``pool: N`` accepts up to N idle data connections
from the job. A :class:`DialPool` (one per proxy and job) keeps that many open
ahead of time: each sends ``TREADMILL-POOL/1 <job> <token>`` and waits
(:class:`PooledEnd`); when the proxy writes ``TREADMILL-JOIN/1 <service>`` on one,
a client is already joined to it at the proxy, and ``on_join(end, service)``
dials the service and relays. Every connection used or lost is replaced (one
used once the service's first bytes went on to the proxy, or ``REFILL_WAIT``
after its local dial: the refill's dial and the proxy's accept are then not on
the path of the client's first exchange); a
connection the proxy closes while idle (it refused it: a bound reached, or the
pool closed) counts as a failure, and refills wait with capped exponential
backoff after failures, so that a proxy refusing the pool costs a few
connections a minute. The pool empties when the control connection closes and
fills again after the next ``welcome``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from treadmill.common.eager import write_now
from treadmill.common.splice import StreamEnd, keep_alive, no_delay
from treadmill.protocol import proxy as messages

__all__ = ["REFILL_BACKOFF", "REFILL_WAIT", "DialPool", "PooledEnd"]

REFILL_BACKOFF = backoffPolicy(0.5, 30.0, factor=2, jitter=lambda: 0.0)
"""Seconds before a refill after ``attempt + 1`` failures in a row: 0.5 s, doubling,
at most 30 s (a ``ClientService`` retry policy)."""

REFILL_WAIT = 0.005
"""Seconds a used connection's refill waits at most, after the client's local dial, for
the service's first bytes (a service that does not answer, or not yet)."""


class PooledEnd(StreamEnd):
    """A pooled data connection: the pool header, then the proxy's join line, then a
    client's bytes (held until :func:`~treadmill.common.splice.join`)."""

    def __init__(self, pool: DialPool, header: bytes):
        super().__init__()
        self.pool = pool
        self.header = header
        self.service: str | None = None
        self._line = b""

    def connectionMade(self) -> None:
        # Not paused (unlike StreamEnd): the join line must be read.
        no_delay(self.transport)
        keep_alive(self.transport)  # it may wait long in silence
        write_now(self.transport, self.header)
        self.pool._opened(self)

    def dataReceived(self, data: bytes) -> None:
        if self.service is not None:
            super().dataReceived(data)
            return
        self._line += data
        end = self._line.find(b"\n")
        if end < 0:
            if len(self._line) > messages.MAX_JOIN_BYTES:
                self.pool.counts["bad_join"] += 1
                self.transport.abortConnection()
            return
        line, rest = self._line[:end], self._line[end + 1:]
        self._line = b""
        try:
            service = messages.parse_join_line(line)
        except messages.ProtocolError:
            self.pool.counts["bad_join"] += 1
            self.transport.abortConnection()
            return
        self.service = service
        self.transport.pauseProducing()  # join() resumes it
        if rest:
            super().dataReceived(rest)  # the client's first bytes: kept until the join
        self.pool._joined(self, service)

    def send(self, data: bytes) -> None:
        super().send(data)
        self.pool._refill_for(self)  # the service answered (or spoke first): refill now

    def gone(self, reason: Any) -> None:
        self.pool._lost(self)


class DialPool:
    """Keeps ``size`` pooled data connections to one proxy open for one job.

    :param dial: opens one connection for a :class:`PooledEnd` (the proxy's data
        port, TLS if it says so); its Deferred fails if the connection cannot be made.
    :param header: the pool header to send (``messages.pool_header``); a callable,
        so that a fresh token is used from the next connection on.
    :param on_join: ``on_join(end, service)``: a client of ``service`` was joined to
        ``end`` at the proxy; it may return a Deferred of the local dial: the refill
        then waits for it and for the service's first bytes (at most ``REFILL_WAIT``),
        so that it is not on the path of the client's first exchange.
    :param backoff: seconds before a refill after ``attempt + 1`` failures in a row
        (``twisted.application.internet.backoffPolicy``).
    """

    def __init__(self, reactor: Any, dial: Callable[[PooledEnd], Deferred[Any]],
                 header: Callable[[], bytes],
                 on_join: Callable[[PooledEnd, str], Deferred[Any] | None], *,
                 backoff: Callable[[int], float] = REFILL_BACKOFF):
        self.reactor = reactor
        self.dial = dial
        self.header = header
        self.on_join = on_join
        self.backoff = backoff
        self.size = 0
        self.idle: set[PooledEnd] = set()
        self.opening = 0
        self.failures = 0  # in a row: connections that failed or the proxy closed idle
        self.counts: dict[str, int] = {"opened": 0, "joined": 0, "failed": 0,
                                       "closed_idle": 0, "bad_join": 0}
        self._timer: Any = None
        self._ending: set[PooledEnd] = set()  # closed by us: not a failure
        self._probe: PooledEnd | None = None  # opened after a failure: is it kept?
        self._used: dict[PooledEnd, Any] = {}  # joined, not refilled yet: its timer

    def resize(self, size: int) -> None:
        """Keep ``size`` connections open from now on (0: close them all)."""
        self.size = max(0, size)
        if self.size == 0:
            self._cancel_timer()
            self.failures = 0
            self._probe = None
            for timer in self._used.values():
                if timer.active():
                    timer.cancel()
            self._used.clear()
        while len(self.idle) > self.size:
            self._close(self.idle.pop())
        self.fill()

    def stop(self) -> None:
        """Close every idle connection and open no more (until :meth:`resize`)."""
        self.resize(0)

    def delay(self) -> float:
        """Seconds before the next refill: none after a success, else backoff."""
        if self.failures == 0:
            return 0.0
        return float(self.backoff(self.failures - 1))

    def fill(self) -> None:
        """Open connections until ``size`` are idle or opening (now, or after backoff)."""
        if self._timer is not None:
            return
        missing = self.size - len(self.idle) - self.opening
        if missing <= 0:
            return
        if self.failures:
            self._timer = self.reactor.callLater(self.delay(), self._refill)
            return
        for _ in range(missing):
            self._open()

    def _refill(self) -> None:
        self._timer = None
        probe, self._probe = self._probe, None
        if probe is not None and probe in self.idle:
            self.failures = 0  # the last one was kept: the proxy takes them again
            self.fill()
            return
        if self.size - len(self.idle) - self.opening > 0:
            # One at a time after a failure, until one is kept.
            self._probe = self._open()
            self._timer = self.reactor.callLater(self.delay(), self._refill)

    def _open(self) -> PooledEnd:
        self.opening += 1
        end = PooledEnd(self, self.header())
        dialled = self.dial(end)
        dialled.addErrback(self._failed, end)
        return end

    def _failed(self, failure: Failure, end: PooledEnd) -> None:
        self.opening -= 1
        self.counts["failed"] += 1
        self.failures += 1
        self.fill()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _close(self, end: PooledEnd) -> None:
        self._ending.add(end)
        end.transport.abortConnection()  # idle: not joined, nothing registered

    # -- from PooledEnd --------------------------------------------------------------

    def _opened(self, end: PooledEnd) -> None:
        self.opening -= 1
        self.counts["opened"] += 1
        if len(self.idle) >= self.size:
            self._close(end)  # resized meanwhile
            return
        self.idle.add(end)

    def _joined(self, end: PooledEnd, service: str) -> None:
        self.idle.discard(end)
        self.counts["joined"] += 1
        self.failures = 0
        self._cancel_timer()
        dialled = self.on_join(end, service)
        if dialled is None:
            self.fill()
            return
        # The client first: the refill waits until the service answered through it (or
        # REFILL_WAIT), so that its dial adds nothing to the client's first exchange.
        self._used[end] = self.reactor.callLater(REFILL_WAIT, self._refill_for, end)
        dialled.addErrback(self._dial_failed, end)

    def _dial_failed(self, failure: Failure, end: PooledEnd) -> Failure:
        self._refill_for(end)
        return failure

    def _refill_for(self, end: PooledEnd) -> None:
        """Replace ``end``, joined to a client, if that is not done yet."""
        timer = self._used.pop(end, None)
        if timer is None:
            return
        if timer.active():
            timer.cancel()
        self.fill()

    def _lost(self, end: PooledEnd) -> None:
        self._refill_for(end)  # a used one that closed before any byte went through
        if end in self._ending:
            self._ending.discard(end)
            return
        if end in self.idle:
            # The proxy closed it before any client came: refused, or its pool closed.
            self.idle.discard(end)
            self.counts["closed_idle"] += 1
            self.failures += 1
            self.fill()
