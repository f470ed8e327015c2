"""Host health inside a job's terminating transaction: count or ignore its end,
judge a health check's end, record the history (``docs/operations.md``, "Host
health"). The decisions are :mod:`treadmill.switchboard.health`'s; starting a
check job is :func:`lifecycle.start_health_check`."""

from __future__ import annotations

from typing import Any

from treadmill.switchboard import health, jobstate
from treadmill.switchboard.database import Cursor
from treadmill.switchboard.health import Event
from treadmill.switchboard.jobstate import Reason, Stage
from treadmill.switchboard.store.audit import append_record
from treadmill.switchboard.store.base import INSTANCE_DEAD_AFTER, LIVE_INSTANCE

SWITCHBOARD = "switchboard"
"""The actor of the health events and audit records the switchboard writes itself."""

CHECK_FOR_HOST = """
    SELECT c.* FROM health_checks c WHERE c.host_id = h.id OR c.tag = ANY(h.tags)
    ORDER BY c.host_id IS NULL, c.id LIMIT 1"""
"""The health check that applies to host ``h``: its own, else its first tag's (by id)."""


async def applicable_check(cur: Cursor, host_id: int) -> dict[str, Any] | None:
    """The health check that applies to the host, if any."""
    return await cur.fetchone(
        f"SELECT c.* FROM hosts h, LATERAL ({CHECK_FOR_HOST}) c WHERE h.id = %s", (host_id,))


HISTORY_KEPT = 1000
"""Events kept per host: older ones go as new ones come."""


async def record(cur: Cursor, host_id: int, event: Event, *, healthy: bool,
                 job_id: str | None = None, reason: str | None = None,
                 actor: str = SWITCHBOARD, message: str = "") -> None:
    """Append one event to the host's health history (keeping :data:`HISTORY_KEPT`)."""
    await cur.execute(
        "INSERT INTO host_health_events (host_id, event, job_id, reason, healthy, actor, "
        "message) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (host_id, event.value, job_id, reason, healthy, actor, message))
    await cur.execute(
        "DELETE FROM host_health_events WHERE host_id = %(host)s AND id <= ("
        "SELECT id FROM host_health_events WHERE host_id = %(host)s "
        "ORDER BY id DESC OFFSET %(kept)s LIMIT 1)", {"host": host_id, "kept": HISTORY_KEPT})


async def link_died_with_instance(cur: Cursor, host_id: int) -> bool:
    """Whether the host's link was held by a switchboard instance that died (then an
    unreachable host is the instance's fault, not the host's)."""
    row = await cur.fetchone(
        "SELECT h.instance_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM instances i "
        f"WHERE i.id = h.instance_id AND {LIVE_INSTANCE}) AS died FROM hosts h "
        "WHERE h.id = %(id)s", {"id": host_id, "dead": INSTANCE_DEAD_AFTER})
    return bool(row and row["died"])


async def _blame(cur: Cursor, job: dict[str, Any], reason: Reason
                 ) -> tuple[jobstate.Blame, str]:
    """Whose fault, and why (the history's message)."""
    image_ran = instance_died = before_image = bad_request = False
    if reason is Reason.HOST_START_FAILURE:
        # Where it failed: a refused start (no stage; links.py writes "CODE: text"), in
        # starting (the image not yet fetched), or later; and has this image ever
        # become ready, on any host? If not, it is the image's fault.
        row = await cur.fetchone(
            "SELECT (SELECT e.stage FROM job_events e WHERE e.job_id = %(id)s "
            "  AND e.stage IS NOT NULL ORDER BY e.seq DESC LIMIT 1) AS stage, "
            "EXISTS (SELECT 1 FROM jobs WHERE image_digest = %(digest)s "
            "  AND ready_at IS NOT NULL) AS ran",
            {"id": job["id"], "digest": job["image_digest"]})
        assert row is not None
        image_ran = bool(row["ran"])
        before_image = row["stage"] in (None, Stage.STARTING.value)
        bad_request = row["stage"] is None and (job["termination_message"] or "").startswith(
            "bad_request:")
    elif reason is Reason.HOST_UNREACHABLE:
        instance_died = await link_died_with_instance(cur, job["host_id"])
    blamed = jobstate.blame(reason, image_ran=image_ran, instance_died=instance_died,
                            before_image=before_image, bad_request=bad_request)
    if blamed is jobstate.Blame.JOB and reason is Reason.HOST_START_FAILURE:
        why = ("blamed on the job: the host refused its start as a bad request"
               if bad_request else
               "blamed on the job: its image has never become ready on any host")
    elif blamed is jobstate.Blame.HOST:
        why = ("a host-side failure before the image was fetched, counted against the host"
               if reason is Reason.HOST_START_FAILURE and before_image else
               "a host-side failure, counted against the host")
    else:
        why = ""
    return blamed, why


async def ordinary_job_ended(cur: Cursor, job: dict[str, Any], reason: Reason,
                             threshold: int) -> str | None:
    """Count an ordinary job's end on its host (``job``: its row, with ``host_id``,
    ``image_digest``); ``threshold`` failures in a row (``hosts.max_failures``, unless
    the host's check says otherwise) run its check. Returns why a health check must
    run now, or None."""
    host = await cur.fetchone(
        "SELECT healthy, enabled, consecutive_failures, jobs_since_check, "
        "extract(epoch FROM now() - coalesce(h.last_check_at, c.set_at)) / 3600 AS hours, "
        "c.id AS check_id, c.every_jobs, c.every_hours, c.after_failures FROM hosts h "
        f"LEFT JOIN LATERAL ({CHECK_FOR_HOST}) c ON true WHERE h.id = %s FOR UPDATE OF h",
        (job["host_id"],))
    if host is None:
        return None
    blame, why = await _blame(cur, job, reason)
    decision = health.after_job(
        blame, reason, failures=host["consecutive_failures"],
        threshold=host["after_failures"] or threshold,
        has_check=host["check_id"] is not None and host["healthy"],
        jobs_since_check=host["jobs_since_check"], every_jobs=host["every_jobs"],
        hours_since_check=float(host["hours"]) if host["hours"] is not None else None,
        every_hours=host["every_hours"])
    healthy = host["healthy"] and not decision.out_of_service
    # Only what changes: a write of healthy (or tags...) notifies every instance.
    sets = []
    if decision.failures != host["consecutive_failures"]:
        sets.append(f"consecutive_failures = {int(decision.failures)}")
    if host["check_id"] is not None:
        sets.append("jobs_since_check = jobs_since_check + 1")
    if healthy != host["healthy"]:
        sets.append("healthy = false")
    if sets:
        await cur.execute(f"UPDATE hosts SET {', '.join(sets)} WHERE id = %s",
                          (job["host_id"],))
    if decision.event is not None:
        await record(cur, job["host_id"], decision.event, healthy=healthy,
                     job_id=job["id"], reason=reason.value, message=why)
    if decision.out_of_service and host["healthy"]:
        message = (f"{decision.failures} host-side failures in a row and no health check "
                   "applies")
        await record(cur, job["host_id"], Event.OUT_OF_SERVICE, healthy=False,
                     job_id=job["id"], reason=reason.value, message=message)
        await _audit_health(cur, job["host_id"], False, message)
    # A drained host finishes its job and starts nothing else, a check included (an
    # operator enabling it clears its count).
    return decision.check if host["enabled"] else None


async def check_ended(cur: Cursor, job: dict[str, Any], reason: Reason,
                      exit_status: int | None) -> None:
    """Judge a health-check job's end: a failing check takes its host out of service,
    a passing one clears the host's count of failures."""
    host_id = job["host_id"]
    died = reason is Reason.HOST_UNREACHABLE and await link_died_with_instance(cur, host_id)
    passed = health.check_passed(reason, exit_status, job["health_expect_exit"],
                                 instance_died=died)
    host = await cur.fetchone("SELECT healthy FROM hosts WHERE id = %s FOR UPDATE",
                              (host_id,))
    if host is None:
        return
    healthy = host["healthy"] and passed is not False
    await cur.execute(
        "UPDATE hosts SET last_check_at = now()"
        + (", healthy = false" if healthy != host["healthy"] else "")
        + (", consecutive_failures = 0" if passed else "") + " WHERE id = %s", (host_id,))
    ended = f"{reason.value}" + (f", exit status {exit_status}" if exit_status is not None
                                 else "")
    expected = f"expected exit status {job['health_expect_exit']}"
    message = {True: f"passed: {ended}", False: f"failed: {ended} ({expected})",
               None: f"says nothing about the host: {ended}"}[passed]
    await record(cur, host_id, health.check_event(passed), healthy=healthy, job_id=job["id"],
                 reason=reason.value, message=message)
    if passed is False and host["healthy"]:
        await _audit_health(cur, host_id, False, f"health check {job['id']} {message}")


async def _audit_health(cur: Cursor, host_id: int, healthy: bool, message: str) -> None:
    row = await cur.fetchone("SELECT name FROM hosts WHERE id = %s", (host_id,))
    if row is not None:
        await append_record(cur, actor=SWITCHBOARD, actor_kind="system", action="host.health",
                            subject_kind="host", subject_id=row["name"],
                            details={"healthy": healthy, "message": message})


async def insert_check_job(cur: Cursor, host_id: int, check: dict[str, Any], why: str) -> str:
    """Insert a health-check job (queued, pinned to the host) from ``check``; the caller
    assigns it. The host's count of jobs since its last check starts again."""
    row = await cur.fetchone(
        "INSERT INTO jobs (owner_id, label, image_name, image_digest, image_stores, tags, "
        "parameters, timeout, queue_timeout, queue_deadline, event_seq, log_servers, "
        "image_kind, host_id, health_expect_exit) "
        "SELECT set_by, %s, image_name, image_digest, image_stores, '{}', parameters, "
        "timeout, timeout, now() + make_interval(secs => timeout), 1, log_servers, "
        "image_kind, %s, expect_exit FROM health_checks WHERE id = %s RETURNING id",
        (f"health check: {why}"[:200], host_id, check["id"]))
    assert row is not None
    job_id = str(row["id"])
    await cur.execute(
        "INSERT INTO job_events (job_id, seq, state, message) VALUES (%s, 1, 'queued', %s)",
        (job_id, f"health check of its host: {why}"))
    await cur.execute("UPDATE hosts SET jobs_since_check = 0 WHERE id = %s", (host_id,))
    await record(cur, host_id, Event.CHECK_STARTED, healthy=True, job_id=job_id, message=why)
    return job_id
