"""Statements shared by the calls that arrive together: :class:`Batcher`.

A fleet that links at once (a failover, a restart, a balancer restarted) makes
the same small statement for each link, each a round trip through the pool and
a statement for PostgreSQL to plan. A :class:`Batcher` gathers the calls of one
reactor turn, and those arriving while its batches are being written, into one
call of its ``write`` (one statement for many rows). A batch that fails is
written again one item at a time, so that one row's error (a lock timeout, a
deadlock) fails only its own call; with the database away, each fails at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred

__all__ = ["Batcher"]

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """``await submit(item)``: ``write``'s result for ``item``, written with the others
    submitted meanwhile (``write`` takes a list of items and returns their results in
    the same order). At most ``concurrency`` batches of at most ``max_batch`` items
    are written at a time."""

    def __init__(self, reactor: Any, write: Callable[[list[T]], Awaitable[list[R]]], *,
                 concurrency: int = 2, max_batch: int = 256):
        self.reactor = reactor
        self.write = write
        self.concurrency = concurrency
        self.max_batch = max_batch
        self._waiting: list[tuple[T, Deferred[R]]] = []
        self._in_flight = 0
        self._scheduled = False
        self.batches = 0  # statements written (batches, and single items after a failure)

    async def submit(self, item: T) -> R:
        done: Deferred[R] = Deferred()
        self._waiting.append((item, done))
        if not self._scheduled and self._in_flight < self.concurrency:
            self._scheduled = True
            self.reactor.callLater(0, self._flush)  # this turn's together
        return await done

    def _flush(self) -> None:
        self._scheduled = False
        while self._waiting and self._in_flight < self.concurrency:
            batch, self._waiting = (self._waiting[:self.max_batch],
                                    self._waiting[self.max_batch:])
            self._in_flight += 1
            Deferred.fromCoroutine(self._write(batch))

    async def _write(self, batch: list[tuple[T, Deferred[R]]]) -> None:
        try:
            try:
                results = await self._statement([item for item, _ in batch])
            except Exception as e:
                if len(batch) == 1:
                    batch[0][1].errback(e)
                    return
                for item, done in batch:
                    try:
                        (result,) = await self._statement([item])
                    except Exception as one:
                        done.errback(one)
                    else:
                        done.callback(result)
                return
            for (_, done), result in zip(batch, results, strict=True):
                done.callback(result)
        finally:
            self._in_flight -= 1
            if self._waiting and not self._scheduled:
                self._flush()  # those that arrived meanwhile

    async def _statement(self, items: list[T]) -> list[R]:
        self.batches += 1
        return await self.write(items)
