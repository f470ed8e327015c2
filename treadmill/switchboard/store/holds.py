"""Held hosts (``hold_on_failure``, docs/jobs.md): a failed job whose supervisor keeps
its host as it is. ``jobs.held_until`` (0019_hold_on_failure) is set when the job's
final event says ``held`` (:func:`~treadmill.switchboard.store.lifecycle.transition`)
and cleared once its supervisor has let the host go; while it is set the scheduler
offers the host nothing; ``tml job extend`` moves it later
(:meth:`HoldQueries.extend_hold`). A hold whose ``held_until`` has passed (expired, or
released by ``tml job cancel``) is ended by the link that holds the host
(:mod:`treadmill.switchboard.links`)."""

from __future__ import annotations

from treadmill.switchboard.database import Cursor
from treadmill.switchboard.store.base import Queries, locked_job, notify_extended
from treadmill.switchboard.store.errors import Conflict

HELD_JOB = ("SELECT id, held_until <= now() AS due, "
            "held_until < terminated_at + make_interval(secs => hold_on_failure) "
            "AS released, timeout, "
            "extract(epoch FROM held_until - now())::float8 AS held_for, "
            "extract(epoch FROM terminated_at + make_interval(secs => hold_on_failure) "
            "- now())::float8 AS first_for "
            "FROM jobs WHERE host_id = %(id)s AND held_until IS NOT NULL "
            "ORDER BY seq DESC LIMIT 1")
"""The ended job holding host ``%(id)s``, if any (:meth:`HoldQueries.held_job`)."""


class HoldQueries(Queries):
    """Holds as the links see and end them."""

    async def held_job(self, host_id: int) -> dict | None:
        """The ended job holding ``host_id``, if any: ``id``, ``due`` (its hold should end
        now), ``released`` (ended early, by ``tml job cancel``), ``timeout``, ``held_for``
        (the seconds its hold has left) and ``first_for`` (the seconds until its first
        end, ``hold_on_failure`` after the job's: where a supervisor below minor 9 ends
        it, extended or not; negative once past)."""
        return await self.pool.fetchone(HELD_JOB, {"id": host_id})

    async def due_holds(self, host_ids: list[int]) -> list[dict]:
        """Of ``host_ids``, the hosts whose hold should end now: ``host_id``, ``id``."""
        if not host_ids:
            return []
        return await self.pool.fetchall(
            "SELECT host_id, id FROM jobs WHERE host_id = ANY(%s) AND held_until <= now()",
            (host_ids,))

    async def extend_hold(self, job_id: str, by: float, longest: float) -> dict:
        """Move the end of ended job ``job_id``'s hold ``by`` seconds later; the new end lies
        at most ``longest`` seconds from now. Its host's link is told (an ``extended``
        notification: the supervisor learns the new end and gets fresh tokens,
        :mod:`treadmill.switchboard.renewal`). Returns ``held_until`` and ``host_id``.

        Raises :class:`NotFound`, :class:`Conflict` for a job whose host is not held (or
        whose hold has ended), and :class:`ValueError` past the bound.
        """

        async def extend(cur: Cursor) -> dict:
            row = await locked_job(cur, job_id, "state, held_until IS NOT NULL AS held, "
                                   "extract(epoch FROM held_until - now())::float8 AS held_for")
            if not row["held"]:
                raise Conflict(f"job {job_id} is {row['state']} and its host is not held")
            if row["held_for"] <= 0:
                raise Conflict(f"the hold of job {job_id} has ended")
            if row["held_for"] + by > longest:
                raise ValueError(f"by: a hold may end at most {longest:g} seconds from now "
                                 f"({row['held_for']:.0f} s left)")
            updated = await cur.fetchone(
                "UPDATE jobs SET held_until = held_until + make_interval(secs => %s), "
                "updated_at = now() WHERE id = %s RETURNING held_until, host_id",
                (by, job_id))
            assert updated is not None
            await notify_extended(cur, job_id, updated["host_id"])
            return updated

        return await self.pool.transaction(extend)

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
