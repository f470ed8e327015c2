"""Reconciliation: what the database expects on a host versus what its supervisor runs.

:func:`decide` is the table of ``docs/protocol.md`` (cases R1 to R8) as a pure
function; :mod:`treadmill.switchboard.links` carries out its actions.
"""

from __future__ import annotations

from dataclasses import dataclass

from treadmill.switchboard.jobstate import STAGE_ORDER, Reason, Stage, State


@dataclass(frozen=True)
class Expected:
    """The job the database has on the host (a job holding it)."""

    job_id: str
    state: State
    stage: Stage | None = None
    reason: Reason | None = None


@dataclass(frozen=True)
class Reported:
    """The job the supervisor says it runs."""

    job_id: str
    state: State
    stage: Stage | None = None


@dataclass(frozen=True)
class Start:
    """Send ``start_job`` (again)."""

    job_id: str


@dataclass(frozen=True)
class Stop:
    """Send ``stop_job``."""

    job_id: str
    reason: Reason


@dataclass(frozen=True)
class End:
    """End the job in the database with ``reason`` (restart policy applies)."""

    job_id: str
    reason: Reason
    message: str


@dataclass(frozen=True)
class Advance:
    """Move the job to the state the supervisor reports, which is ahead."""

    job_id: str
    state: State
    stage: Stage | None


Action = Start | Stop | End | Advance

_ORDER = {State.ASSIGNED: 0, State.INITIALIZING: 1, State.READY: 2, State.TERMINATING: 3}


def _ahead(reported: Reported, expected: Expected) -> bool:
    a, b = _ORDER[reported.state], _ORDER[expected.state]
    if a != b:
        return a > b
    if reported.state is State.INITIALIZING and reported.stage and expected.stage:
        return STAGE_ORDER[reported.stage] > STAGE_ORDER[expected.stage]
    return False


def _idle(expected: Expected) -> list[Action]:
    if expected.state is State.ASSIGNED:
        return [Start(expected.job_id)]  # R2
    if expected.state is State.TERMINATING:
        reason = expected.reason or Reason.USER_TERMINATED
        return [End(expected.job_id, reason, "the host had already stopped the job")]  # R6
    return [End(expected.job_id, Reason.HOST_DROPPED_JOB,
                "the supervisor no longer runs the job")]  # R3


def decide(expected: Expected | None, reported: Reported | None) -> list[Action]:
    """The actions that bring the host and the database back in agreement."""
    if expected is None:
        if reported is None:
            return []  # R1
        return [Stop(reported.job_id, Reason.HOST_DROPPED_JOB)]  # R7
    if reported is None:
        return _idle(expected)
    if reported.job_id != expected.job_id:
        return [Stop(reported.job_id, Reason.HOST_DROPPED_JOB), *_idle(expected)]  # R8
    if expected.state is State.TERMINATING:
        return [Stop(expected.job_id, expected.reason or Reason.USER_TERMINATED)]  # R5
    if _ahead(reported, expected):
        return [Advance(expected.job_id, reported.state, reported.stage)]  # R4
    return []  # R4
