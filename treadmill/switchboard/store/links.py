"""Supervisor links: which instance and session hold each host, and what hosts report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg2
from psycopg2.extras import Json

from treadmill.switchboard.database import Cursor
from treadmill.switchboard.jobstate import Status
from treadmill.switchboard.store.base import Queries
from treadmill.switchboard.store.errors import NotYourJob
from treadmill.switchboard.store.holds import HELD_JOB
from treadmill.switchboard.store.keys import JOB_SSH_KEYS
from treadmill.switchboard.store.lifecycle import transition

ACTIVE_JOB = ("SELECT id, state, stage, termination_reason, timeout FROM jobs "
              "WHERE host_id = %(id)s "
              "AND state IN ('assigned', 'initializing', 'ready', 'terminating')")
"""The job holding host ``%(id)s``, if any (at most one: an index ensures it)."""


class LinkQueries(Queries):
    """The hosts' links and their reports (events, endpoints)."""

    async def host_by_token(self, digest: bytes) -> dict | None:
        return await self.pool.fetchone(
            "SELECT id, name FROM hosts WHERE token_hash = %s", (psycopg2.Binary(digest),))

    async def register_links(self, links: Sequence[tuple[bytes, str]], instance: str,
                             instance_id: str | None = None) -> dict[bytes, dict]:
        """Record many links at once, each ``(token digest, session)`` (one per digest):
        the host whose token it is is now held by ``instance`` as ``session``,
        superseding any link. One statement for all, ahead of the others waiting for a
        connection (handshakes wait for it); ``{digest: {"id", "name"}}`` for the
        digests that name a host (an unknown token is absent)."""
        if not links:
            return {}
        ordered = sorted(links)  # rows locked in one order by every instance
        rows = await self.pool.fetchall(
            "UPDATE hosts AS h SET instance = %s, instance_id = %s, session = v.session, "
            "connected_at = now(), last_seen_at = now() "
            "FROM unnest(%s::bytea[], %s::uuid[]) AS v(token_hash, session) "
            "WHERE h.token_hash = v.token_hash RETURNING h.id, h.name, v.token_hash",
            (instance, instance_id, [psycopg2.Binary(d) for d, _ in ordered],
             [session for _, session in ordered]), urgent=True)
        return {bytes(row["token_hash"]): {"id": row["id"], "name": row["name"]}
                for row in rows}

    async def link_state(self, host_id: int, kinds: Sequence[str] | None,
                         session: str) -> dict:
        """A reconciliation's one statement (:meth:`link_states` for one link)."""
        return (await self.link_states([(host_id, kinds, session)]))[0]

    async def link_states(self, links: Sequence[tuple[int, Sequence[str] | None, str]]
                          ) -> list[dict]:
        """The reconciliations of many links in one statement, each ``(host id, kinds,
        session)``: record the image kinds the host's supervisor reports on link
        ``session`` (None: any kind), from which on the scheduler may offer the host
        jobs (``kinds_session``; a change wakes the scheduler through the hosts
        trigger), and read what the host should be doing. For each link, in order:
        ``active`` (:meth:`active_job`), ``held`` (:meth:`HoldQueries.held_job`), both
        None or a dict, and ``snapshots`` (how many are pending). A host named twice
        records the kinds of its last entry."""
        if not links:
            return []
        active = ACTIVE_JOB.replace("%(id)s", "v.id")
        held = HELD_JOB.replace("%(id)s", "v.id")
        rows = await self.pool.fetchall(
            "WITH v AS (SELECT * FROM unnest(%(ids)s::bigint[], %(sessions)s::uuid[], "
            "%(kinds)s::jsonb[]) WITH ORDINALITY AS v(id, session, kinds, n)), "
            "k AS (SELECT DISTINCT ON (id) id, session, CASE WHEN kinds IS NULL THEN NULL "
            "ELSE ARRAY(SELECT jsonb_array_elements_text(kinds)) END AS kinds "
            "FROM v ORDER BY id, n DESC), "
            "updated AS (UPDATE hosts AS h SET kinds = k.kinds, kinds_session = h.session "
            "FROM k WHERE h.id = k.id AND h.session = k.session AND (h.kinds IS DISTINCT "
            "FROM k.kinds OR h.kinds_session IS DISTINCT FROM h.session) RETURNING h.id) "
            f"SELECT (SELECT row_to_json(a) FROM ({active}) a) AS active, "
            f"(SELECT row_to_json(h) FROM ({held}) h) AS held, "
            "(SELECT count(*) FROM snapshots WHERE host_id = v.id AND state = 'pending') "
            "AS snapshots FROM v ORDER BY v.n",
            {"ids": [host_id for host_id, _, _ in links],
             "sessions": [session for _, _, session in links],
             "kinds": [Json(sorted(kinds)) if kinds is not None else None
                       for _, kinds, _ in links]})
        assert len(rows) == len(links)
        return rows

    async def links_ended(self, sessions: list[str]) -> None:
        """Forget many links at once (an instance shutting down)."""
        if sessions:
            await self.pool.execute(
                "UPDATE hosts SET instance = NULL, instance_id = NULL, session = NULL, "
                "last_seen_at = now() WHERE session = ANY(%s::uuid[])", (sessions,))

    async def link_disconnected(self, host_id: int, session: str) -> None:
        """Forget the link unless a newer session superseded it."""
        await self.links_disconnected([(host_id, session)])

    async def links_disconnected(self, links: Sequence[tuple[int, str]]) -> None:
        """Forget many links at once, each ``(host id, session)``, unless a newer session
        superseded it (one statement; rows found by their key)."""
        if links:
            ordered = sorted(links)
            await self.pool.execute(
                "UPDATE hosts AS h SET instance = NULL, instance_id = NULL, session = NULL, "
                "last_seen_at = now() FROM unnest(%s::bigint[], %s::uuid[]) AS v(id, session) "
                "WHERE h.id = v.id AND h.session = v.session",
                ([host_id for host_id, _ in ordered], [session for _, session in ordered]))

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
        return await self.pool.fetchone(ACTIVE_JOB, {"id": host_id})

    async def job_start(self, job_id: str) -> dict | None:
        """The row a supervisor's ``JobStart`` is built from (secrets included; see
        :mod:`treadmill.switchboard.jobstart`), with ``held_for``: the seconds the hold of
        its host has left (None: not held), its ``state`` and its ``ssh_keys``
        (:data:`~treadmill.switchboard.store.keys.JOB_SSH_KEYS`). Its ``image_stores`` are the job's
        registered ones only: a store removed since the job was enqueued (or never
        registered) does not reach a host."""
        return await self.pool.fetchone(
            "SELECT j.id, j.image_name, j.image_digest, j.parameters, j.timeout, j.tags, "
            "j.label, j.host_id, j.log_servers, j.results, j.reservation, j.hold_on_failure, "
            "extract(epoch FROM j.held_until - now())::float8 AS held_for, "
            "ARRAY(SELECT u.url FROM unnest(j.image_stores) WITH ORDINALITY AS u(url, n) "
            "WHERE rtrim(u.url, '/') IN (SELECT s.url FROM image_stores s) ORDER BY u.n) "
            f"AS image_stores, j.state, {JOB_SSH_KEYS.format(job='j.id')} AS ssh_keys "
            "FROM jobs j WHERE j.id = %s", (job_id,))

    async def apply_host_event(self, host_id: int, job_id: str, new: Status, *,
                               exit_status: int | None = None,
                               message: str | None = None, held: bool = False) -> bool:
        """Apply a supervisor's job event; only for jobs on its own host (else
        ``NotYourJob``). A final event that says ``held`` starts the job's hold."""
        return await self.pool.transaction(
            lambda cur: transition(cur, job_id, new, exit_status=exit_status, message=message,
                                   max_host_failures=self.max_host_failures, host_id=host_id,
                                   hold=held))

    async def set_endpoints(self, host_id: int, job_id: str,
                            endpoints: list[dict[str, Any]]) -> bool:
        """Record a running (or held: ``hold_on_failure``) job's public endpoints, as its
        own host reports them."""
        async def update(cur: Cursor) -> bool:
            row = await cur.fetchone("SELECT host_id, state, held_until FROM jobs "
                                     "WHERE id = %s FOR UPDATE", (job_id,))
            if row is None or row["host_id"] != host_id:
                raise NotYourJob(f"job {job_id} is not on this host")
            if row["state"] == "terminated" and row["held_until"] is None:
                return False
            await cur.execute("UPDATE jobs SET endpoints = %s, updated_at = now() "
                              "WHERE id = %s", (Json(endpoints), job_id))
            return True

        return await self.pool.transaction(update)
