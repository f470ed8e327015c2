"""Grants: privileges users hold on hosts, jobs, images and namespaces."""

from __future__ import annotations

from typing import Any

import psycopg2
import psycopg2.errors

from treadmill.switchboard.store.base import Queries, unique
from treadmill.switchboard.store.errors import NotFound


class GrantQueries(Queries):
    """Grants on one resource, and a user's grants on namespaces."""

    _GRANT_COLUMN = {"host": "host_id", "job": "job_id", "image": "image_id",
                     "namespace": "namespace"}

    async def list_grants(self, kind: str, resource_id: Any) -> list[dict]:
        column = self._GRANT_COLUMN[kind]
        return await self.pool.fetchall(
            "SELECT coalesce(u.name, '*') AS user, g.privilege, g.created_at FROM grants g "
            f"LEFT JOIN users u ON u.id = g.user_id WHERE g.{column} = %s "
            "ORDER BY coalesce(u.name, '*'), g.privilege", (resource_id,))

    async def add_grant(self, kind: str, resource_id: Any, user_id: int | None,
                        privilege: str) -> dict:
        column = self._GRANT_COLUMN[kind]
        try:
            row = await self.pool.fetchone(
                f"INSERT INTO grants ({column}, user_id, privilege) VALUES (%s, %s, %s) "
                "RETURNING privilege, created_at", (resource_id, user_id, privilege))
        except psycopg2.errors.UniqueViolation as e:
            raise unique(e, "this grant") from None
        assert row is not None
        return row

    async def remove_grant(self, kind: str, resource_id: Any, user_id: int | None,
                           privilege: str) -> None:
        column = self._GRANT_COLUMN[kind]
        row = await self.pool.fetchone(
            f"DELETE FROM grants WHERE {column} = %s AND user_id IS NOT DISTINCT FROM %s "
            "AND privilege = %s RETURNING id", (resource_id, user_id, privilege))
        if row is None:
            raise NotFound("no such grant")

    async def namespace_grants(self, user_id: int) -> dict[str, frozenset[str]]:
        """The privileges the user holds on each namespace (own grants and grants to all)."""
        rows = await self.pool.fetchall(
            "SELECT namespace, array_agg(DISTINCT privilege) AS privileges FROM grants "
            "WHERE namespace IS NOT NULL AND (user_id = %s OR user_id IS NULL) "
            "GROUP BY namespace", (user_id,))
        return {row["namespace"]: frozenset(row["privileges"]) for row in rows}
