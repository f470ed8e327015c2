"""Switchboard instances: registration, heartbeats, the leader and the capability key."""

from __future__ import annotations

from treadmill.switchboard.database import Cursor
from treadmill.switchboard.store.base import INSTANCE_DEAD_AFTER, LIVE_INSTANCE, Queries


class InstanceQueries(Queries):
    """The switchboard instances sharing the database."""

    async def register_instance(self, instance_id: str, name: str, address: str) -> None:
        """Record a starting instance (forgetting instances gone for over a day)."""
        async def register(cur: Cursor) -> None:
            await cur.execute(
                "DELETE FROM instances WHERE heartbeat_at < now() - interval '1 day'")
            await cur.execute(
                "INSERT INTO instances (id, name, address) VALUES (%s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL",
                (instance_id, name, address))

        await self.pool.transaction(register)

    async def instance_heartbeat(self, instance_id: str,
                                 dead_after: float = INSTANCE_DEAD_AFTER) -> dict:
        """Refresh the instance's heartbeat; return the ``leader`` (the oldest live
        instance, which schedules), how many instances are ``live`` and how many
        supervisor ``links`` they hold between them."""
        row = await self.pool.fetchone(
            "WITH beat AS (UPDATE instances SET heartbeat_at = now(), stopped_at = NULL "
            "  WHERE id = %(id)s RETURNING id), "
            f"live AS (SELECT i.id, i.started_at FROM instances i WHERE ({LIVE_INSTANCE}) "
            "  OR i.id = %(id)s) "
            "SELECT (SELECT id FROM live ORDER BY started_at, id LIMIT 1) AS leader, "
            "(SELECT count(*) FROM live) AS live, "
            "(SELECT count(*) FROM hosts h WHERE h.session IS NOT NULL "
            "  AND h.instance_id IN (SELECT id FROM live)) AS links, "
            "(SELECT count(*) FROM beat) AS found",
            {"id": instance_id, "dead": dead_after})
        assert row is not None
        return {"leader": str(row["leader"]) if row["leader"] else None, "live": row["live"],
                "links": row["links"], "found": bool(row["found"])}

    async def instance_stopped(self, instance_id: str) -> None:
        await self.pool.execute("UPDATE instances SET stopped_at = now() WHERE id = %s",
                                (instance_id,))

    async def instances(self, dead_after: float = INSTANCE_DEAD_AFTER) -> list[dict]:
        """Every instance known, with whether it is ``live`` and the links it holds."""
        return await self.pool.fetchall(
            f"SELECT i.id, i.name, i.address, i.started_at, i.heartbeat_at, i.stopped_at, "
            f"({LIVE_INSTANCE}) AS live, (SELECT count(*) FROM hosts h "
            "WHERE h.instance_id = i.id AND h.session IS NOT NULL) AS links "
            "FROM instances i ORDER BY i.started_at", {"dead": dead_after})

    async def record_capability_key(self, key_id: str, public_key: str, instance: str,
                                    replace: bool = False) -> dict:
        """The capability key id every instance must use: the recorded one, or
        ``key_id`` if none is recorded yet (or ``replace``, for a rotation)."""
        async def record(cur: Cursor) -> dict:
            verb = ("DO UPDATE SET key_id = EXCLUDED.key_id, public_key = EXCLUDED.public_key, "
                    "recorded_at = now(), recorded_by = EXCLUDED.recorded_by"
                    if replace else "DO NOTHING")
            await cur.execute(
                "INSERT INTO capability_key (key_id, public_key, recorded_by) "
                f"VALUES (%s, %s, %s) ON CONFLICT (only_one) {verb}",
                (key_id, public_key, instance))
            row = await cur.fetchone("SELECT key_id, public_key, recorded_at, recorded_by "
                                     "FROM capability_key")
            assert row is not None
            return row

        return await self.pool.transaction(record)
