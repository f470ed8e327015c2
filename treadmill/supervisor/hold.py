"""Holding a failed job's host for debugging (``JobStart.hold_on_failure``, minor 6).

:func:`hold_for` is the policy: which ends of a job keep its host (and VM or board)
as it is; :class:`Hold` is one such hold in the runner (``runner.py``): the ended job,
when the hold expires, and a Deferred that fires once the driver has torn down.
:func:`agent_parameters` tells a guest's agent that its job is held on failure
(``treadmill.hold_on_failure``), so that an image can stay up after a failing ``exit``.
``docs/jobs.md`` (Holding a failed job's host) describes the whole feature.

A hold is journaled (``journal.py``: ``held.json``, the ended ``JobStart`` and when the
hold ends) so that a restarted supervisor re-adopts the held host
(``adopt_held``, ``docs/supervisor.md``) or, if its driver cannot, ends the hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed

from treadmill.common.logging import rfc3339

__all__ = ["END_REASONS", "HOLD_PARAMETER", "RELEASE_WAIT", "Hold", "agent_parameters",
           "end_reason", "hold_change", "hold_for", "hold_record"]

RELEASE_WAIT = 60.0
"""Seconds a release waits for the driver to report the held job's teardown."""

HOLD_PARAMETER = "treadmill.hold_on_failure"
"""The agent parameter (seconds, as a string) that tells a guest its job is held if it
fails: an image that honours it stays up after a failing ``exit`` (docs/agent.md)."""


def hold_for(job: dict[str, Any], reason: str, exit_status: int | None) -> float | None:
    """Seconds to hold ``job``'s host after it ended with ``reason`` (and ``exit_status``),
    or None: only a failed workload (a non-zero exit status) or an execution timeout is
    held, and only when the job asked for it; a cancelled job never is."""
    seconds = job.get("hold_on_failure")
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) \
            or not math.isfinite(seconds) or seconds <= 0:
        return None
    failed = (reason == "workload_exited" and exit_status not in (None, 0)) \
        or reason == "execution_timeout"
    return float(seconds) if failed else None


def agent_parameters(job: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """``parameters`` (a job's, as its agent gets them) with :data:`HOLD_PARAMETER` when
    the job is held on failure (a job parameter of that name is replaced)."""
    seconds = hold_for(job, "execution_timeout", None)
    out = {k: v for k, v in parameters.items() if k != HOLD_PARAMETER}
    if seconds is not None:
        out[HOLD_PARAMETER] = format(seconds, ".15g")
    return out


END_REASONS = {
    "released": "the hold was released (tml job cancel)",
    "expired": "the hold expired",
    "host_gone": "the held host went away by itself",
    "supervisor_restarted": "the supervisor restarted and could not re-adopt the held host",
}
"""Why a hold ended, as the ``events`` stream's ``hold: ended`` line says it."""


def end_reason(stop_reason: str) -> str:
    """The :data:`END_REASONS` key of a hold ended by a ``stop_job`` (or its expiry) with
    ``stop_reason``: ``user_terminated`` releases, ``execution_timeout`` expires."""
    return "released" if stop_reason == "user_terminated" else "expired"


def hold_change(job_id: str, change: str, at: float, *, until: float | None = None,
                reason: str | None = None) -> dict[str, Any]:
    """The ``events`` stream's line (as a dict) for a hold that ``change``-d
    (``started``, ``resumed`` after a restart, ``extended``, ``ended``) at ``at``: with
    ``until`` (when
    it ends) or ``reason`` (an :data:`END_REASONS` key, with its ``message``). Times are
    POSIX seconds, written as RFC 3339 UTC."""
    line: dict[str, Any] = {"job_id": job_id, "hold": change, "at": rfc3339(at)}
    if until is not None:
        line["until"] = rfc3339(until)
    if reason is not None:
        line["reason"] = reason
        line["message"] = END_REASONS.get(reason, reason)
    return line


def hold_record(job: dict[str, Any], until: float) -> dict[str, Any]:
    """The journal's record of a hold (``held.json``): the ended job's ``JobStart`` and
    until when (reactor seconds) its host is held."""
    return {"job": job, "until": until}


@dataclass(eq=False)
class Hold:
    """An ended job (``job``, its ``JobStart``, tokens as last renewed) whose host the
    runner keeps until ``until`` (reactor seconds)."""

    job: dict[str, Any]
    until: float
    timer: Any = None  # the expiry's IDelayedCall
    releasing: bool = False
    reason: str = "host_gone"  # why it ends (END_REASONS): a release or expiry says so
    ended: bool = False  # the driver reported the held job's end: its teardown is over
    _waiters: list[Deferred[None]] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return str(self.job["id"])

    def cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def wait(self) -> Deferred[None]:
        """Fires once the hold is over."""
        if self.ended:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def over(self) -> None:
        self.cancel_timer()
        self.ended = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
