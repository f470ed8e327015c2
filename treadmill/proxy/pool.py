"""The dial-back pool: idle data connections a job's supervisor opened ahead of its clients.

Control minor 2 (``docs/proxy.md``, "The dial-back pool"): ``welcome.pool`` tells a
supervisor how many idle data connections the proxy accepts from its job
(``pool.per_job``); each presents ``TREADMILL-POOL/1 <job> <token>`` and waits. A
client that arrives takes one at once instead of waiting for a ``connect`` round trip.
:class:`DataPool` is the accounting: which connections wait for which job, and the
two bounds, per job and for the whole proxy (``pool.max``), so that no supervisor,
buggy or malicious, holds more sockets here than the settings allow.
"""

from __future__ import annotations

from collections import Counter
from typing import Generic, TypeVar

__all__ = ["DataPool"]

T = TypeVar("T")


class DataPool(Generic[T]):
    """Idle pooled connections per job, bounded per job and in total.

    The newest connection is taken first (it is the likeliest to be alive);
    taking, discarding and closing are O(1) per connection.
    """

    def __init__(self, per_job: int, total: int):
        self.per_job = per_job
        self.total = total
        self.jobs: dict[str, dict[T, None]] = {}
        self.size = 0
        self.counts: Counter[str] = Counter()

    def waiting(self, job: str) -> int:
        """Idle connections of ``job``."""
        return len(self.jobs.get(job, ()))

    def add(self, job: str, conn: T) -> bool:
        """File ``conn`` under ``job``; False (refused, the caller closes it) when the job
        or the proxy holds as many as allowed."""
        held = self.jobs.get(job)
        if held is not None and conn in held:
            return True
        if (held is not None and len(held) >= self.per_job) or self.per_job <= 0:
            self.counts["refused_job"] += 1
            return False
        if self.size >= self.total:
            self.counts["refused_total"] += 1
            return False
        if held is None:
            held = self.jobs[job] = {}
        held[conn] = None
        self.size += 1
        self.counts["added"] += 1
        return True

    def take(self, job: str) -> T | None:
        """The newest idle connection of ``job``, no longer in the pool; None if none."""
        held = self.jobs.get(job)
        if not held:
            return None
        conn, _ = held.popitem()
        self.size -= 1
        if not held:
            del self.jobs[job]
        self.counts["taken"] += 1
        return conn

    def discard(self, job: str, conn: T) -> bool:
        """Forget ``conn`` (it closed while idle); whether it was in the pool."""
        held = self.jobs.get(job)
        if held is None or conn not in held:
            return False
        del held[conn]
        self.size -= 1
        if not held:
            del self.jobs[job]
        return True

    def close_job(self, job: str) -> list[T]:
        """Forget every idle connection of ``job`` and return them (for the caller to
        close): the job ended, or its control connection went."""
        held = self.jobs.pop(job, None)
        if not held:
            return []
        self.size -= len(held)
        return list(held)
