"""Health checks as operators set them, each host's health history, checks due by
the clock, and the message of a queued job that only hosts out of service match
(``docs/operations.md``, "Host health")."""

from __future__ import annotations

from typing import Any

from psycopg2.extras import Json

from treadmill.switchboard.access import Principal
from treadmill.switchboard.database import Cursor
from treadmill.switchboard.store.base import INSTANCE_DEAD_AFTER, LIVE_INSTANCE, Queries
from treadmill.switchboard.store.errors import NotFound
from treadmill.switchboard.store.health import CHECK_FOR_HOST
from treadmill.switchboard.store.jobs import JobSpec
from treadmill.switchboard.store.lifecycle import start_health_check
from treadmill.switchboard.store.scheduler import SCHEDULER_LOCK

_CHECK_COLUMNS = """
    c.id, CASE WHEN c.host_id IS NULL THEN 'tag' ELSE 'host' END AS scope,
    coalesce(ch.name, c.tag) AS target, c.image, c.image_name, c.image_digest, c.expect_exit,
    c.timeout, c.every_jobs, c.every_hours, c.after_failures, c.parameters, u.name AS set_by,
    c.set_at"""
_CHECK_FROM = """health_checks c LEFT JOIN hosts ch ON ch.id = c.host_id
    JOIN users u ON u.id = c.set_by"""

HISTORY_LIMIT = 100
"""Events of a host's health history returned at most (newest first)."""

# The hosts a queued job's owner may start jobs on and that match its tags and kind.
_MATCHING_HOSTS = """hosts h WHERE h.tags @> k.tags
    AND (h.kinds IS NULL OR k.image_kind IS NULL OR k.image_kind = ANY(h.kinds))
    AND (u.admin OR h.owner_id = k.owner_id OR EXISTS (SELECT 1 FROM grants g
         WHERE g.host_id = h.id AND g.privilege IN ('start', 'manage')
         AND (g.user_id = k.owner_id OR g.user_id IS NULL)))"""

# Once per distinct (owner, tags, kind) of the queue (MATERIALIZED: not once per job).
_QUEUE_MESSAGES = f"""
    WITH kinds AS (SELECT DISTINCT owner_id, tags, image_kind FROM jobs WHERE state = 'queued'),
    messages AS MATERIALIZED (SELECT k.owner_id, k.tags, k.image_kind, (
        SELECT CASE WHEN bool_or(h.enabled AND h.healthy) THEN NULL
               ELSE left('waiting: every host that could run it is out of service: '
                    || string_agg(h.name || CASE WHEN NOT h.healthy AND NOT h.enabled
                                                 THEN ' (unhealthy, drained)'
                                                 WHEN NOT h.healthy THEN ' (unhealthy)'
                                                 ELSE ' (drained)' END, ', ' ORDER BY h.name)
                    , 500) END
        FROM {_MATCHING_HOSTS}) AS message
      FROM kinds k JOIN users u ON u.id = k.owner_id)
    UPDATE jobs j SET queue_message = m.message FROM messages m
    WHERE j.state = 'queued' AND j.owner_id = m.owner_id AND j.tags = m.tags
    AND j.image_kind IS NOT DISTINCT FROM m.image_kind
    AND j.queue_message IS DISTINCT FROM m.message"""


class HealthQueries(Queries):
    """Health checks, health histories, and the periodic health work."""

    async def set_health_check(self, *, host: str | None, tag: str | None, image: str,
                               spec: JobSpec, expect_exit: int, every_jobs: int | None,
                               every_hours: float | None, after_failures: int | None,
                               set_by: int) -> dict:
        """Set (or replace) the health check of a host or of a tag; ``spec`` is the check
        job as resolved for the admin setting it."""

        async def upsert(cur: Cursor) -> dict:
            host_id = None
            if host is not None:
                row = await cur.fetchone("SELECT id FROM hosts WHERE name = %s", (host,))
                if row is None:
                    raise NotFound(f"no host {host!r}")
                host_id = row["id"]
                await cur.execute("DELETE FROM health_checks WHERE host_id = %s", (host_id,))
            else:
                await cur.execute("DELETE FROM health_checks WHERE tag = %s", (tag,))
            await cur.execute(
                "INSERT INTO health_checks (host_id, tag, image, image_name, image_digest, "
                "image_stores, image_kind, parameters, log_servers, expect_exit, timeout, "
                "every_jobs, every_hours, after_failures, set_by) VALUES (%s, %s, %s, %s, %s, "
                "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (host_id, tag, image, spec.image_name, spec.image_digest,
                 list(spec.image_stores), spec.image_kind, Json(spec.parameters),
                 list(spec.log_servers), expect_exit, spec.timeout, every_jobs, every_hours,
                 after_failures, set_by))
            found = await self._checks(cur, "c.host_id = %s" if host_id else "c.tag = %s",
                                       (host_id if host_id else tag,))
            return found[0]

        return await self.pool.transaction(upsert)

    async def unset_health_check(self, *, host: str | None, tag: str | None) -> None:
        """Remove the health check of a host or of a tag."""
        if host is not None:
            row = await self.pool.fetchone(
                "DELETE FROM health_checks c USING hosts h WHERE c.host_id = h.id "
                "AND h.name = %s RETURNING c.id", (host,))
        else:
            row = await self.pool.fetchone(
                "DELETE FROM health_checks WHERE tag = %s RETURNING id", (tag,))
        if row is None:
            what = f"host {host!r}" if host is not None else f"tag {tag!r}"
            raise NotFound(f"no health check for {what}")

    async def list_health_checks(self) -> list[dict]:
        """Every health check (hosts' first, then tags', by target)."""
        return await self.pool.transaction(lambda cur: self._checks(cur, "true", ()))

    async def _checks(self, cur: Cursor, where: str, params: tuple) -> list[dict]:
        return await cur.fetchall(
            f"SELECT {_CHECK_COLUMNS} FROM {_CHECK_FROM} WHERE {where} "
            "ORDER BY c.host_id IS NULL, coalesce(ch.name, c.tag)", params)

    async def host_health(self, host_id: int, principal: Principal) -> dict[str, Any]:
        """A host's health: the check that applies, and its history (newest first; a
        job's id only where ``principal`` may read the job)."""
        host = await self.pool.fetchone(
            "SELECT h.healthy, h.enabled, h.consecutive_failures, h.jobs_since_check, "
            "h.last_check_at, c.id AS check_id FROM hosts h "
            f"LEFT JOIN LATERAL ({CHECK_FOR_HOST}) c ON true WHERE h.id = %s", (host_id,))
        if host is None:
            raise NotFound("no such host")
        check = None
        if host["check_id"] is not None:
            check = (await self.pool.transaction(
                lambda cur: self._checks(cur, "c.id = %s", (host["check_id"],))))[0]
        events = await self.pool.fetchall(
            "SELECT e.at, e.event, e.reason, e.healthy, e.actor, e.message, "
            "CASE WHEN %(admin)s OR j.owner_id = %(uid)s OR EXISTS (SELECT 1 FROM grants g "
            "  WHERE g.job_id = j.id "  # any grant reads a job (access.effective)
            "  AND (g.user_id = %(uid)s OR g.user_id IS NULL)) THEN j.id END AS job "
            "FROM host_health_events e LEFT JOIN jobs j ON j.id = e.job_id "
            "WHERE e.host_id = %(host)s ORDER BY e.id DESC LIMIT %(limit)s",
            {"admin": principal.admin, "uid": principal.user_id, "host": host_id,
             "limit": HISTORY_LIMIT})
        return {**host, "check": check, "events": events}

    async def run_due_checks(self, fresh_within: float = 20.0,
                             dead_after: float = INSTANCE_DEAD_AFTER) -> list[str]:
        """Start the health check of each idle, enabled, healthy, connected host whose
        check is due by the clock (``every_hours`` since its last check, or since the
        check was set). Holds the scheduler's lock (tried: with another pass running,
        it does nothing), so no pass gives the host a job meanwhile. Returns the ids
        of the check jobs started."""

        async def run(cur: Cursor) -> list[str]:
            locked = await cur.fetchone("SELECT pg_try_advisory_xact_lock(%s) AS ok",
                                        (SCHEDULER_LOCK,))
            if not locked or not locked["ok"]:
                return []
            hosts = await cur.fetchall(
                "SELECT h.id, c.every_hours FROM hosts h JOIN instances i "
                f"ON i.id = h.instance_id CROSS JOIN LATERAL ({CHECK_FOR_HOST}) c "
                "WHERE h.enabled AND h.healthy AND h.session IS NOT NULL "
                "AND h.last_seen_at > now() - make_interval(secs => %(fresh)s) "
                f"AND {LIVE_INSTANCE} AND c.every_hours IS NOT NULL "
                "AND coalesce(h.last_check_at, c.set_at) "
                "    <= now() - make_interval(secs => c.every_hours * 3600) "
                "AND NOT EXISTS (SELECT 1 FROM jobs a WHERE a.host_id = h.id AND (a.state IN "
                "('assigned', 'initializing', 'ready', 'terminating') "
                "OR a.held_until IS NOT NULL)) "
                "ORDER BY h.id FOR UPDATE OF h SKIP LOCKED",
                {"fresh": fresh_within, "dead": dead_after})
            started = []
            for host in hosts:
                job_id = await start_health_check(
                    cur, host["id"], f"every {host['every_hours']:g} hours")
                if job_id is not None:
                    started.append(job_id)
            return started

        return await self.pool.transaction(run)

    async def refresh_queue_messages(self) -> int:
        """Say in each queued job whose matching hosts are all drained or unhealthy that
        it waits for them (and clear the message once one is back). Returns the jobs
        changed."""
        return await self.pool.transaction(lambda cur: _update_count(cur, _QUEUE_MESSAGES))


async def _update_count(cur: Cursor, sql: str) -> int:
    await cur.execute(sql)
    return max(cur.rowcount, 0)
