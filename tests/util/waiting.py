"""Waiting on the real reactor: ``sleep``, ``within`` (a Deferred with a deadline) and
``eventually`` (poll a condition until it holds)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater


async def sleep(seconds: float) -> None:
    """Let the reactor run for ``seconds``."""
    await deferLater(reactor, seconds, lambda: None)


async def within(d: Deferred[Any], timeout: float = 5.0) -> Any:
    """``d``'s result, or a failure (``TimeoutError``) after ``timeout`` seconds."""
    return await d.addTimeout(timeout, reactor)


async def eventually(check: Callable[[], Any], timeout: float = 10.0,
                     interval: float | None = None, what: str = "condition") -> Any:
    """Call ``check()`` (a plain or an async function) until it returns something truthy;
    return that, or fail with ``AssertionError`` after ``timeout`` seconds. It is called
    every ``interval`` seconds: by default 0.02 for a plain check, 0.05 for an async one
    (a request each time)."""
    deadline = reactor.seconds() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
            interval = 0.05 if interval is None else interval
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s (last: {result!r})")
        await sleep(0.02 if interval is None else interval)
