"""A job's state transition, and what follows a termination: host health (see
:mod:`~treadmill.switchboard.store.health`: a health check may start on the host at
once), the restart policy, wiping secrets."""

from __future__ import annotations

from treadmill.switchboard import jobstate
from treadmill.switchboard.database import Cursor
from treadmill.switchboard.jobstate import Reason, Stage, State, Status
from treadmill.switchboard.store import health
from treadmill.switchboard.store.errors import NotFound, NotYourJob


async def transition(cur: Cursor, job_id: str, new: Status, *, exit_status: int | None = None,
                     message: str | None = None, max_host_failures: int = 3,
                     host_id: int | None = None, hold: bool = False) -> bool:
    """Apply a state transition inside the caller's transaction.

    Locks the job row, checks the move with :func:`jobstate.check`, stamps the
    state's timestamp, keeps the first termination reason, and appends the
    job event. Returns False (and writes nothing) when the job is already in
    the requested status. ``host_id``: the move is that host's report, refused
    (``NotYourJob``) for a job on another host. ``hold``: a termination starts the
    job's hold on its host, if it asked for one (``hold_on_failure``): its endpoints
    stay published until ``held_until``.
    """
    row = await cur.fetchone(
        "SELECT state, stage, termination_reason, host_id, "
        "extract(epoch FROM clock_timestamp() - created_at) AS since_created, "
        "extract(epoch FROM clock_timestamp() - assigned_at) AS since_assigned "
        "FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
    if host_id is not None and (row is None or row["host_id"] != host_id):
        raise NotYourJob(f"job {job_id} is not on this host")
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
    if new.state is State.TERMINATED and hold:  # (no hold_on_failure: held_until stays NULL)
        sets.append("held_until = now() + make_interval(secs => hold_on_failure)")
        sets.append("endpoints = CASE WHEN hold_on_failure IS NULL THEN '[]' "
                    "ELSE coalesce(endpoints, '[]') END")
    elif new.state is State.TERMINATED:
        sets.append("endpoints = '[]'")  # Its tunnels close with it.
    if message is not None:
        sets.append("termination_message = %(message)s")
    params = {"id": job_id, "state": new.state.value,
              "stage": new.stage.value if new.stage else None,
              "reason": final_reason.value if final_reason else None,
              "exit_status": exit_status, "message": message}
    # The update and its event in one statement (one round trip).
    await cur.execute(
        f"WITH updated AS (UPDATE jobs SET {', '.join(sets)} WHERE id = %(id)s "
        "RETURNING event_seq) "
        "INSERT INTO job_events (job_id, seq, state, stage, reason, exit_status, message) "
        "VALUES (%(id)s, (SELECT event_seq FROM updated), %(state)s, %(stage)s, %(reason)s, "
        "%(exit_status)s, %(message)s)", params)
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
        "SELECT id, host_id, restarts_left, image_digest, health_expect_exit, exit_status, "
        "termination_message FROM jobs WHERE id = %s", (job_id,))
    assert job is not None
    if job["host_id"] is not None:
        if job["health_expect_exit"] is not None:
            await health.check_ended(cur, job, reason, job["exit_status"])
        else:
            why = await health.ordinary_job_ended(cur, job, reason, max_host_failures)
            if why is not None:
                await start_health_check(cur, job["host_id"], why)
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


async def start_health_check(cur: Cursor, host_id: int, why: str) -> str | None:
    """Start the host's health check now: a job owned by whoever set the check, assigned
    to the host before any queued job (the host is free or just freed, in this
    transaction). Returns its id, or None if no check applies."""
    check = await health.applicable_check(cur, host_id)
    busy = await cur.fetchone(
        "SELECT 1 FROM jobs WHERE host_id = %s AND (state IN "
        "('assigned', 'initializing', 'ready', 'terminating') OR held_until IS NOT NULL)",
        (host_id,))  # held: a failed job keeps the host (0019)
    if check is None or busy is not None:
        return None  # (one job per host: the check waits for the next end or pass)
    job_id = await health.insert_check_job(cur, host_id, check, why)
    await transition(cur, job_id, Status(State.ASSIGNED), message=f"health check: {why}")
    return job_id
