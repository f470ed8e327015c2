"""SSH keys: users' public keys, a job's authorized keys and its guest's host keys."""

from __future__ import annotations

from psycopg2.extras import Json

from treadmill.switchboard.database import Cursor
from treadmill.switchboard.store.base import Queries
from treadmill.switchboard.store.errors import Conflict, NotFound, NotYourJob

# The authorized keys of job {job} (an SQL expression), as ``authorized_keys`` lines:
# its owner's and those of users holding ``manage`` on it by name.
JOB_SSH_KEYS = (
    "ARRAY(SELECT k.key_type || ' ' || k.body || ' ' || u.name FROM ssh_keys k "
    "JOIN users u ON u.id = k.user_id WHERE NOT u.disabled AND k.user_id IN ("
    "  SELECT owner_id FROM jobs WHERE id = {job} UNION "
    "  SELECT user_id FROM grants WHERE job_id = {job} AND privilege = 'manage' "
    "  AND user_id IS NOT NULL) ORDER BY u.name, k.created_at, k.id)")


class KeyQueries(Queries):
    """Users' SSH public keys, and the keys of jobs."""

    _KEY_COLUMNS = ("k.id, u.name AS user, k.key_type, k.body, k.comment, k.fingerprint, "
                    "k.created_at")

    async def list_ssh_keys(self, user_id: int) -> list[dict]:
        return await self.pool.fetchall(
            f"SELECT {self._KEY_COLUMNS} FROM ssh_keys k JOIN users u ON u.id = k.user_id "
            "WHERE k.user_id = %s ORDER BY k.created_at, k.id", (user_id,))

    async def add_ssh_key(self, user_id: int, key_type: str, body: str, comment: str,
                          fingerprint: str, limit: int) -> dict:
        """Add a key (:class:`Conflict` if the user has it already or has ``limit`` keys)."""
        async def add(cur: Cursor) -> dict:
            # The user row lock serialises concurrent adds, so the limit holds.
            await cur.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (user_id,))
            count = await cur.fetchone("SELECT count(*) AS n FROM ssh_keys WHERE user_id = %s",
                                       (user_id,))
            if count is not None and count["n"] >= limit:
                raise Conflict(f"a user may have at most {limit} SSH keys")
            if await cur.fetchone("SELECT 1 FROM ssh_keys WHERE user_id = %s "
                                  "AND fingerprint = %s", (user_id, fingerprint)):
                raise Conflict(f"that key ({fingerprint}) is registered already")
            row = await cur.fetchone(
                "WITH k AS (INSERT INTO ssh_keys (user_id, key_type, body, comment, "
                "fingerprint) VALUES (%s, %s, %s, %s, %s) RETURNING *) "
                f"SELECT {self._KEY_COLUMNS} FROM k JOIN users u ON u.id = k.user_id",
                (user_id, key_type, body, comment, fingerprint))
            assert row is not None
            return row

        return await self.pool.transaction(add)

    async def delete_ssh_key(self, user_id: int | None, key_id: str) -> dict:
        """Delete a key of ``user_id`` (any user's when None); NotFound otherwise."""
        row = await self.pool.fetchone(
            "WITH k AS (DELETE FROM ssh_keys WHERE id = %s AND (%s::bigint IS NULL "
            "OR user_id = %s) RETURNING *) "
            f"SELECT {self._KEY_COLUMNS} FROM k JOIN users u ON u.id = k.user_id",
            (key_id, user_id, user_id))
        if row is None:
            raise NotFound("no such SSH key")
        return row

    async def job_ssh_keys(self, job_id: str) -> list[str]:
        """The authorized keys of a job: its owner's and those of users holding
        ``manage`` on it by name (a grant to every user adds nobody's keys)."""
        row = await self.pool.fetchone(f"SELECT {JOB_SSH_KEYS.format(job='%(job)s')} AS keys",
                                       {"job": job_id})
        return list(row["keys"]) if row else []

    async def set_ssh_host_keys(self, host_id: int, job_id: str, keys: list[str]) -> None:
        """Record a running (or held) job's SSH host keys, as its own host reports them."""
        async def update(cur: Cursor) -> None:
            row = await cur.fetchone("SELECT host_id, state, held_until FROM jobs "
                                     "WHERE id = %s FOR UPDATE", (job_id,))
            if row is None or row["host_id"] != host_id:
                raise NotYourJob(f"job {job_id} is not on this host")
            if row["state"] != "terminated" or row["held_until"] is not None:
                await cur.execute("UPDATE jobs SET ssh_host_keys = %s, updated_at = now() "
                                  "WHERE id = %s", (Json(keys), job_id))

        await self.pool.transaction(update)
