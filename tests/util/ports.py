"""Free loopback ports, chosen by the operating system (best effort: free right now)."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_range(size: int) -> tuple[int, int]:
    """A run of ``size`` consecutive ports that are free right now: (first, last)."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 30000)
        ok = True
        for port in range(first, first + size):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return first, first + size - 1
    raise RuntimeError("no free port range")
