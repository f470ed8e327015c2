"""Free loopback ports for daemons the tests start (best effort: free right now).

The ports come from below the kernel's ephemeral range (32768 and up on Linux), where
outgoing connections and servers listening on port 0 never take them between the
choice and the daemon's bind; each pytest-xdist worker draws from its own slice, and a
process never hands out the same port twice.
"""

from __future__ import annotations

import os
import random
import socket

SINGLE = (10000, 20000)
"""Where :func:`free_port` draws from."""
RANGES = (20000, 30000)
"""Where :func:`free_range` draws from (the devstack's runs of ports)."""

_given: set[int] = set()
_rng = random.Random()


def _slice(low: int, high: int) -> tuple[int, int]:
    """This xdist worker's part of [low, high)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker) if worker.isdigit() else 0
    size = (high - low) // max(count, 1)
    start = low + (index % max(count, 1)) * size
    return start, start + size


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    low, high = _slice(*SINGLE)
    for _ in range(1000):
        port = _rng.randrange(low, high)
        if port not in _given and _bindable(port):
            _given.add(port)
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def free_range(size: int) -> tuple[int, int]:
    """A run of ``size`` consecutive ports that are free right now: (first, last)."""
    low, high = _slice(*RANGES)
    for _ in range(200):
        first = _rng.randrange(low, high - size)
        ports = range(first, first + size)
        if not _given.intersection(ports) and all(_bindable(p) for p in ports):
            _given.update(ports)
            return first, first + size - 1
    raise RuntimeError("no free port range")
