"""The Autobahn factories every Treadmill WebSocket is built by: :class:`PreciseClientFactory`
and :class:`PreciseServerFactory`, Autobahn's own with their connections' timers never
early and at most 50 ms late.

Autobahn schedules a connection's auto-ping, pong timeout and opening and closing
handshake timeouts on its factory's ``_batched_timer`` (txaio's ``make_batched_timer``,
on txaio's global reactor). txaio 26.6 puts each deadline at ``int(now + delay)`` whole
seconds: a timer fires up to a second early, and a delay under a second at once (a
0.3 s ping interval sent 11,000 pings in 2 s over loopback; a 2.5 s pong timeout dropped
a silent peer 1.6-2.3 s after its ping). :class:`PreciseTimer` keeps txaio's
``call_later`` contract on the factory's reactor, never early and at most
:data:`RESOLUTION` (50 ms) late: the timers due in one 50 ms step share a delayed call,
as a bucket of txaio's did, so thousands of links do not wake the reactor once each
(one delayed call per timer nearly doubled the idle CPU of a switchboard and a fleet at
2,000 links). Nothing per message.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketServerFactory
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from txaio.interfaces import IBatchedTimer

__all__ = ["RESOLUTION", "PreciseClientFactory", "PreciseServerFactory", "PreciseTimer",
           "PreciseTimers", "TimerCall"]

RESOLUTION = 0.05
"""Seconds: a :class:`PreciseTimer`'s deadlines are rounded up to a multiple of this (of
the reactor's clock), so the timers of many connections due close together share one
delayed call and one wake-up of the reactor."""


class _Slot:
    """The calls due at one multiple of the resolution (the ``index``-th) of a timer's
    ``slots``, and the delayed call running them."""

    __slots__ = ("calls", "delayed", "index", "slots")

    def __init__(self, slots: dict[int, _Slot], index: int, delayed: IDelayedCall):
        self.slots = slots
        self.index = index
        self.delayed = delayed
        self.calls: dict[TimerCall, None] = {}  # in the order they were made
        slots[index] = self

    def drop(self, call: TimerCall) -> None:
        """Forget ``call``; the slot and its delayed call too once nothing is left."""
        del self.calls[call]
        if not self.calls:
            if self.slots.get(self.index) is self:
                del self.slots[self.index]
            if self.delayed.active():
                self.delayed.cancel()


class TimerCall:
    """One call of a :class:`PreciseTimer`. :meth:`cancel` is idempotent: Autobahn may
    cancel a call that already ran, or cancel one twice."""

    __slots__ = ("_call", "_slot")

    def __init__(self, slot: _Slot, call: Callable[[], Any]):
        self._slot: _Slot | None = slot
        self._call: Callable[[], Any] | None = call

    def cancel(self) -> None:
        """Stop the call if it has not run; nothing otherwise."""
        slot, self._slot, self._call = self._slot, None, None
        if slot is not None:
            slot.drop(self)


class PreciseTimer(IBatchedTimer):
    """txaio's batched-timer contract (``call_later``) on ``reactor``'s clock, never
    early: each deadline rounded up to a multiple of ``resolution`` seconds (to the
    microsecond first, so that 0.1 + 0.2 is 0.3), all calls due at one multiple run by
    one delayed call, in the order they were made."""

    log = Logger()

    def __init__(self, reactor: IReactorTime, resolution: float = RESOLUTION):
        self.reactor = reactor
        self._step = round(resolution * 1_000_000)  # microseconds
        self._slots: dict[int, _Slot] = {}

    def call_later(self, delay: float, func: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> TimerCall:
        """Call ``func(*args, **kwargs)`` ``delay`` seconds from now, or up to one
        resolution later; a handle to cancel it."""
        now = self.reactor.seconds()
        index = math.ceil(round((now + delay) * 1_000_000) / self._step)
        slot = self._slots.get(index)
        if slot is None:
            delay = max(0.0, index * self._step / 1_000_000 - now)
            slot = _Slot(self._slots, index, self.reactor.callLater(delay, self._run, index))
        call = TimerCall(slot, (lambda: func(*args, **kwargs)) if args or kwargs else func)
        slot.calls[call] = None
        return call

    def _run(self, index: int) -> None:
        slot = self._slots.pop(index)
        for call in list(slot.calls):
            func = call._call
            if func is None:
                continue  # cancelled by a call before it in this step
            call._slot = call._call = None
            try:
                func()
            except Exception:
                self.log.failure("A WebSocket timer failed")
        slot.calls.clear()


class PreciseTimers:
    """Mixin for an Autobahn Twisted factory, before it in the bases: its connections'
    timers on a :class:`PreciseTimer` of ``reactor``, which is required."""

    def __init__(self, *args: Any, reactor: IReactorTime, **kwargs: Any):
        super().__init__(*args, reactor=reactor, **kwargs)  # type: ignore[call-arg]
        self.timer = self._batched_timer = PreciseTimer(reactor)
        """The connections' timer (Autobahn's name for it: ``_batched_timer``)."""


class PreciseClientFactory(PreciseTimers, WebSocketClientFactory):
    """Autobahn's client factory with precise timers (``reactor=`` required)."""


class PreciseServerFactory(PreciseTimers, WebSocketServerFactory):
    """Autobahn's server factory with precise timers (``reactor=`` required)."""
