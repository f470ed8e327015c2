"""The Autobahn factories every Treadmill WebSocket is built by: :class:`PreciseClientFactory`
and :class:`PreciseServerFactory`, Autobahn's own with their connections' timers precise.

Autobahn schedules a connection's auto-ping, pong timeout and opening and closing
handshake timeouts on its factory's ``_batched_timer`` (txaio's ``make_batched_timer``,
on txaio's global reactor). txaio 26.6 puts each deadline at ``int(now + delay)`` whole
seconds: a timer fires up to a second early, and a delay under a second at once (a
0.3 s ping interval sent 11,000 pings in 2 s over loopback; a 2.5 s pong timeout dropped
a silent peer 1.6-2.3 s after its ping). :class:`PreciseTimer` keeps txaio's
``call_later`` contract on the factory's reactor: one delayed call per timer (the
batched timer makes one per bucket), nothing per message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketServerFactory
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from txaio.interfaces import IBatchedTimer

__all__ = ["PreciseClientFactory", "PreciseServerFactory", "PreciseTimer", "PreciseTimers",
           "TimerCall"]


class TimerCall:
    """One call of a :class:`PreciseTimer`. :meth:`cancel` is idempotent: Autobahn may
    cancel a call that already ran, or cancel one twice."""

    __slots__ = ("_call",)

    def __init__(self, call: IDelayedCall):
        self._call: IDelayedCall | None = call

    def cancel(self) -> None:
        """Stop the call if it has not run; nothing otherwise."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()


class PreciseTimer(IBatchedTimer):
    """txaio's batched-timer contract (``call_later``) on ``reactor``'s ``callLater``,
    to the reactor's precision."""

    def __init__(self, reactor: IReactorTime):
        self.reactor = reactor

    def call_later(self, delay: float, func: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> TimerCall:
        """Call ``func(*args, **kwargs)`` in ``delay`` seconds; a handle to cancel it."""
        return TimerCall(self.reactor.callLater(delay, func, *args, **kwargs))


class PreciseTimers:
    """Mixin for an Autobahn Twisted factory, before it in the bases: its connections'
    timers on a :class:`PreciseTimer` of ``reactor``, which is required."""

    def __init__(self, *args: Any, reactor: IReactorTime, **kwargs: Any):
        super().__init__(*args, reactor=reactor, **kwargs)  # type: ignore[call-arg]
        self._batched_timer = PreciseTimer(reactor)


class PreciseClientFactory(PreciseTimers, WebSocketClientFactory):
    """Autobahn's client factory with precise timers (``reactor=`` required)."""


class PreciseServerFactory(PreciseTimers, WebSocketServerFactory):
    """Autobahn's server factory with precise timers (``reactor=`` required)."""
