"""What the store's components share: the :class:`Queries` base, SQL fragments used by
more than one domain, and statements run in their transactions (:func:`locked_job`,
:func:`notify_extended`)."""

from __future__ import annotations

import psycopg2

from treadmill.switchboard.database import Cursor, Pool
from treadmill.switchboard.notifications import EXTENDED, JobNote
from treadmill.switchboard.store.errors import Conflict, NotFound

INSTANCE_DEAD_AFTER = 5.0
"""Seconds without a heartbeat after which an instance counts as dead."""

# A live instance: not stopped, heartbeat fresher than %(dead)s seconds.
LIVE_INSTANCE = ("i.stopped_at IS NULL "
                 "AND i.heartbeat_at > now() - make_interval(secs => %(dead)s)")

# The grants a principal holds on a resource, as an array column named grants.
MY_GRANTS = """ARRAY(SELECT g.privilege FROM grants g WHERE g.{column} = {alias}.id
                      AND (g.user_id = %(uid)s OR g.user_id IS NULL)) AS grants"""

# The principal owns the resource or holds a grant on it (a condition).
OWNED_OR_GRANTED = ("({alias}.owner_id = %(uid)s OR EXISTS (SELECT 1 FROM grants g "
                    "WHERE g.{column} = {alias}.id "
                    "AND (g.user_id = %(uid)s OR g.user_id IS NULL)))")


def unique(e: psycopg2.Error, what: str) -> Conflict:
    """The :class:`Conflict` for a unique violation on ``what``."""
    return Conflict(f"{what} already exists")


async def locked_job(cur: Cursor, job_id: str, columns: str) -> dict:
    """Job ``job_id``'s ``columns`` (a select list), its row locked until the end of
    ``cur``'s transaction; raises :class:`NotFound`."""
    row = await cur.fetchone(f"SELECT {columns} FROM jobs WHERE id = %s FOR UPDATE",
                             (job_id,))
    if row is None:
        raise NotFound(f"no job {job_id}")
    return row


async def notify_extended(cur: Cursor, job_id: str, host_id: int | None) -> None:
    """Job ``job_id`` (or its held host's hold) was extended in ``cur``'s transaction: at
    its commit, tell the instance holding the link of its host ``host_id`` (if any), which
    sends the host fresh tokens (:mod:`treadmill.switchboard.renewal`)."""
    if host_id is not None:
        await cur.execute("SELECT pg_notify('treadmill_jobs', %s)",
                          (JobNote(job_id, EXTENDED, host_id).format(),))


class Queries:
    """One domain's reads and writes over :attr:`pool`; :class:`Store
    <treadmill.switchboard.store.Store>` combines them all in one object."""

    pool: Pool
    max_host_failures: int

    async def _taken(self, table: str, what: str, name: str) -> str:
        """The message for a name taken in ``table`` (names compare without case)."""
        row = await self.pool.fetchone(
            f"SELECT name FROM {table} WHERE lower(name) = lower(%s)", (name,))
        if row is None or row["name"] == name:
            return f"{what} {name!r} already exists"
        return (f"{what} {name!r} already exists as {row['name']!r} "
                "(names are unique regardless of case)")
