"""Snapshots: disks of ended jobs uploaded as new catalogue images."""

from __future__ import annotations

import psycopg2
import psycopg2.errors

from treadmill.switchboard.database import Cursor
from treadmill.switchboard.store.base import Queries
from treadmill.switchboard.store.errors import Conflict, NotFound, NotYourJob
from treadmill.switchboard.store.images import record_version


class SnapshotQueries(Queries):
    """Snapshots, from request to the image they register."""

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
                    await record_version(cur, created["id"], row["owner_id"],
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
