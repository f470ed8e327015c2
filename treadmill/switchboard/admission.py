"""Admission control for supervisor link handshakes.

A fleet that connects at once (a failover, a restart, a new balancer) would
otherwise queue hundreds of handshakes behind the database pool, and the
instance's reactor would be too busy to answer a load balancer's health check
in time: marked down, the instance loses every session and the fleet comes
back into the same overload. :class:`HandshakeGate` lets at most ``limit``
handshakes (from the WebSocket upgrade until the link is registered or
refused) be under way; beyond it the upgrade is answered ``503`` with
``Retry-After`` before any database work, and the supervisor retries with
backoff and jitter (``treadmill.supervisor.link``).
"""

from __future__ import annotations

__all__ = ["RETRY_AFTER", "HandshakeGate", "Slot"]

RETRY_AFTER = 1
"""Seconds a refused supervisor is told to wait (it adds jitter and backoff)."""


class Slot:
    """One admitted handshake; :meth:`release` is idempotent, so every way a
    handshake can end (registered, refused, closed, timed out) may call it."""

    __slots__ = ("_gate",)

    def __init__(self, gate: HandshakeGate):
        self._gate: HandshakeGate | None = gate

    @property
    def held(self) -> bool:
        return self._gate is not None

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._in_progress -= 1


class HandshakeGate:
    """At most ``limit`` handshakes in progress; counts what it admits and refuses."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"the handshake limit must be at least 1, not {limit}")
        self.limit = limit
        self._in_progress = 0
        self.admitted = 0
        self.refused = 0
        self.peak = 0  # the most in progress at once

    @property
    def in_progress(self) -> int:
        return self._in_progress

    @property
    def full(self) -> bool:
        return self._in_progress >= self.limit

    def refuse(self) -> None:
        """Count a handshake turned away without asking for a slot (the API route)."""
        self.refused += 1

    def acquire(self) -> Slot | None:
        """A slot, or ``None`` (counted as refused) when ``limit`` are in progress."""
        if self.full:
            self.refused += 1
            return None
        self._in_progress += 1
        self.admitted += 1
        self.peak = max(self.peak, self._in_progress)
        return Slot(self)
