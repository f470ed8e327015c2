"""API tokens: their hashes, labels, expiry, last use and revocation."""

from __future__ import annotations

from datetime import datetime

import psycopg2

from treadmill.switchboard.access import Principal
from treadmill.switchboard.store.base import Queries
from treadmill.switchboard.store.errors import NotFound

_TOKEN_COLUMNS = ("t.id, u.name AS user, t.label, t.created_at, t.expires_at, "
                  "t.last_used_at, t.revoked_at")


class TokenQueries(Queries):
    """Users' API tokens (stored as hashes)."""

    async def create_token(self, user_id: int, digest: bytes, label: str,
                           ttl: float | None) -> dict:
        row = await self.pool.fetchone(
            "WITH t AS (INSERT INTO api_tokens (user_id, token_hash, label, expires_at) "
            "VALUES (%s, %s, %s, now() + make_interval(secs => %s)) RETURNING *) "
            f"SELECT {_TOKEN_COLUMNS} FROM t JOIN users u ON u.id = t.user_id",
            (user_id, psycopg2.Binary(digest), label, ttl))
        assert row is not None
        return row

    async def authenticate(self, digest: bytes) -> Principal | None:
        """The user a live API token belongs to, or None."""
        row = await self.pool.fetchone(
            "SELECT t.id AS token_id, u.id, u.name, u.admin FROM api_tokens t "
            "JOIN users u ON u.id = t.user_id WHERE t.token_hash = %s "
            "AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now()) "
            "AND NOT u.disabled", (psycopg2.Binary(digest),))
        if row is None:
            return None
        return Principal(user_id=row["id"], name=row["name"], admin=row["admin"],
                         token_id=row["token_id"])

    async def touch_tokens(self, used: dict[str, datetime]) -> None:
        """Record when tokens were last used (batched by the caller)."""
        if not used:
            return
        await self.pool.execute(
            "UPDATE api_tokens t SET last_used_at = v.at FROM "
            "unnest(%s::uuid[], %s::timestamptz[]) AS v(id, at) "
            "WHERE t.id = v.id AND (t.last_used_at IS NULL OR t.last_used_at < v.at)",
            (list(used), list(used.values())))

    async def list_tokens(self, user_id: int) -> list[dict]:
        return await self.pool.fetchall(
            f"SELECT {_TOKEN_COLUMNS} FROM api_tokens t JOIN users u ON u.id = t.user_id "
            "WHERE t.user_id = %s ORDER BY t.created_at DESC", (user_id,))

    async def get_token(self, token_id: str) -> dict:
        row = await self.pool.fetchone(
            f"SELECT {_TOKEN_COLUMNS}, t.user_id FROM api_tokens t "
            "JOIN users u ON u.id = t.user_id WHERE t.id = %s", (token_id,))
        if row is None:
            raise NotFound("no such token")
        return row

    async def revoke_token(self, token_id: str) -> dict:
        await self.pool.execute(
            "UPDATE api_tokens SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL",
            (token_id,))
        return await self.get_token(token_id)
