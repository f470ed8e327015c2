"""The switchboard's data layer: every SQL statement lives here.

Methods take and return plain values and dict rows; each write that touches
more than one row runs in one transaction, so a failed request writes nothing.
Authorisation decisions are made by the caller from the privileges that the
read methods return alongside the rows (see :mod:`treadmill.switchboard.access`).
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg2
import psycopg2.errors
from psycopg2.extras import Json

from treadmill.common.http import dumps
from treadmill.switchboard import jobstate
from treadmill.switchboard.access import Principal
from treadmill.switchboard.database import Cursor, Pool
from treadmill.switchboard.jobstate import Reason, Stage, State, Status


class _InTransaction:
    """The queries of :class:`Pool` on one transaction's cursor (``Store.audited``)."""

    def __init__(self, cur: Cursor):
        self.cur = cur

    async def fetchall(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        return await self.cur.fetchall(sql, params)

    async def fetchone(self, sql: str, params: Any = None) -> dict[str, Any] | None:
        return await self.cur.fetchone(sql, params)

    async def execute(self, sql: str, params: Any = None) -> None:
        await self.cur.execute(sql, params)

    async def transaction(self, fn: Callable[[Cursor], Awaitable[Any]]) -> Any:
        return await fn(self.cur)


class NotFound(LookupError):
    """No such resource (or none the caller may see)."""


IDEMPOTENCY_RETENTION = 24 * 3600.0
"""Seconds an Idempotency-Key of ``POST /api/v1/jobs`` is remembered."""


class Conflict(ValueError):
    """The request conflicts with the current state (a duplicate name, say)."""


class IdempotencyKeyReused(Conflict):
    """An Idempotency-Key sent again with a different request."""


@dataclass(frozen=True)
class JobSpec:
    """A validated job request, ready to insert."""

    image_name: str | None
    image_digest: str
    image_stores: list[str]
    tags: list[str]
    parameters: dict[str, dict[str, Any]]
    timeout: float
    queue_timeout: float
    max_restarts: int
    label: str
    log_servers: tuple[str, ...] = ()
    results: dict[str, str] | None = None  # console patterns (docs/results.md)
    image_kind: str | None = None
    reservation: bool = False  # holds its host until the deadline (docs/jobs.md)


# Limits of the scheduling transaction (SET LOCAL), in milliseconds: a pass
# never waits long for a lock, and if its instance freezes half-way (SIGSTOP, a
# long pause) PostgreSQL ends its session, releasing the scheduling lock and
# the job rows it locked, after idle_in_transaction_session_timeout.
SCHEDULING_TIMEOUTS = {"statement_timeout": 5000, "lock_timeout": 1000,
                       "idle_in_transaction_session_timeout": 2000}

INSTANCE_DEAD_AFTER = 5.0
"""Seconds without a heartbeat after which an instance counts as dead."""

# A live instance: not stopped, heartbeat fresher than %(dead)s seconds.
_LIVE_INSTANCE = ("i.stopped_at IS NULL "
                  "AND i.heartbeat_at > now() - make_interval(secs => %(dead)s)")

_USER_COLUMNS = "u.id, u.name, u.admin, u.disabled, u.created_at"
_TOKEN_COLUMNS = ("t.id, u.name AS user, t.label, t.created_at, t.expires_at, "
                  "t.last_used_at, t.revoked_at")
_HOST_COLUMNS = f"""
    h.id, h.name, h.tags, h.owner_id, o.name AS owner, h.description, h.enabled, h.healthy,
    h.consecutive_failures, h.kinds,
    (h.session IS NOT NULL AND h.last_seen_at > now() - interval '20 seconds'
     AND EXISTS (SELECT 1 FROM instances i WHERE i.id = h.instance_id AND i.stopped_at IS NULL
                 AND i.heartbeat_at > now() - interval '{INSTANCE_DEAD_AFTER:g} s')) AS connected,
    h.last_seen_at, h.created_at,
    (SELECT CASE WHEN %(admin)s OR j.owner_id = %(uid)s OR EXISTS (
                 SELECT 1 FROM grants g WHERE g.job_id = j.id
                 AND g.privilege IN ('read', 'manage')
                 AND (g.user_id = %(uid)s OR g.user_id IS NULL)) THEN j.id END
     FROM jobs j WHERE j.host_id = h.id AND j.state <> 'terminated'
     ORDER BY j.seq DESC LIMIT 1) AS current_job"""  # Only a job the caller may read.
# Who holds the host and until when (0017_reservations): like current_job, only for a
# job the caller may read.
_HOST_COLUMNS += "".join(f""",
    (SELECT CASE WHEN %(admin)s OR j.owner_id = %(uid)s OR EXISTS (
                 SELECT 1 FROM grants g WHERE g.job_id = j.id
                 AND g.privilege IN ('read', 'manage')
                 AND (g.user_id = %(uid)s OR g.user_id IS NULL)) THEN {value} END
     FROM jobs j JOIN users u ON u.id = j.owner_id
     WHERE j.host_id = h.id AND j.state <> 'terminated'
     ORDER BY j.seq DESC LIMIT 1) AS {name}""" for name, value in (
    ("held_by", "u.name"), ("held_until", "j.deadline")))
_IMAGE_COLUMNS = """
    i.id, i.name, i.digest, i.stores, i.owner_id, o.name AS owner, i.description,
    i.host_tags, i.kind, i.created_at, i.updated_at, i.results"""
_JOB_COLUMNS = """
    j.id, j.seq, j.owner_id, o.name AS owner, j.label, j.image_name, j.image_digest,
    j.image_stores, j.tags, j.parameters, j.timeout, j.queue_timeout, j.max_restarts,
    j.restarts_left, j.restart_of, j.state, j.stage, h.name AS host, j.termination_reason,
    j.exit_status, j.termination_message, j.created_at, j.assigned_at, j.started_at,
    j.ready_at, j.terminating_at, j.terminated_at, j.updated_at, j.queue_deadline,
    j.deadline, j.log_servers, j.endpoints, j.host_id, j.results, j.image_kind"""
_JOB_COLUMNS += ", j.ssh_host_keys"  # 0013_ssh_keys
_JOB_COLUMNS += ", j.reservation"  # 0017_reservations
SCHEDULER_LOCK = 0x74726561646D7363  # "treadmsc"

_EVENT_COLUMNS = ("e.seq, e.job_id AS job, e.at, e.state, e.stage, e.reason, e.exit_status, "
                  "e.message")

# The grants a principal holds on a resource, as an array column named grants.
_MY_GRANTS = """ARRAY(SELECT g.privilege FROM grants g WHERE g.{column} = {alias}.id
                      AND (g.user_id = %(uid)s OR g.user_id IS NULL)) AS grants"""

# Whether catalogue image i (owner o) lends its repository to those who may use
# it. Not when the repository lies in another user's namespace that the owner
# may not write: such a name was registered before namespaces were owned
# (security issue 12) and must not open that user's repository.
_LENDS = """(coalesce(o.admin, false)
    OR NOT EXISTS (SELECT 1 FROM users n WHERE lower(n.name) = split_part(lower(i.name), '/', 1)
                   AND n.id IS DISTINCT FROM i.owner_id)
    OR EXISTS (SELECT 1 FROM grants g WHERE g.namespace = split_part(lower(i.name), '/', 1)
               AND g.privilege = 'manage' AND (g.user_id = i.owner_id OR g.user_id IS NULL)))"""


async def _record_version(cur: Cursor, image_id: int, by: int | None, note: str,
                          keep: int | None) -> None:
    """Record the image's current digest, stores, host tags and kind as its next version;
    keep only the last ``keep`` versions (None: all)."""
    await cur.execute(
        "INSERT INTO image_versions (image_id, version, digest, stores, host_tags, kind, "
        "created_by, note) SELECT i.id, coalesce((SELECT max(v.version) FROM image_versions v "
        "WHERE v.image_id = i.id), 0) + 1, i.digest, i.stores, i.host_tags, i.kind, %s, %s "
        "FROM images i WHERE i.id = %s", (by, note, image_id))
    if keep is not None:
        await cur.execute(
            "DELETE FROM image_versions WHERE image_id = %(id)s AND version <= "
            "(SELECT max(version) FROM image_versions WHERE image_id = %(id)s) - %(keep)s",
            {"id": image_id, "keep": keep})


def _unique(e: psycopg2.Error, what: str) -> Conflict:
    return Conflict(f"{what} already exists")


class NotYourJob(PermissionError):
    """A supervisor reported on a job that is not on its host."""


@dataclass(frozen=True)
class ScheduleResult:
    """One scheduling pass: whether it held the lock, the (job, host id) pairs it
    assigned, whether more may fit at once (it read ``limit`` jobs), and how many
    jobs it skipped because another transaction had them locked."""

    locked: bool = True
    pairs: list[tuple[str, int]] = field(default_factory=list)
    more: bool = False
    skipped: int = 0


class Store:
    """All reads and writes of switchboard state.

    ``max_host_failures`` consecutive host-side failures take a host out of
    service (``healthy = false``) until an operator enables it again.
    """

    def __init__(self, pool: Pool, *, max_host_failures: int = 3):
        self.pool = pool
        self.max_host_failures = max_host_failures

    # -- users -------------------------------------------------------------

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

    async def _taken(self, table: str, what: str, name: str) -> str:
        """The message for a name taken in ``table`` (names compare without case)."""
        row = await self.pool.fetchone(
            f"SELECT name FROM {table} WHERE lower(name) = lower(%s)", (name,))
        if row is None or row["name"] == name:
            return f"{what} {name!r} already exists"
        return (f"{what} {name!r} already exists as {row['name']!r} "
                "(names are unique regardless of case)")

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

    # -- API tokens ----------------------------------------------------------

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

    # -- SSH keys -----------------------------------------------------------

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
        rows = await self.pool.fetchall(
            "SELECT k.key_type, k.body, u.name FROM ssh_keys k JOIN users u ON u.id = k.user_id "
            "WHERE NOT u.disabled AND k.user_id IN ("
            "  SELECT owner_id FROM jobs WHERE id = %(job)s UNION "
            "  SELECT user_id FROM grants WHERE job_id = %(job)s AND privilege = 'manage' "
            "  AND user_id IS NOT NULL) ORDER BY u.name, k.created_at, k.id", {"job": job_id})
        return [f"{r['key_type']} {r['body']} {r['name']}" for r in rows]

    async def set_ssh_host_keys(self, host_id: int, job_id: str, keys: list[str]) -> None:
        """Record a running job's SSH host keys, as its own host reports them."""
        async def update(cur: Cursor) -> None:
            row = await cur.fetchone("SELECT host_id, state FROM jobs WHERE id = %s "
                                     "FOR UPDATE", (job_id,))
            if row is None or row["host_id"] != host_id:
                raise NotYourJob(f"job {job_id} is not on this host")
            if row["state"] != "terminated":
                await cur.execute("UPDATE jobs SET ssh_host_keys = %s, updated_at = now() "
                                  "WHERE id = %s", (Json(keys), job_id))

        await self.pool.transaction(update)

    # -- hosts ---------------------------------------------------------------

    def _host_query(self, where: str, admin: bool = False) -> str:
        # Admins also see which switchboard instance holds the host's link.
        extra = ", h.instance" if admin else ""
        return (f"SELECT {_HOST_COLUMNS}{extra}, "
                f"{_MY_GRANTS.format(column='host_id', alias='h')} "
                f"FROM hosts h LEFT JOIN users o ON o.id = h.owner_id WHERE {where}")

    async def create_host(self, name: str, tags: list[str], owner_id: int | None,
                          description: str, digest: bytes) -> None:
        try:
            await self.pool.execute(
                "INSERT INTO hosts (name, tags, owner_id, description, token_hash) "
                "VALUES (%s, %s, %s, %s, %s)",
                (name, tags, owner_id, description, psycopg2.Binary(digest)))
        except psycopg2.errors.UniqueViolation as e:
            raise _unique(e, f"host {name!r}") from None

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
                          digest: bytes | None = None) -> None:
        row = await self.pool.fetchone(
            "UPDATE hosts SET tags = coalesce(%(tags)s, tags), "
            "enabled = coalesce(%(enabled)s, enabled), "
            "healthy = CASE WHEN %(reset)s THEN true ELSE healthy END, "
            "consecutive_failures = CASE WHEN %(reset)s THEN 0 ELSE consecutive_failures END, "
            "token_hash = coalesce(%(digest)s, token_hash) "
            "WHERE name = %(name)s RETURNING id",
            {"tags": tags, "enabled": enabled, "reset": reset_health, "name": name,
             "digest": psycopg2.Binary(digest) if digest is not None else None})
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

    # -- images catalogue ------------------------------------------------------

    def _image_query(self, where: str) -> str:
        return (f"SELECT {_IMAGE_COLUMNS}, {_MY_GRANTS.format(column='image_id', alias='i')} "
                f"FROM images i LEFT JOIN users o ON o.id = i.owner_id WHERE {where}")

    async def create_image(self, name: str, digest: str, stores: list[str], owner_id: int,
                           description: str, host_tags: Sequence[str] = (),
                           results: dict[str, str] | None = None,
                           kind: str | None = None) -> None:
        async def create(cur: Cursor) -> None:
            row = await cur.fetchone(
                "INSERT INTO images (name, digest, stores, owner_id, description, host_tags, "
                "results, kind) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (name, digest, stores, owner_id, description, list(host_tags),
                 Json(results) if results else None, kind))
            await _record_version(cur, row["id"], owner_id, "created", None)

        try:
            await self.pool.transaction(create)
        except psycopg2.errors.UniqueViolation:
            raise Conflict(await self._taken("images", "image", name)) from None

    async def get_image(self, name: str, principal: Principal) -> dict:
        row = await self.pool.fetchone(self._image_query("lower(i.name) = lower(%(name)s)"),
                                       {"name": name, "uid": principal.user_id})
        if row is None:
            raise NotFound(f"no image {name!r}")
        return row

    async def list_images(self, principal: Principal) -> list[dict]:
        where = "true" if principal.admin else (
            "(i.owner_id = %(uid)s OR EXISTS (SELECT 1 FROM grants g WHERE g.image_id = i.id "
            "AND (g.user_id = %(uid)s OR g.user_id IS NULL)))")
        return await self.pool.fetchall(self._image_query(where) + " ORDER BY i.name",
                                        {"uid": principal.user_id})

    async def readable_repositories(self, principal: Principal) -> list[str]:
        """Repositories of the catalogue images ``principal`` may use that lend them
        (see ``_LENDS``): what the image gives pull on."""
        rows = await self.pool.fetchall(
            "SELECT DISTINCT lower(i.name) AS repository FROM images i "
            "LEFT JOIN users o ON o.id = i.owner_id WHERE (i.owner_id = %(uid)s OR EXISTS "
            "(SELECT 1 FROM grants g WHERE g.image_id = i.id "
            f"AND (g.user_id = %(uid)s OR g.user_id IS NULL))) AND {_LENDS}",
            {"uid": principal.user_id})
        return [row["repository"] for row in rows]

    async def image_lends(self, name: str) -> bool:
        """Whether catalogue image ``name`` may lend its repository (``_LENDS``)."""
        row = await self.pool.fetchone(
            f"SELECT {_LENDS} AS lends FROM images i LEFT JOIN users o ON o.id = i.owner_id "
            "WHERE lower(i.name) = lower(%(name)s)", {"name": name})
        return bool(row and row["lends"])

    async def images_by_digest(self, digest: str, principal: Principal) -> list[dict]:
        return await self.pool.fetchall(
            self._image_query("i.digest = %(digest)s") + " ORDER BY i.name",
            {"digest": digest, "uid": principal.user_id})

    async def update_image(self, name: str, *, digest: str | None, stores: list[str] | None,
                           description: str | None,
                           host_tags: Sequence[str] | None = None,
                           results: dict[str, str] | bool | None = False,
                           kind: str | None = None, by: int | None = None,
                           keep: int = 50) -> None:
        """Change an image; a new digest is recorded as a new version (the last ``keep``
        versions are kept), by user ``by``. ``results``: new console patterns, None to
        clear them, False to keep them."""
        async def update(cur: Cursor) -> None:
            old = await cur.fetchone("SELECT id, digest FROM images "
                                     "WHERE lower(name) = lower(%s) FOR UPDATE", (name,))
            if old is None:
                raise NotFound(f"no image {name!r}")
            await cur.execute(
                "UPDATE images SET digest = coalesce(%s, digest), stores = coalesce(%s, stores), "
                "description = coalesce(%s, description), "
                "host_tags = coalesce(%s, host_tags), kind = coalesce(%s, kind), "
                "results = CASE WHEN %s THEN %s::jsonb ELSE results END, "
                "updated_at = now() WHERE id = %s",
                (digest, stores, description,
                 list(host_tags) if host_tags is not None else None, kind,
                 results is not False, Json(results) if results else None, old["id"]))
            if digest is not None and digest != old["digest"]:
                await _record_version(cur, old["id"], by, "replaced", keep)

        await self.pool.transaction(update)

    async def rollback_image(self, name: str, version: int, by: int | None,
                             keep: int = 50) -> None:
        """Make ``version`` of the image current again (digest, stores, host tags, kind),
        recorded as a new version; :class:`NotFound` if it is not (or no longer) kept."""
        async def rollback(cur: Cursor) -> None:
            image = await cur.fetchone("SELECT id FROM images WHERE lower(name) = lower(%s) "
                                       "FOR UPDATE", (name,))
            if image is None:
                raise NotFound(f"no image {name!r}")
            row = await cur.fetchone(
                "UPDATE images i SET digest = v.digest, stores = v.stores, "
                "host_tags = v.host_tags, kind = v.kind, updated_at = now() "
                "FROM image_versions v WHERE i.id = %s AND v.image_id = i.id "
                "AND v.version = %s RETURNING i.id", (image["id"], version))
            if row is None:
                raise NotFound(f"image {name!r} has no version {version} (see its history)")
            await _record_version(cur, image["id"], by, f"rollback to version {version}", keep)

        await self.pool.transaction(rollback)

    async def image_history(self, image_id: int) -> list[dict]:
        """The image's kept versions, newest first."""
        return await self.pool.fetchall(
            "SELECT v.version, v.digest, v.stores, v.host_tags, v.kind, u.name AS by, "
            "v.created_at, v.note FROM image_versions v LEFT JOIN users u "
            "ON u.id = v.created_by WHERE v.image_id = %s ORDER BY v.version DESC",
            (image_id,))

    async def delete_image(self, name: str) -> None:
        row = await self.pool.fetchone(
            "DELETE FROM images WHERE lower(name) = lower(%s) RETURNING id", (name,))
        if row is None:
            raise NotFound(f"no image {name!r}")

    # -- registered image stores ----------------------------------------------------

    _STORE_COLUMNS = "url, service, description, cache, created_at"

    async def create_image_store(self, url: str, service: str, description: str,
                                 cache: bool) -> dict:
        """Register an image store (or a site cache); :class:`Conflict` on a taken URL
        or service name."""
        try:
            return await self.pool.fetchone(
                "INSERT INTO image_stores (url, service, description, cache) "
                f"VALUES (%s, %s, %s, %s) RETURNING {self._STORE_COLUMNS}",
                (url, service, description, cache))
        except psycopg2.errors.UniqueViolation:
            raise Conflict(f"an image store with URL {url!r} or service {service!r} "
                           "is already registered") from None

    async def list_image_stores(self) -> list[dict]:
        return await self.pool.fetchall(
            f"SELECT {self._STORE_COLUMNS} FROM image_stores ORDER BY url")

    async def image_store_by_service(self, service: str) -> dict | None:
        return await self.pool.fetchone(
            f"SELECT {self._STORE_COLUMNS} FROM image_stores WHERE service = %s", (service,))

    async def delete_image_store(self, service: str) -> None:
        """Unregister the store of ``service``; catalogue images keep naming its URL, but
        no job start carries it and no token is issued for it any more."""
        row = await self.pool.fetchone(
            "DELETE FROM image_stores WHERE service = %s RETURNING id", (service,))
        if row is None:
            raise NotFound(f"no image store with service name {service!r} is registered")

    # -- grants ------------------------------------------------------------------

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
            raise _unique(e, "this grant") from None
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

    # -- jobs ----------------------------------------------------------------------

    def _job_query(self, where: str) -> str:
        return (f"SELECT {_JOB_COLUMNS}, {_MY_GRANTS.format(column='job_id', alias='j')} "
                "FROM jobs j JOIN users o ON o.id = j.owner_id "
                f"LEFT JOIN hosts h ON h.id = j.host_id WHERE {where}")

    async def _insert_job(self, cur: Cursor, owner_id: int, spec: JobSpec) -> dict:
        """Insert a queued job; return it as :meth:`get_job` would, from this transaction."""
        row = await cur.fetchone(
            "INSERT INTO jobs (owner_id, label, image_name, image_digest, image_stores, "
            "tags, parameters, timeout, queue_timeout, max_restarts, restarts_left, "
            "queue_deadline, event_seq, log_servers, results, image_kind, reservation) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
            "now() + make_interval(secs => %s), 1, %s, %s, %s, %s) RETURNING id",
            (owner_id, spec.label, spec.image_name, spec.image_digest, spec.image_stores,
             spec.tags, Json(spec.parameters), spec.timeout, spec.queue_timeout,
             spec.max_restarts, spec.max_restarts, spec.queue_timeout,
             list(spec.log_servers), Json(spec.results) if spec.results else None,
             spec.image_kind, spec.reservation))
        assert row is not None
        await cur.execute(
            "INSERT INTO job_events (job_id, seq, state) VALUES (%s, 1, 'queued')",
            (row["id"],))
        job = await cur.fetchone(self._job_query("j.id = %(id)s"),
                                 {"id": row["id"], "uid": owner_id})
        assert job is not None
        return job

    async def enqueue(self, owner_id: int, spec: JobSpec) -> dict:
        """Enqueue a job; the row returned is read in the inserting transaction, so the
        answer never needs another connection after the commit."""
        return await self.pool.transaction(lambda cur: self._insert_job(cur, owner_id, spec))

    async def remembered_job(self, owner_id: int, key: str, fingerprint: bytes) -> dict | None:
        """The answer kept for ``owner_id``'s Idempotency-Key ``key``, if any.

        Raises :class:`IdempotencyKeyReused` if the key came with another request.
        """
        row = await self.pool.fetchone(
            "SELECT fingerprint, response FROM job_idempotency WHERE owner_id = %s "
            "AND key = %s AND created_at > now() - make_interval(secs => %s)",
            (owner_id, key, IDEMPOTENCY_RETENTION))
        if row is None:
            return None
        if bytes(row["fingerprint"]) != fingerprint:
            raise IdempotencyKeyReused("Idempotency-Key: already used for another request")
        return row["response"]

    async def enqueue_once(self, owner_id: int, spec: JobSpec, key: str, fingerprint: bytes,
                           render: Callable[[dict], Any]) -> Any:
        """Enqueue a job under an Idempotency-Key and keep ``render(job)``, the answer,
        in the same transaction; a concurrent or later request with the same key gets
        that answer (see :meth:`remembered_job`) and no second job."""

        async def insert(cur: Cursor) -> Any:
            # Forget this user's expired keys (this one included).
            await cur.execute(
                "DELETE FROM job_idempotency WHERE owner_id = %s "
                "AND created_at <= now() - make_interval(secs => %s)",
                (owner_id, IDEMPOTENCY_RETENTION))
            job = await self._insert_job(cur, owner_id, spec)
            response = render(job)
            # A concurrent request with the key waits here for ours to commit, then fails.
            await cur.execute(
                "INSERT INTO job_idempotency (owner_id, key, fingerprint, job_id, response) "
                "VALUES (%s, %s, %s, %s, %s::json)",
                (owner_id, key, fingerprint, job["id"], dumps(response).decode("utf-8")))
            return response

        try:
            return await self.pool.transaction(insert)
        except psycopg2.errors.UniqueViolation:
            remembered = await self.remembered_job(owner_id, key, fingerprint)
            if remembered is None:
                raise
            return remembered

    async def get_job(self, job_id: str, principal: Principal) -> dict:
        row = await self.pool.fetchone(self._job_query("j.id = %(id)s"),
                                       {"id": job_id, "uid": principal.user_id})
        if row is None:
            raise NotFound(f"no job {job_id}")
        return row

    async def list_jobs(self, principal: Principal, *, states: Sequence[str] = (),
                        owner: str | None = None, before_seq: int | None = None,
                        limit: int = 100, id_range: tuple[str, str] | None = None,
                        restart_of: str | None = None) -> list[dict]:
        """Jobs ``principal`` may read, newest first; ``id_range`` is an inclusive
        (low, high) pair of UUIDs (an id prefix), ``restart_of`` a predecessor's id."""
        clauses = ["true"]
        if id_range is not None:
            clauses.append("j.id BETWEEN %(id_low)s AND %(id_high)s")
        if restart_of is not None:
            clauses.append("j.restart_of = %(restart_of)s")
        if not principal.admin:
            clauses.append(
                "(j.owner_id = %(uid)s OR EXISTS (SELECT 1 FROM grants g WHERE g.job_id = j.id "
                "AND (g.user_id = %(uid)s OR g.user_id IS NULL)))")
        if states:
            clauses.append("j.state = ANY(%(states)s)")
        if owner is not None:
            clauses.append("o.name = %(owner)s")
        if before_seq is not None:
            clauses.append("j.seq < %(before)s")
        return await self.pool.fetchall(
            self._job_query(" AND ".join(clauses)) + " ORDER BY j.seq DESC LIMIT %(limit)s",
            {"uid": principal.user_id, "states": list(states), "owner": owner,
             "before": before_seq, "limit": limit, "restart_of": restart_of,
             "id_low": id_range[0] if id_range else None,
             "id_high": id_range[1] if id_range else None})

    async def job_events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[dict]:
        return await self.pool.fetchall(
            f"SELECT {_EVENT_COLUMNS} FROM job_events e WHERE e.job_id = %s AND e.seq > %s "
            "ORDER BY e.seq LIMIT %s", (job_id, after, limit))

    async def transition(self, job_id: str, new: Status, *, exit_status: int | None = None,
                         message: str | None = None) -> bool:
        """Move a job to ``new`` in one transaction; False if nothing changed.

        Raises :class:`NotFound` and :class:`jobstate.InvalidTransition`.
        """
        return await self.pool.transaction(
            lambda cur: transition(cur, job_id, new, exit_status=exit_status, message=message,
                                   max_host_failures=self.max_host_failures))

    async def request_termination(self, job_id: str, reason: Reason,
                                  message: str | None = None) -> bool:
        """End a queued job at once, or start stopping an active one.

        The target is chosen under the row lock, so a job assigned meanwhile
        goes to ``terminating`` (its host must stop it), never straight to
        ``terminated``. Returns False when nothing changed.
        """

        async def terminate(cur: Cursor) -> bool:
            row = await cur.fetchone(
                "SELECT state, reservation FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            if row is None:
                raise NotFound(f"no job {job_id}")
            state = State(row["state"])
            if state is State.TERMINATED:
                return False
            text = message
            if reason is Reason.EXECUTION_TIMEOUT and row["reservation"] and text is None:
                text = "reservation expired"
            target = State.TERMINATED if state is State.QUEUED else State.TERMINATING
            return await transition(cur, job_id, Status(target, reason=reason), message=text,
                                    max_host_failures=self.max_host_failures)

        return await self.pool.transaction(terminate)

    async def extend_job(self, job_id: str, by: float, max_timeout: float) -> dict:
        """Move a job's deadline ``by`` seconds later (a queued job's timeout grows).

        The new deadline lies at most ``max_timeout`` seconds from now. Raises
        :class:`NotFound`, :class:`Conflict` for a job that is ending or ended,
        and :class:`ValueError` past the bound.
        """

        async def extend(cur: Cursor) -> dict:
            row = await cur.fetchone(
                "SELECT state, extract(epoch FROM coalesce(deadline, now() "
                "+ make_interval(secs => timeout)) - now())::float8 AS left "
                "FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            if row is None:
                raise NotFound(f"no job {job_id}")
            if row["state"] in (State.TERMINATING.value, State.TERMINATED.value):
                raise Conflict(f"job {job_id} is {row['state']}")
            if max(row["left"], 0.0) + by > max_timeout:
                raise ValueError(f"by: the deadline may lie at most {max_timeout:g} "
                                 f"seconds ahead ({max(row['left'], 0.0):.0f} s left)")
            updated = await cur.fetchone(
                "UPDATE jobs SET timeout = timeout + %(by)s, deadline = CASE WHEN deadline "
                "IS NOT NULL THEN greatest(deadline, now()) + make_interval(secs => %(by)s) END, "
                "updated_at = now() WHERE id = %(id)s RETURNING deadline",
                {"id": job_id, "by": by})
            assert updated is not None
            return updated

        return await self.pool.transaction(extend)

    async def job_terminated(self, job_id: str) -> bool:
        row = await self.pool.fetchone("SELECT state FROM jobs WHERE id = %s", (job_id,))
        return row is None or row["state"] == State.TERMINATED.value

    async def expired_jobs(self, limit: int = 100) -> list[tuple[str, Reason]]:
        """Jobs past their queue or execution deadline, with the reason to end them."""
        rows = await self.pool.fetchall(
            "(SELECT id, 'queue_timeout' AS reason FROM jobs "
            " WHERE state = 'queued' AND queue_deadline <= now() ORDER BY seq LIMIT %s) "
            "UNION ALL "
            "(SELECT id, 'execution_timeout' FROM jobs "
            " WHERE state IN ('assigned', 'initializing', 'ready') AND deadline <= now() "
            " ORDER BY seq LIMIT %s)", (limit, limit))
        return [(row["id"], Reason(row["reason"])) for row in rows]

    # -- supervisor links ------------------------------------------------------------

    async def host_by_token(self, digest: bytes) -> dict | None:
        return await self.pool.fetchone(
            "SELECT id, name FROM hosts WHERE token_hash = %s", (psycopg2.Binary(digest),))

    async def link_connected(self, host_id: int, instance: str, session: str,
                             instance_id: str | None = None) -> None:
        """Record that ``instance`` (the process ``instance_id``) holds the host's link as
        ``session``, superseding any."""
        await self.pool.execute(
            "UPDATE hosts SET instance = %s, instance_id = %s, session = %s, "
            "connected_at = now(), last_seen_at = now() WHERE id = %s",
            (instance, instance_id, session, host_id))

    async def links_ended(self, sessions: list[str]) -> None:
        """Forget many links at once (an instance shutting down)."""
        if sessions:
            await self.pool.execute(
                "UPDATE hosts SET instance = NULL, instance_id = NULL, session = NULL, "
                "last_seen_at = now() WHERE session = ANY(%s::uuid[])", (sessions,))

    async def link_disconnected(self, host_id: int, session: str) -> None:
        """Forget the link unless a newer session superseded it."""
        await self.pool.execute(
            "UPDATE hosts SET instance = NULL, instance_id = NULL, session = NULL, "
            "last_seen_at = now() WHERE id = %s AND session = %s", (host_id, session))

    async def set_host_kinds(self, host_id: int, kinds: Sequence[str] | None,
                             session: str) -> None:
        """Record the image kinds the host's supervisor reports on link ``session`` (None:
        any kind); from then on the scheduler may offer the host jobs (``kinds_session``).
        A change wakes the scheduler (the hosts trigger)."""
        value = sorted(kinds) if kinds is not None else None
        await self.pool.execute(
            "UPDATE hosts SET kinds = %(kinds)s, kinds_session = session WHERE id = %(id)s "
            "AND session = %(session)s::uuid AND (kinds IS DISTINCT FROM %(kinds)s::text[] "
            "OR kinds_session IS DISTINCT FROM session)",
            {"kinds": value, "id": host_id, "session": session})

    async def host_link_state(self, host_id: int) -> dict | None:
        """The host's token hash and link session, or None if it was removed."""
        return await self.pool.fetchone(
            "SELECT token_hash, session FROM hosts WHERE id = %s", (host_id,))

    async def touch_links(self, sessions: list[str]) -> None:
        """Refresh last_seen_at of the hosts whose links this instance holds."""
        if sessions:
            await self.pool.execute(
                "UPDATE hosts SET last_seen_at = now() WHERE session = ANY(%s::uuid[])",
                (sessions,))

    async def active_job(self, host_id: int) -> dict | None:
        """The job holding the host, if any (at most one: an index ensures it)."""
        return await self.pool.fetchone(
            "SELECT id, state, stage, termination_reason FROM jobs "
            "WHERE host_id = %s AND state IN ('assigned', 'initializing', 'ready', "
            "'terminating')", (host_id,))

    async def job_start(self, job_id: str) -> dict | None:
        """The row a supervisor's ``JobStart`` is built from (secrets included; see
        :mod:`treadmill.switchboard.jobstart`). Its ``image_stores`` are the job's
        registered ones only: a store removed since the job was enqueued (or never
        registered) does not reach a host."""
        return await self.pool.fetchone(
            "SELECT j.id, j.image_name, j.image_digest, j.parameters, j.timeout, j.tags, "
            "j.label, j.host_id, j.log_servers, j.results, j.reservation, "
            "ARRAY(SELECT u.url FROM unnest(j.image_stores) WITH ORDINALITY AS u(url, n) "
            "WHERE rtrim(u.url, '/') IN (SELECT s.url FROM image_stores s) ORDER BY u.n) "
            "AS image_stores FROM jobs j WHERE j.id = %s", (job_id,))

    async def apply_host_event(self, host_id: int, job_id: str, new: Status, *,
                               exit_status: int | None = None,
                               message: str | None = None) -> bool:
        """Apply a supervisor's job event; only for jobs on its own host."""

        async def apply(cur: Cursor) -> bool:
            row = await cur.fetchone("SELECT host_id FROM jobs WHERE id = %s", (job_id,))
            if row is None or row["host_id"] != host_id:
                raise NotYourJob(f"job {job_id} is not on this host")
            return await transition(cur, job_id, new, exit_status=exit_status,
                                    message=message, max_host_failures=self.max_host_failures)

        return await self.pool.transaction(apply)

    async def schedule(self, fresh_within: float, fairness_window: float = 3600.0, *,
                       dead_after: float = INSTANCE_DEAD_AFTER, limit: int = 2000,
                       timeouts: dict[str, int] | None = None) -> ScheduleResult:
        """Assign queued jobs to free hosts in one transaction.

        Free hosts are enabled, healthy, idle and connected through a live
        instance (:data:`_LIVE_INSTANCE`, ``dead_after``) on a link that has
        reported its kinds (answered a status request: ``kinds_session``). Only jobs some free
        host may run are read (``limit`` at most, and per user and tag set no
        more than there are free hosts), so a runnable job is never stuck behind jobs no
        host can take. A user's share is the number of jobs holding hosts plus
        those assigned within ``fairness_window`` seconds: the user with the
        smallest share goes first.

        Only one instance schedules at a time (a transaction advisory lock,
        tried, never waited for: ``locked`` is False when another holds it).
        The transaction runs under :data:`SCHEDULING_TIMEOUTS`, and locks only
        the jobs it assigns (``SKIP LOCKED``: a job locked elsewhere, being
        cancelled say, waits for a later pass: ``skipped``).
        """
        from treadmill.switchboard.scheduling import FreeHost, QueuedJob, assign

        limits = {**SCHEDULING_TIMEOUTS, **(timeouts or {})}

        async def run(cur: Cursor) -> ScheduleResult:
            sets = ", ".join(f"set_config('{name}', %({name})s, true)" for name in limits)
            locked = await cur.fetchone(
                f"SELECT {sets}, pg_try_advisory_xact_lock(%(lock)s) AS ok",
                {**{name: str(value) for name, value in limits.items()},
                 "lock": SCHEDULER_LOCK})
            if not locked or not locked["ok"]:
                return ScheduleResult(locked=False)
            params = {"fresh": fresh_within, "dead": dead_after}
            hosts = await cur.fetchall(
                "SELECT h.id, h.name, h.owner_id, h.tags, h.kinds, "
                "ARRAY(SELECT g.user_id FROM grants g "
                "  WHERE g.host_id = h.id AND g.privilege IN ('start', 'manage')) AS starters "
                "FROM hosts h JOIN instances i ON i.id = h.instance_id "
                "WHERE h.enabled AND h.healthy AND h.session IS NOT NULL "
                "AND h.kinds_session = h.session "
                "AND h.last_seen_at > now() - make_interval(secs => %(fresh)s) "
                f"AND {_LIVE_INSTANCE} "
                "AND NOT EXISTS (SELECT 1 FROM jobs a WHERE a.host_id = h.id AND a.state IN "
                "('assigned', 'initializing', 'ready', 'terminating'))", params)
            if not hosts:
                return ScheduleResult()
            # Each distinct (owner, tags, image kind) of the queue is checked against
            # the free hosts once; then of each runnable kind, the oldest jobs, as
            # many as there are hosts (a user's jobs for one kind of host cannot
            # hide their jobs for another). A NULL image kind or host kinds: any.
            jobs = await cur.fetchall(
                "WITH free AS (SELECT id, owner_id, tags, kinds FROM hosts "
                "  WHERE id = ANY(%(hosts)s)), "
                "kinds AS (SELECT DISTINCT owner_id, tags, image_kind FROM jobs "
                "  WHERE state = 'queued'), "
                "runnable AS (SELECT k.owner_id, k.tags, k.image_kind, u.admin FROM kinds k "
                "  JOIN users u ON u.id = k.owner_id WHERE EXISTS (SELECT 1 FROM free h "
                "  WHERE h.tags @> k.tags AND (h.kinds IS NULL OR k.image_kind IS NULL "
                "  OR k.image_kind = ANY(h.kinds)) AND (u.admin OR h.owner_id = k.owner_id "
                "  OR EXISTS (SELECT 1 FROM grants g WHERE g.host_id = h.id "
                "  AND g.privilege IN ('start', 'manage') "
                "  AND (g.user_id = k.owner_id OR g.user_id IS NULL))))), "
                "ranked AS (SELECT j.id, j.seq, j.owner_id, r.admin, j.tags, j.image_kind, "
                "  row_number() OVER (PARTITION BY j.owner_id, j.tags, j.image_kind "
                "  ORDER BY j.seq) AS n FROM jobs j "
                "  JOIN runnable r ON r.owner_id = j.owner_id AND r.tags = j.tags "
                "  AND r.image_kind IS NOT DISTINCT FROM j.image_kind "
                "  WHERE j.state = 'queued') "
                "SELECT id, seq, owner_id, admin, tags, image_kind FROM ranked "
                "WHERE n <= %(per_kind)s "
                "ORDER BY seq LIMIT %(limit)s",
                {"hosts": [h["id"] for h in hosts], "per_kind": len(hosts), "limit": limit})
            if not jobs:
                return ScheduleResult()
            counts = await cur.fetchall(
                "SELECT owner_id, count(*) AS n FROM jobs WHERE state IN "
                "('assigned', 'initializing', 'ready', 'terminating') "
                "OR assigned_at > now() - make_interval(secs => %s) GROUP BY owner_id",
                (fairness_window,))
            pairs = assign(
                [QueuedJob(j["id"], j["seq"], j["owner_id"], j["admin"], frozenset(j["tags"]),
                           j["image_kind"]) for j in jobs],
                [FreeHost(h["id"], h["name"], h["owner_id"], frozenset(h["tags"]),
                          frozenset(h["starters"]),
                          frozenset(h["kinds"]) if h["kinds"] is not None else None)
                 for h in hosts],
                {c["owner_id"]: c["n"] for c in counts})
            if not pairs:
                return ScheduleResult()
            rows = await cur.fetchall(
                "SELECT id FROM jobs WHERE id = ANY(%s::uuid[]) AND state = 'queued' "
                "FOR UPDATE SKIP LOCKED", ([job.id for job, _ in pairs],))
            mine = {str(row["id"]) for row in rows}
            done = []
            for job, host in pairs:
                if str(job.id) not in mine:
                    continue
                await cur.execute("UPDATE jobs SET host_id = %s WHERE id = %s",
                                  (host.id, job.id))
                await transition(cur, job.id, Status(State.ASSIGNED),
                                 message=f"assigned to {host.name}")
                done.append((str(job.id), host.id))
            return ScheduleResult(pairs=done, more=len(jobs) >= limit,
                                  skipped=len(pairs) - len(done))

        return await self.pool.transaction(run)

    async def unreachable_jobs(self, after: float) -> list[str]:
        """Active jobs whose host's supervisor has been gone longer than ``after`` (R9)."""
        rows = await self.pool.fetchall(
            "SELECT j.id FROM jobs j JOIN hosts h ON h.id = j.host_id "
            "WHERE j.state IN ('assigned', 'initializing', 'ready', 'terminating') "
            "AND coalesce(h.last_seen_at, j.assigned_at) < now() - make_interval(secs => %s) "
            "ORDER BY j.seq LIMIT 100", (after,))
        return [row["id"] for row in rows]

    async def unrunnable_jobs(self, grace: float) -> list[tuple[str, str | None]]:
        """Queued jobs older than ``grace`` that no existing host could ever run, with
        their image kind if some host could run them but for the kind (else None)."""
        allowed = ("(u.admin OR h.owner_id = j.owner_id OR EXISTS (SELECT 1 FROM grants g "
                   "WHERE g.host_id = h.id AND g.privilege IN ('start', 'manage') "
                   "AND (g.user_id = j.owner_id OR g.user_id IS NULL)))")
        rows = await self.pool.fetchall(
            "SELECT j.id, CASE WHEN EXISTS (SELECT 1 FROM hosts h WHERE h.tags @> j.tags "
            f"  AND {allowed}) THEN j.image_kind END AS kind "
            "FROM jobs j JOIN users u ON u.id = j.owner_id "
            "WHERE j.state = 'queued' AND j.created_at < now() - make_interval(secs => %s) "
            "AND NOT EXISTS (SELECT 1 FROM hosts h WHERE h.tags @> j.tags "
            "  AND (h.kinds IS NULL OR j.image_kind IS NULL OR j.image_kind = ANY(h.kinds)) "
            "  AND (u.admin "
            "  OR h.owner_id = j.owner_id OR EXISTS (SELECT 1 FROM grants g "
            "  WHERE g.host_id = h.id AND g.privilege IN ('start', 'manage') "
            "  AND (g.user_id = j.owner_id OR g.user_id IS NULL)))) "
            "ORDER BY j.seq LIMIT 100", (grace,))
        return [(row["id"], row["kind"]) for row in rows]

    async def job_counts(self) -> dict[str, int]:
        rows = await self.pool.fetchall("SELECT state, count(*) AS n FROM jobs GROUP BY state")
        return {row["state"]: row["n"] for row in rows}

    async def host_counts(self) -> dict[str, int]:
        """Hosts registered, and those connected, healthy, enabled and busy (a metric)."""
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
            "  AND j.state IN ('assigned', 'initializing', 'ready', 'terminating'))) AS busy "
            "FROM hosts h")
        assert row is not None
        return {key: int(value) for key, value in row.items()}

    async def set_endpoints(self, host_id: int, job_id: str,
                            endpoints: list[dict[str, Any]]) -> bool:
        """Record a running job's public endpoints, as its own host reports them."""
        async def update(cur: Cursor) -> bool:
            row = await cur.fetchone("SELECT host_id, state FROM jobs WHERE id = %s "
                                     "FOR UPDATE", (job_id,))
            if row is None or row["host_id"] != host_id:
                raise NotYourJob(f"job {job_id} is not on this host")
            if row["state"] == "terminated":
                return False
            await cur.execute("UPDATE jobs SET endpoints = %s, updated_at = now() "
                              "WHERE id = %s", (Json(endpoints), job_id))
            return True

        return await self.pool.transaction(update)

    # -- switchboard instances -------------------------------------------------------

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
            f"live AS (SELECT i.id, i.started_at FROM instances i WHERE ({_LIVE_INSTANCE}) "
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
            f"({_LIVE_INSTANCE}) AS live, (SELECT count(*) FROM hosts h "
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

    # -- snapshots -------------------------------------------------------------------

    _SNAPSHOT_COLUMNS = ("s.id, s.job_id, s.name, s.repository, s.store, s.description, "
                         "s.state, s.digest, s.error_code, s.message, s.created_at, "
                         "s.finished_at, s.host_id, s.owner_id, u.name AS owner")

    async def create_snapshot(self, job_id: str, host_id: int, owner_id: int, name: str,
                              repository: str, store: str, description: str) -> dict:
        """Record a pending snapshot of an ended job (:class:`Conflict` if ``name`` is
        taken by a catalogue image or another pending snapshot)."""
        async def create(cur: Cursor) -> dict:
            taken = await cur.fetchone("SELECT 1 FROM images WHERE lower(name) = lower(%s)",
                                       (name,))
            if taken is not None:
                raise Conflict(f"image {name!r} already exists")
            try:
                row = await cur.fetchone(
                    "INSERT INTO snapshots (job_id, host_id, owner_id, name, repository, store, "
                    "description) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    (job_id, host_id, owner_id, name, repository, store, description))
            except psycopg2.errors.UniqueViolation:
                raise Conflict(f"a snapshot named {name!r} is already under way") from None
            assert row is not None
            found = await cur.fetchone(
                f"SELECT {self._SNAPSHOT_COLUMNS} FROM snapshots s JOIN users u "
                "ON u.id = s.owner_id WHERE s.id = %s", (row["id"],))
            assert found is not None
            return found

        return await self.pool.transaction(create)

    async def get_snapshot(self, job_id: str, snapshot_id: str) -> dict:
        row = await self.pool.fetchone(
            f"SELECT {self._SNAPSHOT_COLUMNS} FROM snapshots s JOIN users u "
            "ON u.id = s.owner_id WHERE s.id = %s AND s.job_id = %s", (snapshot_id, job_id))
        if row is None:
            raise NotFound(f"no snapshot {snapshot_id} of job {job_id}")
        return row

    async def job_snapshots(self, job_id: str) -> list[dict]:
        return await self.pool.fetchall(
            f"SELECT {self._SNAPSHOT_COLUMNS} FROM snapshots s JOIN users u "
            "ON u.id = s.owner_id WHERE s.job_id = %s ORDER BY s.created_at", (job_id,))

    async def pending_snapshots(self, host_id: int) -> list[dict]:
        """The host's snapshots still to be made, oldest first."""
        return await self.pool.fetchall(
            "SELECT id, job_id, repository, store FROM snapshots "
            "WHERE host_id = %s AND state = 'pending' ORDER BY created_at", (host_id,))

    async def snapshot_repositories(self, host_id: int) -> list[str]:
        """Repositories the host may push to: those of its pending snapshots."""
        rows = await self.pool.fetchall(
            "SELECT DISTINCT repository FROM snapshots WHERE host_id = %s "
            "AND state = 'pending'", (host_id,))
        return [row["repository"] for row in rows]

    async def finish_snapshot(self, host_id: int, snapshot_id: str, *,
                              digest: str | None = None,
                              error: tuple[str, str] | None = None) -> bool:
        """Apply a host's ``snapshot_result``: a digest registers the new catalogue image
        (owned by the snapshot's owner). False if the snapshot was not pending;
        :class:`NotYourJob` if it is another host's."""
        async def finish(cur: Cursor) -> bool:
            row = await cur.fetchone("SELECT * FROM snapshots WHERE id = %s FOR UPDATE",
                                     (snapshot_id,))
            if row is None or row["host_id"] != host_id:
                raise NotYourJob(f"snapshot {snapshot_id} is not this host's")
            if row["state"] != "pending":
                return False
            outcome: tuple[str, str | None, str | None, str | None]
            if digest is not None:
                await cur.execute("SAVEPOINT register")
                try:
                    # The snapshot keeps its parent's host tags and kind: those of
                    # the job's catalogue image (as it is now), else the job's own.
                    await cur.execute(
                        "INSERT INTO images (name, digest, stores, owner_id, description, "
                        "host_tags, kind) SELECT %s, %s, %s, %s, %s, "
                        "coalesce(p.host_tags, '{}'), coalesce(j.image_kind, p.kind) "
                        "FROM jobs j LEFT JOIN images p ON lower(p.name) = lower(j.image_name) "
                        "WHERE j.id = %s RETURNING id",
                        (row["name"], digest, [row["store"]], row["owner_id"],
                         row["description"], row["job_id"]))
                    created = await cur.fetchone("SELECT id FROM images "
                                                 "WHERE lower(name) = lower(%s)", (row["name"],))
                    await _record_version(cur, created["id"], row["owner_id"],
                                          f"snapshot of job {row['job_id']}", None)
                    outcome = ("done", digest, None, None)
                except psycopg2.errors.UniqueViolation:
                    await cur.execute("ROLLBACK TO SAVEPOINT register")
                    outcome = ("failed", digest, "conflict",
                               f"uploaded as {digest}, but image {row['name']!r} was "
                               "created meanwhile; register it under another name")
            else:
                code, text = error or ("failed", "")
                outcome = ("failed", None, code, text[:1024])
            await cur.execute(
                "UPDATE snapshots SET state = %s, digest = %s, error_code = %s, message = %s, "
                "finished_at = now() WHERE id = %s", (*outcome, snapshot_id))
            return True

        return await self.pool.transaction(finish)

    async def expire_snapshots(self, after: float) -> int:
        """Fail snapshots pending longer than ``after`` seconds; how many."""
        rows = await self.pool.fetchall(
            "UPDATE snapshots SET state = 'failed', error_code = 'timeout', "
            "message = 'the host did not finish the snapshot in time', finished_at = now() "
            "WHERE state = 'pending' AND created_at < now() - make_interval(secs => %s) "
            "RETURNING id", (after,))
        return len(rows)

    async def namespace_grants(self, user_id: int) -> dict[str, frozenset[str]]:
        """The privileges the user holds on each namespace (own grants and grants to all)."""
        rows = await self.pool.fetchall(
            "SELECT namespace, array_agg(DISTINCT privilege) AS privileges FROM grants "
            "WHERE namespace IS NOT NULL AND (user_id = %s OR user_id IS NULL) "
            "GROUP BY namespace", (user_id,))
        return {row["namespace"]: frozenset(row["privileges"]) for row in rows}

    async def namespace_images(self, namespace: str, limit: int = 5) -> list[str]:
        """Names of catalogue images whose repository is in ``namespace``, but for those
        of the user of that name."""
        rows = await self.pool.fetchall(
            "SELECT i.name FROM images i LEFT JOIN users o ON o.id = i.owner_id "
            "WHERE split_part(lower(i.name), '/', 1) = lower(%(ns)s) "
            "AND lower(o.name) IS DISTINCT FROM lower(%(ns)s) ORDER BY i.name LIMIT %(n)s",
            {"ns": namespace, "n": limit})
        return [row["name"] for row in rows]

    async def job_image_names(self, host_id: int) -> list[str]:
        """Catalogue names of the images of the jobs holding a host."""
        rows = await self.pool.fetchall(
            "SELECT image_name FROM jobs WHERE host_id = %s AND image_name IS NOT NULL "
            "AND state IN ('assigned', 'initializing', 'ready', 'terminating')", (host_id,))
        return [row["image_name"] for row in rows]

    async def ping(self) -> None:
        await self.pool.fetchone("SELECT 1")

    # -- audit log (treadmill/switchboard/audit.py) ---------------------------

    async def audited(self, call: Callable[[Store], Awaitable[Any]],
                      describe: Callable[[Any], Any]) -> Any:
        """``await call(store)`` and append ``describe(result)`` in one transaction: no
        change without its record, no record without its change. ``call`` gets a store
        whose every query runs in that transaction; it must not go on querying after a
        database error (the transaction is aborted then)."""
        async def run(cur: Cursor) -> Any:
            view = copy.copy(self)
            view.pool = _InTransaction(cur)  # type: ignore[assignment]
            result = await call(view)
            await self.audit_append(describe(result), cur)
            return result
        return await self.pool.transaction(run)

    async def audit_append(self, entry: Any, cur: Cursor | None = None) -> None:
        """Append one :class:`audit.Entry` (in ``cur``'s transaction if given)."""
        sql = ("INSERT INTO audit_log (actor, actor_kind, source, action, subject_kind, "
               "subject_id, subject_user, details) VALUES (%(actor)s, %(actor_kind)s, "
               "%(source)s, %(action)s, %(subject_kind)s, %(subject_id)s, %(subject_user)s, "
               "%(details)s)")
        params = {"actor": entry.actor, "actor_kind": entry.actor_kind,
                  "source": entry.source, "action": entry.action,
                  "subject_kind": entry.subject_kind, "subject_id": entry.subject_id,
                  "subject_user": entry.subject_user,
                  "details": Json(entry.details, dumps=lambda v: dumps(v).decode("utf-8"))}
        if cur is not None:
            await cur.execute(sql, params)
        else:
            await self.pool.execute(sql, params)

    async def audit_list(self, principal: Principal, *, user: str | None = None,
                         host: str | None = None, job: str | None = None,
                         image: str | None = None, action: str | None = None,
                         after: datetime | None = None, before_id: int | None = None,
                         limit: int = 100) -> list[dict]:
        """Records ``principal`` may read, newest first: an admin all; a user those they
        acted in or that name them (``subject_user``), and those about the jobs, hosts
        and images they may read now."""
        clauses = ["true"]
        if not principal.admin:
            clauses.append(
                "((a.actor_kind = 'user' AND lower(a.actor) = lower(%(me)s)) "
                "OR lower(a.subject_user) = lower(%(me)s) "
                "OR (a.subject_kind = 'job' AND EXISTS (SELECT 1 FROM jobs j "
                "WHERE j.id = (CASE WHEN a.subject_kind = 'job' THEN a.subject_id::uuid END) "
                "AND (j.owner_id = %(uid)s OR EXISTS "
                "(SELECT 1 FROM grants g WHERE g.job_id = j.id "
                "AND (g.user_id = %(uid)s OR g.user_id IS NULL))))) "
                "OR (a.subject_kind = 'host' AND EXISTS (SELECT 1 FROM hosts h "
                "WHERE h.name = a.subject_id AND (h.owner_id = %(uid)s OR EXISTS "
                "(SELECT 1 FROM grants g WHERE g.host_id = h.id "
                "AND (g.user_id = %(uid)s OR g.user_id IS NULL))))) "
                "OR (a.subject_kind = 'image' AND EXISTS (SELECT 1 FROM images i "
                "WHERE lower(i.name) = lower(a.subject_id) AND (i.owner_id = %(uid)s OR EXISTS "
                "(SELECT 1 FROM grants g WHERE g.image_id = i.id "
                "AND (g.user_id = %(uid)s OR g.user_id IS NULL))))))")
        if user is not None:
            clauses.append("((a.actor_kind = 'user' AND lower(a.actor) = lower(%(user)s)) "
                           "OR lower(a.subject_user) = lower(%(user)s))")
        for kind, value in (("host", host), ("job", job), ("image", image)):
            if value is not None:
                clauses.append(f"(a.subject_kind = '{kind}' "
                               f"AND lower(a.subject_id) = lower(%({kind})s))")
        if action is not None:
            clauses.append("(a.action = %(action)s OR a.action LIKE %(prefix)s)")
        if after is not None:
            clauses.append("a.at > %(after)s")
        if before_id is not None:
            clauses.append("a.id < %(before)s")
        return await self.pool.fetchall(
            "SELECT a.id, a.at, a.actor, a.actor_kind, a.source, a.action, a.subject_kind, "
            "a.subject_id, a.subject_user, a.details FROM audit_log a "
            f"WHERE {' AND '.join(clauses)} ORDER BY a.id DESC LIMIT %(limit)s",
            {"me": principal.name, "uid": principal.user_id, "user": user, "host": host,
             "job": job, "image": image, "action": action,
             "prefix": (action.replace("\\", "\\\\").replace("%", "\\%")
                        .replace("_", "\\_") + ".%") if action is not None else None,
             "after": after, "before": before_id, "limit": limit})

    async def audit_expire(self, days: float) -> int:
        """Delete records older than ``days``: the only DELETE the table allows."""
        async def expire(cur: Cursor) -> int:
            await cur.execute("SET LOCAL treadmill.audit_retention = 'on'")
            await cur.execute("DELETE FROM audit_log WHERE at < now() - make_interval("
                              "secs => %s)", (days * 86400.0,))
            return cur.rowcount
        return await self.pool.transaction(expire)


async def transition(cur: Cursor, job_id: str, new: Status, *, exit_status: int | None = None,
                     message: str | None = None, max_host_failures: int = 3) -> bool:
    """Apply a state transition inside the caller's transaction.

    Locks the job row, checks the move with :func:`jobstate.check`, stamps the
    state's timestamp, keeps the first termination reason, and appends the
    job event. Returns False (and writes nothing) when the job is already in
    the requested status.
    """
    row = await cur.fetchone(
        "SELECT state, stage, termination_reason, "
        "extract(epoch FROM clock_timestamp() - created_at) AS since_created, "
        "extract(epoch FROM clock_timestamp() - assigned_at) AS since_assigned "
        "FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
    if row is None:
        raise NotFound(f"no job {job_id}")
    current_state = State(row["state"])
    reason = row["termination_reason"]
    current = Status(
        current_state,
        Stage(row["stage"]) if row["stage"] else None,
        Reason(reason) if reason and current_state in (State.TERMINATING,
                                                       State.TERMINATED) else None)
    if not jobstate.check(current, new):
        return False
    final_reason = current.reason or new.reason
    stamp = jobstate.TIMESTAMP_COLUMN.get(new.state)
    sets = ["state = %(state)s", "stage = %(stage)s", "updated_at = now()",
            "event_seq = event_seq + 1"]
    if stamp:
        sets.append(f"{stamp} = coalesce({stamp}, now())")
    if new.state is State.ASSIGNED:
        sets.append("deadline = now() + make_interval(secs => timeout)")
    if final_reason is not None:
        sets.append("termination_reason = %(reason)s")
    if exit_status is not None:
        sets.append("exit_status = %(exit_status)s")
    if new.state is State.TERMINATED:
        sets.append("endpoints = '[]'")  # Its tunnels close with it.
    if message is not None:
        sets.append("termination_message = %(message)s")
    params = {"id": job_id, "state": new.state.value,
              "stage": new.stage.value if new.stage else None,
              "reason": final_reason.value if final_reason else None,
              "exit_status": exit_status, "message": message}
    updated = await cur.fetchone(
        f"UPDATE jobs SET {', '.join(sets)} WHERE id = %(id)s RETURNING event_seq", params)
    assert updated is not None
    await cur.execute(
        "INSERT INTO job_events (job_id, seq, state, stage, reason, exit_status, message) "
        "VALUES (%(id)s, %(seq)s, %(state)s, %(stage)s, %(reason)s, %(exit_status)s, "
        "%(message)s)", {**params, "seq": updated["event_seq"]})
    # Reported to this instance's metrics once the transaction commits.
    if new.state is State.ASSIGNED and current_state is State.QUEUED:
        cur.note("queue_wait", float(row["since_created"]))
    elif new.state in (State.INITIALIZING, State.READY) and current_state is State.ASSIGNED \
            and row["since_assigned"] is not None:
        cur.note("dispatch", float(row["since_assigned"]))
    elif new.state is State.TERMINATED:
        cur.note("terminated", final_reason.value if final_reason else "none")
    if new.state is State.TERMINATED:
        if final_reason is not None:
            await _after_termination(cur, job_id, final_reason, max_host_failures)
        # After the restart policy copied the parameters to a successor.
        await cur.execute(_WIPE_SECRETS, {"id": job_id})
    return True


async def _link_died_with_instance(cur: Cursor, host_id: int) -> bool:
    """Whether the host's link was held by a switchboard instance that died (then an
    unreachable host is the instance's fault, not the host's)."""
    row = await cur.fetchone(
        "SELECT h.instance_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM instances i "
        f"WHERE i.id = h.instance_id AND {_LIVE_INSTANCE}) AS died FROM hosts h "
        "WHERE h.id = %(id)s", {"id": host_id, "dead": INSTANCE_DEAD_AFTER})
    return bool(row and row["died"])


# Secret parameter values end with their job: the names stay, and the fact that
# they were secret, but the values are replaced by empty strings.
_WIPE_SECRETS = """
    UPDATE jobs SET parameters = (
        SELECT jsonb_object_agg(key, CASE WHEN value->>'secret' = 'true'
                                     THEN jsonb_build_object('value', '', 'secret', true)
                                     ELSE value END)
        FROM jsonb_each(parameters))
    WHERE id = %(id)s AND EXISTS (
        SELECT 1 FROM jsonb_each(parameters) WHERE value->>'secret' = 'true')"""


async def _after_termination(cur: Cursor, job_id: str, reason: Reason,
                             max_host_failures: int) -> None:
    """Host health and the restart policy, in the terminating transaction."""
    job = await cur.fetchone(
        "SELECT host_id, restarts_left FROM jobs WHERE id = %s", (job_id,))
    assert job is not None
    if job["host_id"] is not None:
        if reason in jobstate.HOST_SIDE_REASONS and not (
                reason is Reason.HOST_UNREACHABLE
                and await _link_died_with_instance(cur, job["host_id"])):
            await cur.execute(
                "UPDATE hosts SET consecutive_failures = consecutive_failures + 1, "
                "healthy = healthy AND consecutive_failures + 1 < %s WHERE id = %s",
                (max_host_failures, job["host_id"]))
        elif reason in (Reason.WORKLOAD_EXITED, Reason.USER_TERMINATED,
                        Reason.EXECUTION_TIMEOUT):
            await cur.execute(
                "UPDATE hosts SET consecutive_failures = 0 WHERE id = %s AND "
                "consecutive_failures <> 0", (job["host_id"],))
    if reason in jobstate.RESTARTABLE_REASONS and job["restarts_left"] > 0:
        successor = await cur.fetchone(
            "INSERT INTO jobs (owner_id, label, image_name, image_digest, image_stores, tags, "
            "parameters, timeout, queue_timeout, max_restarts, restarts_left, restart_of, "
            "queue_deadline, event_seq, log_servers, results, image_kind, reservation) "
            "SELECT owner_id, label, image_name, image_digest, image_stores, tags, parameters, "
            "timeout, queue_timeout, max_restarts, restarts_left - 1, id, "
            "now() + make_interval(secs => queue_timeout), 1, log_servers, results, image_kind, "
            "reservation "
            "FROM jobs "
            "WHERE id = %s "
            "RETURNING id", (job_id,))
        assert successor is not None
        await cur.execute(
            "INSERT INTO job_events (job_id, seq, state, message) VALUES (%s, 1, 'queued', %s)",
            (successor["id"], f"restart of {job_id} after {reason.value}"))
        await cur.execute(
            "INSERT INTO grants (job_id, user_id, privilege) SELECT %s, user_id, privilege "
            "FROM grants WHERE job_id = %s", (successor["id"], job_id))

