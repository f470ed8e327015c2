"""Rate limits with bounded memory, and a bound on concurrent expensive work.

:class:`RateLimiter` keeps one token bucket per key (a client address, a user
name) in a table of at most ``size`` entries, least recently used first out. A
bucket that has refilled completely is the same as no bucket, so it is dropped
as soon as it reaches the old end of the table: idle keys cost nothing, and a
flood of new keys can only push out other keys, never grow the table.

:class:`ConcurrencyGate` runs at most ``limit`` calls at once with at most
``queue`` more waiting; beyond that it refuses at once (:class:`Saturated`),
so that a flood cannot pile up work, threads or memory.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import DeferredSemaphore

T = TypeVar("T")


class RateLimiter:
    """Token buckets of ``burst`` tokens refilled at ``rate`` per second, per key."""

    def __init__(self, clock: Any, rate: float, burst: int, size: int = 10000):
        if rate <= 0 or burst < 1 or size < 1:
            raise ValueError("rate must be positive, burst and size at least 1")
        self.clock = clock
        self.rate = rate
        self.burst = float(burst)
        self.size = size
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self.burst
        tokens, stamp = entry
        return min(self.burst, tokens + max(0.0, now - stamp) * self.rate)

    def wait(self, key: str) -> float:
        """Seconds until ``key`` may act (0: now)."""
        tokens = self._tokens(key, self.clock.seconds())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def take(self, key: str) -> None:
        """Spend one of ``key``'s tokens (call after :meth:`wait` said 0)."""
        now = self.clock.seconds()
        self._store(key, self._tokens(key, now) - 1, now)

    def give(self, key: str) -> None:
        """Return a token to ``key`` (its attempt turned out legitimate)."""
        now = self.clock.seconds()
        if key in self._buckets:
            self._store(key, self._tokens(key, now) + 1, now)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (max(0.0, tokens), now)
        self._buckets.move_to_end(key)
        if tokens >= self.burst:
            del self._buckets[key]
        self._prune(now)

    def _prune(self, now: float) -> None:
        while len(self._buckets) > self.size:
            self._buckets.popitem(last=False)
        # Drop full buckets from the old end (a few per call: amortised O(1)).
        for _ in range(4):
            if not self._buckets:
                return
            key = next(iter(self._buckets))
            if self._tokens(key, now) < self.burst:
                return
            del self._buckets[key]


class RateLimited(Exception):
    """Over a rate limit; :attr:`retry_after` whole seconds until the next try."""

    def __init__(self, retry_after: float):
        super().__init__(f"retry after {retry_after:g} s")
        self.retry_after = max(1, math.ceil(retry_after))


def admit(limits: Sequence[tuple[RateLimiter, str]]) -> None:
    """Spend a token of each ``(limiter, key)``, or none and raise :class:`RateLimited`."""
    wait = max((limiter.wait(key) for limiter, key in limits), default=0.0)
    if wait > 0:
        raise RateLimited(wait)
    for limiter, key in limits:
        limiter.take(key)


class Saturated(Exception):
    """The gate's calls and queue are full."""


class ConcurrencyGate:
    """At most ``limit`` calls at once, at most ``queue`` more waiting."""

    def __init__(self, limit: int, queue: int):
        if limit < 1 or queue < 0:
            raise ValueError("limit must be at least 1 and queue at least 0")
        self.queue = queue
        self._semaphore = DeferredSemaphore(limit)

    @property
    def running(self) -> int:
        return self._semaphore.limit - self._semaphore.tokens

    @property
    def waiting(self) -> int:
        return len(self._semaphore.waiting)

    async def run(self, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await call(*args)`` when a slot is free; :class:`Saturated` if none will be."""
        if self._semaphore.tokens == 0 and self.waiting >= self.queue:
            raise Saturated()
        await self._semaphore.acquire()
        try:
            return await call(*args)
        finally:
            self._semaphore.release()
