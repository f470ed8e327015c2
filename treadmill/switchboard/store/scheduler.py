"""The scheduling transaction, and the jobs no host runs or will run."""

from __future__ import annotations

from dataclasses import dataclass, field

from treadmill.switchboard.database import Cursor
from treadmill.switchboard.jobstate import State, Status
from treadmill.switchboard.scheduling import FreeHost, QueuedJob, assign
from treadmill.switchboard.store.base import INSTANCE_DEAD_AFTER, LIVE_INSTANCE, Queries
from treadmill.switchboard.store.lifecycle import transition

# Limits of the scheduling transaction (SET LOCAL), in milliseconds: a pass
# never waits long for a lock, and if its instance freezes half-way (SIGSTOP, a
# long pause) PostgreSQL ends its session, releasing the scheduling lock and
# the job rows it locked, after idle_in_transaction_session_timeout.
SCHEDULING_TIMEOUTS = {"statement_timeout": 5000, "lock_timeout": 1000,
                       "idle_in_transaction_session_timeout": 2000}

SCHEDULER_LOCK = 0x74726561646D7363  # "treadmsc"


@dataclass(frozen=True)
class ScheduleResult:
    """One scheduling pass: whether it held the lock, the (job, host id) pairs it
    assigned, whether more may fit at once (it read ``limit`` jobs), and how many
    jobs it skipped because another transaction had them locked."""

    locked: bool = True
    pairs: list[tuple[str, int]] = field(default_factory=list)
    more: bool = False
    skipped: int = 0


class SchedulerQueries(Queries):
    """What the scheduler reads and writes."""

    async def schedule(self, fresh_within: float, fairness_window: float = 3600.0, *,
                       dead_after: float = INSTANCE_DEAD_AFTER, limit: int = 2000,
                       timeouts: dict[str, int] | None = None) -> ScheduleResult:
        """Assign queued jobs to free hosts in one transaction.

        Free hosts are enabled, healthy, idle and connected through a live
        instance (:data:`LIVE_INSTANCE`, ``dead_after``) on a link that has
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
                f"AND {LIVE_INSTANCE} "
                "AND NOT EXISTS (SELECT 1 FROM jobs a WHERE a.host_id = h.id AND (a.state IN "
                "('assigned', 'initializing', 'ready', 'terminating') "
                "OR a.held_until IS NOT NULL))", params)  # held: 0019_hold_on_failure
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
