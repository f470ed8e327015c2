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


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
                     what: str = "condition") -> Any:
    """Call ``check()`` (a plain or an async function) until it returns something truthy;
    return that, or fail with ``AssertionError`` after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s (last: {result!r})")
        await sleep(interval)
