"""``every``: work repeated at an interval on a given reactor, as a (child) service."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred

__all__ = ["every"]


def every(interval: float, work: Callable[[], Any], reactor: Any, *,
          parent: MultiService | None = None, name: str | None = None) -> TimerService:
    """A :class:`TimerService` that calls ``work`` every ``interval`` seconds of
    ``reactor``'s clock, the first time when it starts. A coroutine function's coroutine
    runs as a Deferred, which the timer awaits before it counts the next interval (so
    passes never overlap). With ``parent``, the timer is its child service, named
    ``name``."""

    def call() -> Any:
        result = work()
        return Deferred.fromCoroutine(result) if inspect.iscoroutine(result) else result

    timer = TimerService(interval, call)
    timer.clock = reactor
    if name is not None:
        timer.setName(name)
    if parent is not None:
        timer.setServiceParent(parent)
    return timer
