"""Hosts: registration, tags, health, and what each caller may see of them."""

from __future__ import annotations

import psycopg2
import psycopg2.errors

from treadmill.switchboard.access import Principal
from treadmill.switchboard.database import Cursor
from treadmill.switchboard.store.base import INSTANCE_DEAD_AFTER, MY_GRANTS, Queries, unique
from treadmill.switchboard.store.errors import Conflict, NotFound

_HOST_COLUMNS = f"""
    h.id, h.name, h.tags, h.owner_id, o.name AS owner, h.description, h.enabled, h.healthy,
    h.consecutive_failures, h.kinds,
    (h.session IS NOT NULL AND h.last_seen_at > now() - interval '20 seconds'
     AND EXISTS (SELECT 1 FROM instances i WHERE i.id = h.instance_id AND i.stopped_at IS NULL
                 AND i.heartbeat_at > now() - interval '{INSTANCE_DEAD_AFTER:g} s')) AS connected,
    h.last_seen_at, h.created_at,
    (SELECT CASE WHEN %(admin)s OR j.owner_id = %(uid)s OR EXISTS (
                 SELECT 1 FROM grants g WHERE g.job_id = j.id
                 AND (g.user_id = %(uid)s OR g.user_id IS NULL)) THEN j.id END
     FROM jobs j WHERE j.host_id = h.id AND (j.state <> 'terminated' OR j.held_until IS NOT NULL)
     ORDER BY j.seq DESC LIMIT 1) AS current_job"""  # Only a job the caller may read
# (any grant on a job lets its holder read it: access.effective).
# Who holds the host and until when (0017_reservations; a failed job's hold,
# 0019_hold_on_failure): like current_job, only for a job the caller may read.
_HOST_COLUMNS += "".join(f""",
    (SELECT CASE WHEN %(admin)s OR j.owner_id = %(uid)s OR EXISTS (
                 SELECT 1 FROM grants g WHERE g.job_id = j.id
                 AND (g.user_id = %(uid)s OR g.user_id IS NULL)) THEN {value} END
     FROM jobs j JOIN users u ON u.id = j.owner_id
     WHERE j.host_id = h.id AND (j.state <> 'terminated' OR j.held_until IS NOT NULL)
     ORDER BY j.seq DESC LIMIT 1) AS {name}""" for name, value in (
    ("held_by", "u.name"), ("held_until", "coalesce(j.held_until, j.deadline)")))


class HostQueries(Queries):
    """Hosts, as their owners, grantees and admins see them."""

    def _host_query(self, where: str, admin: bool = False) -> str:
        # Admins also see which switchboard instance holds the host's link.
        extra = ", h.instance" if admin else ""
        return (f"SELECT {_HOST_COLUMNS}{extra}, "
                f"{MY_GRANTS.format(column='host_id', alias='h')} "
                f"FROM hosts h LEFT JOIN users o ON o.id = h.owner_id WHERE {where}")

    async def create_host(self, name: str, tags: list[str], owner_id: int | None,
                          description: str, digest: bytes) -> None:
        try:
            await self.pool.execute(
                "INSERT INTO hosts (name, tags, owner_id, description, token_hash) "
                "VALUES (%s, %s, %s, %s, %s)",
                (name, tags, owner_id, description, psycopg2.Binary(digest)))
        except psycopg2.errors.UniqueViolation as e:
            raise unique(e, f"host {name!r}") from None

    async def get_host(self, name: str, principal: Principal) -> dict:
        row = await self.pool.fetchone(self._host_query("h.name = %(name)s", principal.admin),
                                       {"name": name, "uid": principal.user_id,
                                        "admin": principal.admin})
        if row is None:
            raise NotFound(f"no host {name!r}")
        return row

    async def list_hosts(self, principal: Principal) -> list[dict]:
        where = "true" if principal.admin else (
            "(h.owner_id = %(uid)s OR EXISTS (SELECT 1 FROM grants g WHERE g.host_id = h.id "
            "AND (g.user_id = %(uid)s OR g.user_id IS NULL)))")
        return await self.pool.fetchall(
            self._host_query(where, principal.admin) + " ORDER BY h.name",
            {"uid": principal.user_id, "admin": principal.admin})

    async def update_host(self, name: str, *, tags: list[str] | None = None,
                          enabled: bool | None = None, reset_health: bool = False,
                          digest: bytes | None = None, actor: str = "") -> None:
        """Change a host; ``reset_health`` puts it back in service (its failure count
        cleared) and records that ``actor`` did in its health history."""
        row = await self.pool.fetchone(
            "WITH old AS (SELECT id, healthy, consecutive_failures FROM hosts "
            "WHERE name = %(name)s), "
            "changed AS (UPDATE hosts SET tags = coalesce(%(tags)s, tags), "
            "enabled = coalesce(%(enabled)s, enabled), "
            "healthy = CASE WHEN %(reset)s THEN true ELSE healthy END, "
            "consecutive_failures = CASE WHEN %(reset)s THEN 0 ELSE consecutive_failures END, "
            "token_hash = coalesce(%(digest)s, token_hash), "
            # A new token ends the link (the notification then names no session, and
            # the instance holding it closes it).
            "session = CASE WHEN %(digest)s IS NULL THEN session END, "
            "instance = CASE WHEN %(digest)s IS NULL THEN instance END, "
            "instance_id = CASE WHEN %(digest)s IS NULL THEN instance_id END "
            "WHERE name = %(name)s RETURNING id), "
            "event AS (INSERT INTO host_health_events (host_id, event, healthy, actor, message) "
            "SELECT old.id, 'enabled', true, %(actor)s, CASE WHEN old.healthy "
            "THEN 'failure count cleared' ELSE 'put back in service' END FROM old "
            "WHERE %(reset)s AND (NOT old.healthy OR old.consecutive_failures > 0)) "
            "SELECT id FROM changed",
            {"tags": tags, "enabled": enabled, "reset": reset_health, "name": name,
             "digest": psycopg2.Binary(digest) if digest is not None else None,
             "actor": actor})
        if row is None:
            raise NotFound(f"no host {name!r}")

    async def delete_host(self, name: str) -> None:
        async def delete(cur: Cursor) -> None:
            row = await cur.fetchone("SELECT id FROM hosts WHERE name = %s FOR UPDATE", (name,))
            if row is None:
                raise NotFound(f"no host {name!r}")
            busy = await cur.fetchone(
                "SELECT id FROM jobs WHERE host_id = %s AND state <> 'terminated' LIMIT 1",
                (row["id"],))
            if busy is not None:
                raise Conflict(f"host {name!r} is running job {busy['id']}")
            await cur.execute("DELETE FROM hosts WHERE id = %s", (row["id"],))

        await self.pool.transaction(delete)

    async def host_counts(self) -> dict[str, int]:
        """Hosts registered, and those connected, healthy, enabled and busy (a metric);
        busy as the scheduler sees it: running a job, or held for a failed one (0019)."""
        row = await self.pool.fetchone(
            "SELECT count(*) AS registered, "
            "count(*) FILTER (WHERE h.session IS NOT NULL "
            "  AND h.last_seen_at > now() - interval '20 seconds' AND EXISTS ("
            "  SELECT 1 FROM instances i WHERE i.id = h.instance_id AND i.stopped_at IS NULL "
            f"  AND i.heartbeat_at > now() - interval '{INSTANCE_DEAD_AFTER:g} s')) "
            "  AS connected, "
            "count(*) FILTER (WHERE h.healthy) AS healthy, "
            "count(*) FILTER (WHERE h.enabled) AS enabled, "
            "count(*) FILTER (WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.host_id = h.id "
            "  AND (j.state IN ('assigned', 'initializing', 'ready', 'terminating') "
            "  OR j.held_until IS NOT NULL))) AS busy "  # held: as the scheduler sees it
            "FROM hosts h")
        assert row is not None
        return {key: int(value) for key, value in row.items()}
