"""Bounded retries for ``tml``: exponential backoff with jitter, and a deadline.

Every retry loop of the client (HTTP calls, following an event stream or a
log stream, fetching a log token) uses :class:`Retry`, so that none can spin:
each pause is ``initial * 2**n`` seconds (at most ``max_delay``), scaled by a
random factor in [0.5, 1), and the loop gives up once ``give_up_after``
seconds have passed since the first failure (or after ``max_attempts``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from twisted.internet.task import deferLater

__all__ = ["Retry", "retry_after_seconds"]


@dataclass(eq=False)
class Retry:
    """The pauses of one retry loop; :meth:`reset` after progress."""

    reactor: Any
    _: KW_ONLY
    give_up_after: float
    initial: float = 0.5
    max_delay: float = 8.0
    max_attempts: int | None = None
    retry_after_cap: float = 30.0
    jitter: Callable[[], float] = random.random
    failures: int = field(default=0, init=False)
    since: float | None = field(default=None, init=False)

    def reset(self) -> None:
        """Progress was made: the next failure starts a new episode."""
        self.failures = 0
        self.since = None

    @property
    def elapsed(self) -> float:
        """Seconds since the first failure of this episode."""
        return 0.0 if self.since is None else self.reactor.seconds() - self.since

    def next_delay(self, at_least: float = 0.0) -> float | None:
        """Count a failure; the pause before the next attempt, or None to give up.

        ``at_least`` is a pause the server asked for (``Retry-After``, honoured
        up to ``retry_after_cap``); the pause never goes past the deadline.
        """
        now = self.reactor.seconds()
        if self.since is None:
            self.since = now
        self.failures += 1
        if self.max_attempts is not None and self.failures >= self.max_attempts:
            return None
        remaining = self.since + self.give_up_after - now
        if remaining <= 0:
            return None
        base = min(self.max_delay, self.initial * 2 ** (self.failures - 1))
        delay = max(base * (0.5 + self.jitter() / 2), min(at_least, self.retry_after_cap))
        return min(delay, remaining)

    def summary(self) -> str:
        """``gave up after N attempts in S s``."""
        attempts = self.failures
        return (f"gave up after {attempts} attempt{'s' if attempts != 1 else ''} in "
                f"{self.elapsed:.1f} s")

    def sleep(self, delay: float) -> Any:
        """A Deferred that fires after ``delay`` seconds."""
        return deferLater(self.reactor, delay, lambda: None)


def retry_after_seconds(value: bytes | str | None) -> float:
    """The delay of a ``Retry-After`` header in seconds (0 if absent or a date)."""
    if value is None:
        return 0.0
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    try:
        seconds = float(text.strip())
    except ValueError:
        return 0.0
    return seconds if 0 <= seconds < float("inf") else 0.0
