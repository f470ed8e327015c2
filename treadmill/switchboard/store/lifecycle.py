"""A job's state transition, and what follows a termination: host health, the
restart policy, wiping secrets."""

from __future__ import annotations

from treadmill.switchboard import jobstate
from treadmill.switchboard.database import Cursor
from treadmill.switchboard.jobstate import Reason, Stage, State, Status
from treadmill.switchboard.store.base import INSTANCE_DEAD_AFTER, LIVE_INSTANCE
from treadmill.switchboard.store.errors import NotFound


async def transition(cur: Cursor, job_id: str, new: Status, *, exit_status: int | None = None,
                     message: str | None = None, max_host_failures: int = 3) -> bool:
    """Apply a state transition inside the caller's transaction.

    Locks the job row, checks the move with :func:`jobstate.check`, stamps the
    state's timestamp, keeps the first termination reason, and appends the
    job event. Returns False (and writes nothing) when the job is already in
    the requested status.
    """
    row = await cur.fetchone(
        "SELECT state, stage, termination_reason, "
        "extract(epoch FROM clock_timestamp() - created_at) AS since_created, "
        "extract(epoch FROM clock_timestamp() - assigned_at) AS since_assigned "
        "FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
    if row is None:
        raise NotFound(f"no job {job_id}")
    current_state = State(row["state"])
    reason = row["termination_reason"]
    current = Status(
        current_state,
        Stage(row["stage"]) if row["stage"] else None,
        Reason(reason) if reason and current_state in (State.TERMINATING,
                                                       State.TERMINATED) else None)
    if not jobstate.check(current, new):
        return False
    final_reason = current.reason or new.reason
    stamp = jobstate.TIMESTAMP_COLUMN.get(new.state)
    sets = ["state = %(state)s", "stage = %(stage)s", "updated_at = now()",
            "event_seq = event_seq + 1"]
    if stamp:
        sets.append(f"{stamp} = coalesce({stamp}, now())")
    if new.state is State.ASSIGNED:
        sets.append("deadline = now() + make_interval(secs => timeout)")
    if final_reason is not None:
        sets.append("termination_reason = %(reason)s")
    if exit_status is not None:
        sets.append("exit_status = %(exit_status)s")
    if new.state is State.TERMINATED:
        sets.append("endpoints = '[]'")  # Its tunnels close with it.
    if message is not None:
        sets.append("termination_message = %(message)s")
    params = {"id": job_id, "state": new.state.value,
              "stage": new.stage.value if new.stage else None,
              "reason": final_reason.value if final_reason else None,
              "exit_status": exit_status, "message": message}
    updated = await cur.fetchone(
        f"UPDATE jobs SET {', '.join(sets)} WHERE id = %(id)s RETURNING event_seq", params)
    assert updated is not None
    await cur.execute(
        "INSERT INTO job_events (job_id, seq, state, stage, reason, exit_status, message) "
        "VALUES (%(id)s, %(seq)s, %(state)s, %(stage)s, %(reason)s, %(exit_status)s, "
        "%(message)s)", {**params, "seq": updated["event_seq"]})
    # Reported to this instance's metrics once the transaction commits.
    if new.state is State.ASSIGNED and current_state is State.QUEUED:
        cur.note("queue_wait", float(row["since_created"]))
    elif new.state in (State.INITIALIZING, State.READY) and current_state is State.ASSIGNED \
            and row["since_assigned"] is not None:
        cur.note("dispatch", float(row["since_assigned"]))
    elif new.state is State.TERMINATED:
        cur.note("terminated", final_reason.value if final_reason else "none")
    if new.state is State.TERMINATED:
        if final_reason is not None:
            await _after_termination(cur, job_id, final_reason, max_host_failures)
        # After the restart policy copied the parameters to a successor.
        await cur.execute(_WIPE_SECRETS, {"id": job_id})
    return True


async def _link_died_with_instance(cur: Cursor, host_id: int) -> bool:
    """Whether the host's link was held by a switchboard instance that died (then an
    unreachable host is the instance's fault, not the host's)."""
    row = await cur.fetchone(
        "SELECT h.instance_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM instances i "
        f"WHERE i.id = h.instance_id AND {LIVE_INSTANCE}) AS died FROM hosts h "
        "WHERE h.id = %(id)s", {"id": host_id, "dead": INSTANCE_DEAD_AFTER})
    return bool(row and row["died"])


# Secret parameter values end with their job: the names stay, and the fact that
# they were secret, but the values are replaced by empty strings.
_WIPE_SECRETS = """
    UPDATE jobs SET parameters = (
        SELECT jsonb_object_agg(key, CASE WHEN value->>'secret' = 'true'
                                     THEN jsonb_build_object('value', '', 'secret', true)
                                     ELSE value END)
        FROM jsonb_each(parameters))
    WHERE id = %(id)s AND EXISTS (
        SELECT 1 FROM jsonb_each(parameters) WHERE value->>'secret' = 'true')"""


async def _after_termination(cur: Cursor, job_id: str, reason: Reason,
                             max_host_failures: int) -> None:
    """Host health and the restart policy, in the terminating transaction."""
    job = await cur.fetchone(
        "SELECT host_id, restarts_left FROM jobs WHERE id = %s", (job_id,))
    assert job is not None
    if job["host_id"] is not None:
        if reason in jobstate.HOST_SIDE_REASONS and not (
                reason is Reason.HOST_UNREACHABLE
                and await _link_died_with_instance(cur, job["host_id"])):
            await cur.execute(
                "UPDATE hosts SET consecutive_failures = consecutive_failures + 1, "
                "healthy = healthy AND consecutive_failures + 1 < %s WHERE id = %s",
                (max_host_failures, job["host_id"]))
        elif reason in (Reason.WORKLOAD_EXITED, Reason.USER_TERMINATED,
                        Reason.EXECUTION_TIMEOUT):
            await cur.execute(
                "UPDATE hosts SET consecutive_failures = 0 WHERE id = %s AND "
                "consecutive_failures <> 0", (job["host_id"],))
    if reason in jobstate.RESTARTABLE_REASONS and job["restarts_left"] > 0:
        successor = await cur.fetchone(
            "INSERT INTO jobs (owner_id, label, image_name, image_digest, image_stores, tags, "
            "parameters, timeout, queue_timeout, max_restarts, restarts_left, restart_of, "
            "queue_deadline, event_seq, log_servers, results, image_kind, reservation, "
            "hold_on_failure) SELECT owner_id, label, image_name, image_digest, image_stores, "
            "tags, parameters, "
            "timeout, queue_timeout, max_restarts, restarts_left - 1, id, "
            "now() + make_interval(secs => queue_timeout), 1, log_servers, results, image_kind, "
            "reservation, hold_on_failure "
            "FROM jobs "
            "WHERE id = %s "
            "RETURNING id", (job_id,))
        assert successor is not None
        await cur.execute(
            "INSERT INTO job_events (job_id, seq, state, message) VALUES (%s, 1, 'queued', %s)",
            (successor["id"], f"restart of {job_id} after {reason.value}"))
        await cur.execute(
            "INSERT INTO grants (job_id, user_id, privilege) SELECT %s, user_id, privilege "
            "FROM grants WHERE job_id = %s", (successor["id"], job_id))
