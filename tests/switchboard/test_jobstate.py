"""The job state machine, one test per row of its table.

Two tables drive :func:`jobstate.check`:

- ``ROWS``, written by hand: the transitions that matter, each with its
  expected outcome spelled out (``True`` a change, ``False`` an idempotent
  no-op, ``REFUSED`` an :class:`InvalidTransition`);
- the exhaustive cross product of every valid status with every other,
  judged by an oracle built from literal tables below (a state ranking and a
  reason-by-state grid), not from the module's own ``NEXT``/``REASON_FROM``.

``docs/jobs.md`` draws the same table for users.
"""

from __future__ import annotations

import itertools

import pytest

from treadmill.switchboard import jobstate
from treadmill.switchboard.jobstate import (
    InvalidTransition,
    Reason,
    Stage,
    State,
    Status,
    check,
)

REFUSED = "refused"

# -- shorthands ----------------------------------------------------------------

QUEUED = Status(State.QUEUED)
ASSIGNED = Status(State.ASSIGNED)
READY = Status(State.READY)


def init(stage: str) -> Status:
    return Status(State.INITIALIZING, stage=Stage(stage))


def stopping(reason: str) -> Status:
    return Status(State.TERMINATING, reason=Reason(reason))


def ended(reason: str) -> Status:
    return Status(State.TERMINATED, reason=Reason(reason))


def _label(status: Status) -> str:
    if status.stage is not None:
        return f"{status.state}({status.stage})"
    if status.reason is not None:
        return f"{status.state}({status.reason})"
    return str(status.state)


def _row(current: Status, new: Status, expected: bool | str):
    return pytest.param(current, new, expected, id=f"{_label(current)}->{_label(new)}")


def _assert_outcome(current: Status, new: Status, expected: bool | str) -> None:
    if expected == REFUSED:
        with pytest.raises(InvalidTransition):
            check(current, new)
    else:
        assert check(current, new) is expected


# -- the hand-written table ------------------------------------------------------

ROWS = [
    # Allowed forward moves.
    _row(QUEUED, ASSIGNED, True),
    _row(QUEUED, ended("user_terminated"), True),
    _row(QUEUED, ended("queue_timeout"), True),
    _row(QUEUED, ended("internal_error"), True),
    _row(ASSIGNED, init("starting"), True),
    _row(ASSIGNED, init("booting"), True),  # a host may report a later stage first
    _row(ASSIGNED, READY, True),  # a host with nothing to prepare
    _row(ASSIGNED, stopping("user_terminated"), True),
    _row(ASSIGNED, stopping("execution_timeout"), True),
    _row(ASSIGNED, ended("host_start_failure"), True),
    _row(ASSIGNED, ended("image_error"), True),
    _row(ASSIGNED, ended("host_unreachable"), True),
    _row(init("starting"), READY, True),
    _row(init("booting"), READY, True),
    _row(init("provisioning"), stopping("execution_timeout"), True),
    _row(init("fetching_image"), ended("image_error"), True),
    _row(init("booting"), ended("host_start_failure"), True),
    _row(init("allocating"), ended("host_dropped_job"), True),
    _row(READY, stopping("user_terminated"), True),
    _row(READY, stopping("execution_timeout"), True),
    _row(READY, ended("workload_exited"), True),
    _row(READY, ended("host_unreachable"), True),
    _row(READY, ended("host_dropped_job"), True),
    _row(READY, ended("internal_error"), True),
    _row(stopping("user_terminated"), ended("user_terminated"), True),
    # Finishing a termination is allowed whatever reason it carries: the
    # reason that began it is the one kept (by the store).
    _row(stopping("user_terminated"), ended("workload_exited"), True),
    _row(stopping("execution_timeout"), ended("queue_timeout"), True),
    _row(stopping("host_unreachable"), ended("image_error"), True),
    # Stage progress: forward (possibly skipping stages) is a change...
    _row(init("starting"), init("fetching_image"), True),
    _row(init("fetching_image"), init("allocating"), True),
    _row(init("allocating"), init("provisioning"), True),
    _row(init("provisioning"), init("booting"), True),
    _row(init("starting"), init("booting"), True),
    # ...backward is refused...
    _row(init("fetching_image"), init("starting"), REFUSED),
    _row(init("provisioning"), init("allocating"), REFUSED),
    _row(init("booting"), init("starting"), REFUSED),
    _row(init("booting"), init("provisioning"), REFUSED),
    # ...and the same stage again is a no-op.
    _row(init("starting"), init("starting"), False),
    _row(init("booting"), init("booting"), False),
    # Idempotent repeats.
    _row(QUEUED, QUEUED, False),
    _row(ASSIGNED, ASSIGNED, False),
    _row(READY, READY, False),
    _row(stopping("user_terminated"), stopping("user_terminated"), False),
    _row(ended("workload_exited"), ended("workload_exited"), False),
    _row(ended("queue_timeout"), ended("queue_timeout"), False),
    # A second request to stop keeps the first (and changes nothing).
    _row(stopping("user_terminated"), stopping("execution_timeout"), False),
    _row(stopping("execution_timeout"), stopping("user_terminated"), False),
    _row(stopping("host_unreachable"), stopping("workload_exited"), False),
    # Moves that skip or go back.
    _row(QUEUED, init("starting"), REFUSED),
    _row(QUEUED, READY, REFUSED),
    _row(QUEUED, stopping("user_terminated"), REFUSED),  # a queued job has no host to stop
    _row(ASSIGNED, QUEUED, REFUSED),
    _row(init("starting"), QUEUED, REFUSED),
    _row(init("starting"), ASSIGNED, REFUSED),
    _row(READY, init("booting"), REFUSED),
    _row(READY, ASSIGNED, REFUSED),
    _row(READY, QUEUED, REFUSED),
    _row(stopping("user_terminated"), READY, REFUSED),
    _row(stopping("user_terminated"), init("starting"), REFUSED),
    _row(stopping("user_terminated"), ASSIGNED, REFUSED),
    _row(stopping("user_terminated"), QUEUED, REFUSED),
    # Reasons from states they do not apply to.
    _row(QUEUED, ended("workload_exited"), REFUSED),
    _row(QUEUED, ended("execution_timeout"), REFUSED),
    _row(QUEUED, ended("image_error"), REFUSED),
    _row(QUEUED, ended("host_start_failure"), REFUSED),
    _row(QUEUED, ended("host_dropped_job"), REFUSED),
    _row(QUEUED, ended("host_unreachable"), REFUSED),
    _row(ASSIGNED, ended("queue_timeout"), REFUSED),
    _row(ASSIGNED, stopping("queue_timeout"), REFUSED),
    _row(init("starting"), ended("queue_timeout"), REFUSED),
    _row(READY, ended("queue_timeout"), REFUSED),
    _row(READY, stopping("image_error"), REFUSED),
    _row(READY, ended("image_error"), REFUSED),
    _row(READY, ended("host_start_failure"), REFUSED),
    # Nothing leaves terminated, not even to another reason.
    _row(ended("workload_exited"), QUEUED, REFUSED),
    _row(ended("user_terminated"), ASSIGNED, REFUSED),
    _row(ended("host_dropped_job"), init("starting"), REFUSED),
    _row(ended("host_unreachable"), READY, REFUSED),
    _row(ended("user_terminated"), stopping("user_terminated"), REFUSED),
    _row(ended("queue_timeout"), ended("user_terminated"), REFUSED),
    _row(ended("workload_exited"), ended("execution_timeout"), REFUSED),
]


@pytest.mark.parametrize(("current", "new", "expected"), ROWS)
def test_transition(current: Status, new: Status, expected: bool | str):
    _assert_outcome(current, new, expected)


# -- every reason from every state ------------------------------------------------

# Which states each reason may end a job from: a literal grid, the table
# docs/jobs.md shows. Columns: queued, assigned, initializing, ready, terminating.
_COLUMNS = (State.QUEUED, State.ASSIGNED, State.INITIALIZING, State.READY, State.TERMINATING)
REASON_GRID = {
    #                            Q  A  I  R  T
    Reason.WORKLOAD_EXITED:     (0, 1, 1, 1, 1),
    Reason.USER_TERMINATED:     (1, 1, 1, 1, 1),
    Reason.QUEUE_TIMEOUT:       (1, 0, 0, 0, 0),
    Reason.EXECUTION_TIMEOUT:   (0, 1, 1, 1, 1),
    Reason.IMAGE_ERROR:         (0, 1, 1, 0, 1),
    Reason.HOST_START_FAILURE:  (0, 1, 1, 0, 1),
    Reason.HOST_DROPPED_JOB:    (0, 1, 1, 1, 1),
    Reason.HOST_UNREACHABLE:    (0, 1, 1, 1, 1),
    Reason.INTERNAL_ERROR:      (1, 1, 1, 1, 1),
}
ALLOWED_FROM = {
    reason: {state for state, ok in zip(_COLUMNS, row, strict=True) if ok}
    for reason, row in REASON_GRID.items()
}


def test_reason_grid_matches_module():
    assert set(REASON_GRID) == set(Reason)
    assert {reason: set(states) for reason, states in jobstate.REASON_FROM.items()} \
        == ALLOWED_FROM


# One representative status per non-terminated state.
_FROM = {
    State.QUEUED: QUEUED,
    State.ASSIGNED: ASSIGNED,
    State.INITIALIZING: init("allocating"),
    State.READY: READY,
    State.TERMINATING: stopping("internal_error"),
}


def _reason_rows():
    for reason in Reason:
        for state, current in _FROM.items():
            allowed = state in ALLOWED_FROM[reason]
            # Straight to terminated: allowed where the grid says so, except
            # that finishing a termination ignores the new reason.
            yield _row(current, ended(reason), True if allowed or state is State.TERMINATING
                       else REFUSED)
            # To terminating: only a job that holds a host can be stopped;
            # from terminating it is a repeat that keeps the first reason.
            if state is State.TERMINATING:
                yield _row(current, stopping(reason), False)
            elif state is State.QUEUED:
                yield _row(current, stopping(reason), REFUSED)
            else:
                yield _row(current, stopping(reason), True if allowed else REFUSED)


@pytest.mark.parametrize(("current", "new", "expected"), list(_reason_rows()))
def test_reason(current: Status, new: Status, expected: bool | str):
    _assert_outcome(current, new, expected)


@pytest.mark.parametrize("reason", list(Reason))
@pytest.mark.parametrize("current", [ended(r) for r in Reason], ids=_label)
def test_nothing_after_terminated(current: Status, reason: Reason):
    for new in (QUEUED, ASSIGNED, init("starting"), READY, stopping(reason)):
        with pytest.raises(InvalidTransition):
            check(current, new)
    if reason is current.reason:
        assert check(current, ended(reason)) is False
    else:
        with pytest.raises(InvalidTransition):
            check(current, ended(reason))


# -- the exhaustive cross product -------------------------------------------------

# The lifecycle as a ranking: a job only moves to a later state; a queued job
# moves only to assigned (or straight to terminated).
RANK = [State.QUEUED, State.ASSIGNED, State.INITIALIZING, State.READY, State.TERMINATING,
        State.TERMINATED]
STAGES = ["starting", "fetching_image", "allocating", "provisioning", "booting"]


def _all_statuses() -> list[Status]:
    statuses = [QUEUED, ASSIGNED, *(init(s) for s in STAGES), READY]
    statuses += [stopping(r) for r in Reason]
    statuses += [ended(r) for r in Reason]
    return statuses


def _oracle(current: Status, new: Status) -> bool | str:
    if current == new:
        return False
    if current.state is State.TERMINATED:
        return REFUSED
    if current.state is new.state:
        if current.state is State.INITIALIZING:
            forward = STAGES.index(new.stage) > STAGES.index(current.stage)
            return True if forward else REFUSED
        if current.state is State.TERMINATING:
            return False
        return REFUSED
    if RANK.index(new.state) < RANK.index(current.state):
        return REFUSED
    if current.state is State.QUEUED and new.state not in (State.ASSIGNED, State.TERMINATED):
        return REFUSED
    if (new.reason is not None and current.state is not State.TERMINATING
            and current.state not in ALLOWED_FROM[new.reason]):
        return REFUSED
    return True


_PAIRS = [_row(current, new, _oracle(current, new))
          for current, new in itertools.product(_all_statuses(), repeat=2)]


@pytest.mark.parametrize(("current", "new", "expected"), _PAIRS)
def test_cross_product(current: Status, new: Status, expected: bool | str):
    _assert_outcome(current, new, expected)


def test_hand_table_agrees_with_oracle():
    """The literal rows and the oracle tell the same story."""
    for param in ROWS:
        current, new, expected = param.values
        assert _oracle(current, new) == expected, param.id


def test_forward_moves_match_module():
    expected = {
        State.QUEUED: {State.ASSIGNED, State.TERMINATED},
        State.ASSIGNED: {State.INITIALIZING, State.READY, State.TERMINATING, State.TERMINATED},
        State.INITIALIZING: {State.READY, State.TERMINATING, State.TERMINATED},
        State.READY: {State.TERMINATING, State.TERMINATED},
        State.TERMINATING: {State.TERMINATED},
        State.TERMINATED: set(),
    }
    assert {state: set(nxt) for state, nxt in jobstate.NEXT.items()} == expected


# -- statuses ------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    pytest.param({"state": State.QUEUED, "stage": Stage.STARTING}, id="queued-with-stage"),
    pytest.param({"state": State.ASSIGNED, "stage": Stage.STARTING}, id="assigned-with-stage"),
    pytest.param({"state": State.READY, "stage": Stage.BOOTING}, id="ready-with-stage"),
    pytest.param({"state": State.TERMINATING, "stage": Stage.BOOTING,
                  "reason": Reason.USER_TERMINATED}, id="terminating-with-stage"),
    pytest.param({"state": State.TERMINATED, "stage": Stage.BOOTING,
                  "reason": Reason.WORKLOAD_EXITED}, id="terminated-with-stage"),
    pytest.param({"state": State.INITIALIZING}, id="initializing-without-stage"),
    pytest.param({"state": State.QUEUED, "reason": Reason.QUEUE_TIMEOUT},
                 id="queued-with-reason"),
    pytest.param({"state": State.ASSIGNED, "reason": Reason.HOST_START_FAILURE},
                 id="assigned-with-reason"),
    pytest.param({"state": State.INITIALIZING, "stage": Stage.FETCHING_IMAGE,
                  "reason": Reason.IMAGE_ERROR}, id="initializing-with-reason"),
    pytest.param({"state": State.READY, "reason": Reason.WORKLOAD_EXITED},
                 id="ready-with-reason"),
    pytest.param({"state": State.TERMINATED}, id="terminated-without-reason"),
])
def test_invalid_status(kwargs):
    with pytest.raises(InvalidTransition):
        Status(**kwargs)


@pytest.mark.parametrize("status", _all_statuses(), ids=_label)
def test_valid_status(status: Status):
    assert Status(status.state, status.stage, status.reason) == status


def test_invalid_transition_is_a_value_error():
    assert issubclass(InvalidTransition, ValueError)


# -- the other tables -----------------------------------------------------------


def test_stage_order():
    assert [stage.value for stage in sorted(Stage, key=jobstate.STAGE_ORDER.__getitem__)] \
        == STAGES


def test_timestamp_columns():
    assert set(jobstate.TIMESTAMP_COLUMN) == set(State) - {State.QUEUED}
    assert jobstate.TIMESTAMP_COLUMN == {
        State.ASSIGNED: "assigned_at",
        State.INITIALIZING: "started_at",
        State.READY: "ready_at",
        State.TERMINATING: "terminating_at",
        State.TERMINATED: "terminated_at",
    }


def test_active_states():
    assert set(jobstate.ACTIVE) == {
        State.ASSIGNED, State.INITIALIZING, State.READY, State.TERMINATING}


def test_reason_sets():
    assert jobstate.HOST_SIDE_REASONS == {
        Reason.HOST_START_FAILURE, Reason.HOST_DROPPED_JOB, Reason.HOST_UNREACHABLE}
    assert jobstate.RESTARTABLE_REASONS == {Reason.HOST_DROPPED_JOB, Reason.HOST_UNREACHABLE}
    assert jobstate.RESTARTABLE_REASONS <= jobstate.HOST_SIDE_REASONS


def test_wire_values():
    """The values stored in the database and shown by the API."""
    assert [s.value for s in State] == [
        "queued", "assigned", "initializing", "ready", "terminating", "terminated"]
    assert [r.value for r in Reason] == [
        "workload_exited", "user_terminated", "queue_timeout", "execution_timeout",
        "image_error", "host_start_failure", "host_dropped_job", "host_unreachable",
        "internal_error"]
