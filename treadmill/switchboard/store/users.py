"""Users: accounts, their admin flag and password hashes."""

from __future__ import annotations

import psycopg2
import psycopg2.errors

from treadmill.switchboard.store.base import Queries
from treadmill.switchboard.store.errors import Conflict, NotFound

_USER_COLUMNS = "u.id, u.name, u.admin, u.disabled, u.created_at"


class UserQueries(Queries):
    """Users, found by name regardless of case."""

    async def create_user(self, name: str, admin: bool, password_hash: str | None) -> dict:
        try:
            row = await self.pool.fetchone(
                "INSERT INTO users (name, admin, password_hash) VALUES (%s, %s, %s) "
                "RETURNING id, name, admin, disabled, created_at",
                (name, admin, password_hash))
        except psycopg2.errors.UniqueViolation:
            raise Conflict(await self._taken("users", "user", name)) from None
        assert row is not None
        return row

    async def get_user(self, name: str) -> dict:
        row = await self.pool.fetchone(
            f"SELECT {_USER_COLUMNS}, u.password_hash FROM users u "
            "WHERE lower(u.name) = lower(%s)", (name,))
        if row is None:
            raise NotFound(f"no user {name!r}")
        return row

    async def list_users(self) -> list[dict]:
        return await self.pool.fetchall(f"SELECT {_USER_COLUMNS} FROM users u ORDER BY u.name")

    async def update_user(self, name: str, *, admin: bool | None = None,
                          disabled: bool | None = None,
                          password_hash: str | None = None) -> dict:
        row = await self.pool.fetchone(
            "UPDATE users SET admin = coalesce(%s, admin), disabled = coalesce(%s, disabled), "
            "password_hash = coalesce(%s, password_hash) WHERE lower(name) = lower(%s) "
            "RETURNING id, name, admin, disabled, created_at",
            (admin, disabled, password_hash, name))
        if row is None:
            raise NotFound(f"no user {name!r}")
        return row

    async def user_id(self, name: str) -> int:
        row = await self.pool.fetchone("SELECT id FROM users WHERE lower(name) = lower(%s)",
                                       (name,))
        if row is None:
            raise NotFound(f"no user {name!r}")
        return row["id"]
