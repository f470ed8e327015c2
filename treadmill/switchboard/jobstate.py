"""The job state machine: states, initializing stages, termination reasons.

Pure logic, no I/O. The data layer asks :func:`check` before it writes a
transition; ``docs/jobs.md`` draws the same table.

    queued → assigned → initializing(stage) → ready → terminating → terminated

Any non-terminal state may go straight to ``terminated`` when a reason allows
it (a queued job the user cancels never needs a host to stop it).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    INITIALIZING = "initializing"
    READY = "ready"
    TERMINATING = "terminating"
    TERMINATED = "terminated"


class Stage(StrEnum):
    """Stages of ``initializing``, in the order a host passes them."""

    STARTING = "starting"
    FETCHING_IMAGE = "fetching_image"
    ALLOCATING = "allocating"
    PROVISIONING = "provisioning"
    BOOTING = "booting"


class Reason(StrEnum):
    WORKLOAD_EXITED = "workload_exited"
    USER_TERMINATED = "user_terminated"
    QUEUE_TIMEOUT = "queue_timeout"
    EXECUTION_TIMEOUT = "execution_timeout"
    IMAGE_ERROR = "image_error"
    HOST_START_FAILURE = "host_start_failure"
    HOST_DROPPED_JOB = "host_dropped_job"
    HOST_UNREACHABLE = "host_unreachable"
    INTERNAL_ERROR = "internal_error"


STAGE_ORDER = {stage: i for i, stage in enumerate(Stage)}

ACTIVE = (State.ASSIGNED, State.INITIALIZING, State.READY, State.TERMINATING)
"""States in which a job holds a host."""

# Forward moves between states (excluding a state to itself).
NEXT: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.ASSIGNED, State.TERMINATED}),
    State.ASSIGNED: frozenset(
        {State.INITIALIZING, State.READY, State.TERMINATING, State.TERMINATED}),
    State.INITIALIZING: frozenset({State.READY, State.TERMINATING, State.TERMINATED}),
    State.READY: frozenset({State.TERMINATING, State.TERMINATED}),
    State.TERMINATING: frozenset({State.TERMINATED}),
    State.TERMINATED: frozenset(),
}

# The states from which each reason may end a job (or start its termination).
REASON_FROM: dict[Reason, frozenset[State]] = {
    Reason.WORKLOAD_EXITED: frozenset(ACTIVE),
    Reason.USER_TERMINATED: frozenset({State.QUEUED, *ACTIVE}),
    Reason.QUEUE_TIMEOUT: frozenset({State.QUEUED}),
    Reason.EXECUTION_TIMEOUT: frozenset(ACTIVE),
    Reason.IMAGE_ERROR: frozenset({State.ASSIGNED, State.INITIALIZING, State.TERMINATING}),
    Reason.HOST_START_FAILURE: frozenset(
        {State.ASSIGNED, State.INITIALIZING, State.TERMINATING}),
    Reason.HOST_DROPPED_JOB: frozenset(ACTIVE),
    Reason.HOST_UNREACHABLE: frozenset(ACTIVE),
    Reason.INTERNAL_ERROR: frozenset({State.QUEUED, *ACTIVE}),
}

HOST_SIDE_REASONS = frozenset({
    Reason.HOST_START_FAILURE, Reason.HOST_DROPPED_JOB, Reason.HOST_UNREACHABLE,
})
"""Reasons the host reports or causes; see :func:`blame` for which of them count
against its health."""


class Blame(StrEnum):
    """Whose fault a termination is, as host health sees it (``docs/operations.md``)."""

    JOB = "job"
    """The image, the workload or its user: never counts against the host."""
    HOST = "host"
    """Suspicious: counts against the host (``hosts.max_failures`` in a row ask for a
    health check)."""
    NONE = "none"
    """Nobody's, or Treadmill's own: neither counts nor clears a count."""


CLEARING_REASONS = frozenset({
    Reason.WORKLOAD_EXITED, Reason.USER_TERMINATED, Reason.EXECUTION_TIMEOUT,
})
"""Job-side ends that show the host can run a job: they clear its count of failures."""


def blame(reason: Reason, *, image_ran: bool = False, instance_died: bool = False,
          before_image: bool = False, bad_request: bool = False) -> Blame:
    """Whose fault a job's end is.

    ``host_dropped_job`` and ``host_unreachable`` are the host's (unless the
    switchboard instance holding its link died: ``instance_died``).
    ``host_start_failure`` is the job's when the host refused the start as a
    ``bad_request`` (its parameters); else the host's when it failed
    ``before_image`` (a refused start, or in ``starting``, before the image was
    fetched) or when the job's image is known to start (``image_ran``: some job
    with the same digest became ready). An image that never reached its agent
    anywhere is the job's fault, so a user's bad image cannot take a host out of
    service. Internal errors are Treadmill's; everything else is the job's.
    """
    if reason is Reason.HOST_START_FAILURE:
        if bad_request:
            return Blame.JOB
        return Blame.HOST if image_ran or before_image else Blame.JOB
    if reason is Reason.HOST_UNREACHABLE:
        return Blame.NONE if instance_died else Blame.HOST
    if reason is Reason.HOST_DROPPED_JOB:
        return Blame.HOST
    if reason is Reason.INTERNAL_ERROR:
        return Blame.NONE
    return Blame.JOB


RESTARTABLE_REASONS = frozenset({Reason.HOST_DROPPED_JOB, Reason.HOST_UNREACHABLE})
"""Reasons after which a job with restarts left is enqueued again."""


class InvalidTransition(ValueError):
    """A requested transition is not allowed from the job's current state."""


@dataclass(frozen=True)
class Status:
    """Where a job is: its state, its stage while initializing, and why it ends."""

    state: State
    stage: Stage | None = None
    reason: Reason | None = None

    def __post_init__(self) -> None:
        if (self.stage is not None) != (self.state is State.INITIALIZING):
            raise InvalidTransition(f"a stage goes with initializing only, not {self.state}")
        if self.reason is not None and self.state not in (State.TERMINATING, State.TERMINATED):
            raise InvalidTransition(f"a reason goes with terminating or terminated, "
                                    f"not {self.state}")
        if self.state is State.TERMINATED and self.reason is None:
            raise InvalidTransition("terminated needs a reason")


def check(current: Status, new: Status) -> bool:
    """Whether moving from ``current`` to ``new`` changes anything.

    Returns ``False`` for a repeat of the current status (commands are
    idempotent), ``True`` for an allowed move, and raises
    :class:`InvalidTransition` otherwise.
    """
    if new == current:
        return False
    if current.state is State.TERMINATED:
        raise InvalidTransition("the job has already terminated")
    if new.state is current.state:
        if new.state is State.INITIALIZING:
            assert current.stage is not None and new.stage is not None
            if STAGE_ORDER[new.stage] < STAGE_ORDER[current.stage]:
                raise InvalidTransition(
                    f"stage {new.stage} does not follow {current.stage}")
            return True
        if new.state is State.TERMINATING:
            # A second request to stop keeps the first reason.
            return False
        raise InvalidTransition(f"already {current.state}")
    if new.state not in NEXT[current.state]:
        raise InvalidTransition(f"{current.state} cannot become {new.state}")
    if new.reason is not None:
        origin = current.state
        allowed = REASON_FROM[new.reason]
        # Finishing a termination keeps whatever reason began it.
        if origin is not State.TERMINATING and origin not in allowed:
            raise InvalidTransition(f"{new.reason} cannot end a job that is {origin}")
    return True


TIMESTAMP_COLUMN: dict[State, str] = {
    State.ASSIGNED: "assigned_at",
    State.INITIALIZING: "started_at",
    State.READY: "ready_at",
    State.TERMINATING: "terminating_at",
    State.TERMINATED: "terminated_at",
}
"""The job column stamped when a job first enters each state."""
