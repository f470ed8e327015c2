"""Jobs: enqueueing (once per Idempotency-Key), reading, listing, events, termination
and deadlines."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.errors
from psycopg2.extras import Json

from treadmill.common.http import dumps
from treadmill.switchboard.access import Principal
from treadmill.switchboard.database import Cursor
from treadmill.switchboard.jobstate import Reason, State, Status
from treadmill.switchboard.store.base import MY_GRANTS, Queries, locked_job, notify_extended
from treadmill.switchboard.store.errors import Conflict, IdempotencyKeyReused, NotFound
from treadmill.switchboard.store.lifecycle import transition

IDEMPOTENCY_RETENTION = 24 * 3600.0
"""Seconds an Idempotency-Key of ``POST /api/v1/jobs`` is remembered."""


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
    hold_on_failure: float | None = None  # seconds its failed host is kept (docs/jobs.md)


_JOB_COLUMNS = """
    j.id, j.seq, j.owner_id, o.name AS owner, j.label, j.image_name, j.image_digest,
    j.image_stores, j.tags, j.parameters, j.timeout, j.queue_timeout, j.max_restarts,
    j.restarts_left, j.restart_of, j.state, j.stage, h.name AS host, j.termination_reason,
    j.exit_status, j.termination_message, j.created_at, j.assigned_at, j.started_at,
    j.ready_at, j.terminating_at, j.terminated_at, j.updated_at, j.queue_deadline,
    j.deadline, j.log_servers, j.endpoints, j.host_id, j.results, j.image_kind"""
_JOB_COLUMNS += ", j.ssh_host_keys"  # 0013_ssh_keys
_JOB_COLUMNS += ", j.queue_message, j.health_expect_exit"  # 0018_host_health
_JOB_COLUMNS += ", j.reservation"  # 0017_reservations
_JOB_COLUMNS += ", j.hold_on_failure, j.held_until"  # 0019_hold_on_failure


_EVENT_COLUMNS = ("e.seq, e.job_id AS job, e.at, e.state, e.stage, e.reason, e.exit_status, "
                  "e.message")


class JobQueries(Queries):
    """Jobs as users see and change them."""

    def _job_query(self, where: str) -> str:
        return (f"SELECT {_JOB_COLUMNS}, {MY_GRANTS.format(column='job_id', alias='j')} "
                "FROM jobs j JOIN users o ON o.id = j.owner_id "
                f"LEFT JOIN hosts h ON h.id = j.host_id WHERE {where}")

    async def _insert_job(self, cur: Cursor, owner_id: int, spec: JobSpec) -> dict:
        """Insert a queued job; return it as :meth:`get_job` would, from this transaction."""
        row = await cur.fetchone(  # the job and its first event in one statement
            "WITH job AS (INSERT INTO jobs (owner_id, label, image_name, image_digest, "
            "image_stores, tags, parameters, timeout, queue_timeout, max_restarts, "
            "restarts_left, queue_deadline, event_seq, log_servers, results, image_kind, "
            "reservation, hold_on_failure) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
            "%s, now() + make_interval(secs => %s), 1, %s, %s, %s, %s, %s) RETURNING id) "
            "INSERT INTO job_events (job_id, seq, state) SELECT id, 1, 'queued' FROM job "
            "RETURNING job_id AS id",
            (owner_id, spec.label, spec.image_name, spec.image_digest, spec.image_stores,
             spec.tags, Json(spec.parameters), spec.timeout, spec.queue_timeout,
             spec.max_restarts, spec.max_restarts, spec.queue_timeout,
             list(spec.log_servers), Json(spec.results) if spec.results else None,
             spec.image_kind, spec.reservation, spec.hold_on_failure))
        assert row is not None
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
            clauses.append("lower(o.name) = lower(%(owner)s)")
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
            row = await locked_job(cur, job_id, "state, reservation")
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
            row = await locked_job(cur, job_id, "state, extract(epoch FROM coalesce(deadline, "
                                   "now() + make_interval(secs => timeout)) - now())::float8 "
                                   "AS left")
            if row["state"] in (State.TERMINATING.value, State.TERMINATED.value):
                raise Conflict(f"job {job_id} is {row['state']}")
            if max(row["left"], 0.0) + by > max_timeout:
                raise ValueError(f"by: the deadline may lie at most {max_timeout:g} "
                                 f"seconds ahead ({max(row['left'], 0.0):.0f} s left)")
            updated = await cur.fetchone(
                "UPDATE jobs SET timeout = timeout + %(by)s, deadline = CASE WHEN deadline "
                "IS NOT NULL THEN greatest(deadline, now()) + make_interval(secs => %(by)s) END, "
                "updated_at = now() WHERE id = %(id)s RETURNING deadline, host_id",
                {"id": job_id, "by": by})
            assert updated is not None
            await notify_extended(cur, job_id, updated["host_id"])  # fresh tokens for it
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

    async def job_counts(self) -> dict[str, int]:
        rows = await self.pool.fetchall("SELECT state, count(*) AS n FROM jobs GROUP BY state")
        return {row["state"]: row["n"] for row in rows}

    async def job_image_names(self, host_id: int) -> list[str]:
        """Catalogue names of the images of the jobs holding a host."""
        rows = await self.pool.fetchall(
            "SELECT image_name FROM jobs WHERE host_id = %s AND image_name IS NOT NULL "
            "AND state IN ('assigned', 'initializing', 'ready', 'terminating')", (host_id,))
        return [row["image_name"] for row in rows]
