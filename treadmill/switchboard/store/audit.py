"""The audit log: appending in the audited change's transaction, reading, expiry."""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Self

from psycopg2.extras import Json

from treadmill.common.http import dumps
from treadmill.switchboard.access import Principal
from treadmill.switchboard.database import Cursor
from treadmill.switchboard.store.base import Queries


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


class AuditQueries(Queries):
    """The audit log (:mod:`treadmill.switchboard.audit`)."""

    async def audited(self, call: Callable[[Self], Awaitable[Any]],
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
        record = {key: getattr(entry, key) for key in (
            "actor", "actor_kind", "source", "action", "subject_kind", "subject_id",
            "subject_user", "details")}
        if cur is not None:
            await append_record(cur, **record)
        else:
            await self.pool.transaction(lambda cur: append_record(cur, **record))

    async def audit_list(self, principal: Principal, *, user: str | None = None,
                         host: str | None = None, job: str | None = None,
                         image: str | None = None, action: str | None = None,
                         after: datetime | None = None, before_id: int | None = None,
                         limit: int = 100) -> list[dict]:
        """Records ``principal`` may read, newest first: an admin all; a user those they
        acted in or that name them (``subject_user``), and those about the jobs, hosts
        and images they may read now (for a host or image, only since it was created:
        an earlier one of that name was another)."""
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
                "WHERE h.name = a.subject_id AND a.at >= h.created_at "
                "AND (h.owner_id = %(uid)s OR EXISTS "
                "(SELECT 1 FROM grants g WHERE g.host_id = h.id "
                "AND (g.user_id = %(uid)s OR g.user_id IS NULL))))) "
                "OR (a.subject_kind = 'image' AND EXISTS (SELECT 1 FROM images i "
                "WHERE lower(i.name) = lower(a.subject_id) AND a.at >= i.created_at "
                "AND (i.owner_id = %(uid)s OR EXISTS "
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

    async def audit_console(self, host_id: int, job_id: str, entry: Any,
                            ended_within: float) -> str | None:
        """Append ``entry`` (an :class:`audit.Entry` about job ``job_id`` whose actor is a
        user; ``subject_user`` filled in here: the job's owner) if the job is this host's
        now (active, held, or ended at most ``ended_within`` seconds ago: a console closes
        after its job's end) and the actor is a user. None when appended, else why not:
        ``not_your_job`` (another host's job, an unknown one, an older one) or
        ``unknown_user``."""
        async def append(cur: Cursor) -> str | None:
            row = await cur.fetchone(
                "SELECT u.name AS owner, EXISTS (SELECT 1 FROM users a "
                "WHERE lower(a.name) = lower(%(actor)s)) AS known FROM jobs j "
                "LEFT JOIN users u ON u.id = j.owner_id "
                "WHERE j.id = %(job)s AND j.host_id = %(host)s AND (j.state <> 'terminated' "
                "OR j.held_until IS NOT NULL OR j.terminated_at > now() - make_interval("
                "secs => %(within)s))", {"job": job_id, "host": host_id,
                                         "within": ended_within, "actor": entry.actor})
            if row is None:
                return "not_your_job"
            if not row["known"]:
                return "unknown_user"
            await append_record(cur, actor=entry.actor, actor_kind=entry.actor_kind,
                                action=entry.action, subject_kind=entry.subject_kind,
                                subject_id=entry.subject_id, details=entry.details,
                                source=entry.source, subject_user=row["owner"])
            return None
        return await self.pool.transaction(append)

    async def audit_expire(self, days: float) -> int:
        """Delete records older than ``days``: the only DELETE the table allows."""
        async def expire(cur: Cursor) -> int:
            await cur.execute("SET LOCAL treadmill.audit_retention = 'on'")
            await cur.execute("DELETE FROM audit_log WHERE at < now() - make_interval("
                              "secs => %s)", (days * 86400.0,))
            return cur.rowcount
        return await self.pool.transaction(expire)


async def append_record(cur: Cursor, *, actor: str, actor_kind: str, action: str,
                        subject_kind: str, subject_id: str, details: dict[str, Any],
                        source: str = "", subject_user: str | None = None) -> None:
    """Append one audit record in ``cur``'s transaction (the switchboard's own records,
    ``actor_kind`` ``system``, come from here; the API's go through ``Store.audited``)."""
    await cur.execute(
        "INSERT INTO audit_log (actor, actor_kind, source, action, subject_kind, "
        "subject_id, subject_user, details) VALUES (%(actor)s, %(actor_kind)s, "
        "%(source)s, %(action)s, %(subject_kind)s, %(subject_id)s, %(subject_user)s, "
        "%(details)s)",
        {"actor": actor, "actor_kind": actor_kind, "source": source, "action": action,
         "subject_kind": subject_kind, "subject_id": subject_id, "subject_user": subject_user,
         "details": Json(details, dumps=lambda v: dumps(v).decode("utf-8"))})
