"""What the store's components share: the :class:`Queries` base, and SQL fragments
used by more than one domain."""

from __future__ import annotations

import psycopg2

from treadmill.switchboard.database import Pool
from treadmill.switchboard.store.errors import Conflict

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
