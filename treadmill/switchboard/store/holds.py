"""Held hosts (``hold_on_failure``, docs/jobs.md): a failed job whose supervisor keeps
its host as it is. ``jobs.held_until`` (0019_hold_on_failure) is set when the job's
final event says ``held`` and cleared once its supervisor has let the host go; while
it is set the scheduler offers the host nothing. A hold whose ``held_until`` has
passed (expired, or released by ``tml job cancel``) is ended by the link that holds
the host (:mod:`treadmill.switchboard.links`)."""

from __future__ import annotations

from typing import Any

from psycopg2.extras import Json

from treadmill.switchboard.database import Cursor
from treadmill.switchboard.store.base import Queries

HELD_JOB = ("SELECT id, held_until <= now() AS due, "
            "held_until < terminated_at + make_interval(secs => hold_on_failure) "
            "AS released FROM jobs WHERE host_id = %(id)s AND held_until IS NOT NULL "
            "ORDER BY seq DESC LIMIT 1")
"""The ended job holding host ``%(id)s``, if any (:meth:`HoldQueries.held_job`)."""


async def begin_hold(cur: Cursor, job_id: str, endpoints: Any) -> None:
    """The job ended held (in the caller's transaction): hold the host for the job's
    ``hold_on_failure`` from now; its endpoints stay published while it is held."""
    await cur.execute(
        "UPDATE jobs SET held_until = now() + make_interval(secs => hold_on_failure), "
        "endpoints = %s WHERE id = %s AND hold_on_failure IS NOT NULL",
        (Json(endpoints if endpoints is not None else []), job_id))


class HoldQueries(Queries):
    """Holds as the links see and end them."""

    async def held_job(self, host_id: int) -> dict | None:
        """The ended job holding ``host_id``, if any: ``id``, ``due`` (its hold should end
        now) and ``released`` (ended early, by ``tml job cancel``)."""
        return await self.pool.fetchone(HELD_JOB, {"id": host_id})

    async def due_holds(self, host_ids: list[int]) -> list[dict]:
        """Of ``host_ids``, the hosts whose hold should end now: ``host_id``, ``id``."""
        if not host_ids:
            return []
        return await self.pool.fetchall(
            "SELECT host_id, id FROM jobs WHERE host_id = ANY(%s) AND held_until <= now()",
            (host_ids,))

    async def release_hold(self, job_id: str) -> bool:
        """End a held job's hold early (``tml job cancel``); False if it holds nothing.
        The link holding its host tells the supervisor (:meth:`end_hold` after)."""
        row = await self.pool.fetchone(
            "UPDATE jobs SET held_until = now(), updated_at = now() WHERE id = %s "
            "AND held_until > now() RETURNING id", (job_id,))
        return row is not None

    async def end_hold(self, job_id: str) -> bool:
        """The host no longer holds ended job ``job_id``: free it for the scheduler."""
        row = await self.pool.fetchone(
            "UPDATE jobs SET held_until = NULL, endpoints = '[]', updated_at = now() "
            "WHERE id = %s AND held_until IS NOT NULL RETURNING id", (job_id,))
        return row is not None
