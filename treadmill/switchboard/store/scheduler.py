"""The scheduling transaction, and the jobs no host runs or will run."""

from __future__ import annotations

from dataclasses import dataclass, field

from treadmill.switchboard.database import Cursor
from treadmill.switchboard.scheduling import FreeHost, QueuedJob, assign
from treadmill.switchboard.store.base import INSTANCE_DEAD_AFTER, LIVE_INSTANCE, Queries

# Limits of the scheduling transaction (SET LOCAL), in milliseconds: a pass
# never waits long for a lock, and if its instance freezes half-way (SIGSTOP, a
# long pause) PostgreSQL ends its session, releasing the scheduling lock and
# the job rows it locked, after idle_in_transaction_session_timeout.
SCHEDULING_TIMEOUTS = {"statement_timeout": 5000, "lock_timeout": 1000,
                       "idle_in_transaction_session_timeout": 2000}

SCHEDULER_LOCK = 0x74726561646D7363  # "treadmsc"

# The free hosts (a CTE named free): enabled, healthy, connected through a live
# instance on a link that reported its kinds, seen within %(fresh)s s, idle (the
# busy (or held) hosts are read once, a hashed list, not looked up host by host; an active
# job whose host was deleted busies none).
_FREE = (
    "free AS (SELECT h.id, h.name, h.owner_id, h.tags, h.kinds "
    "FROM hosts h JOIN instances i ON i.id = h.instance_id "
    "WHERE h.enabled AND h.healthy AND h.session IS NOT NULL "
    "AND h.kinds_session = h.session "
    "AND h.last_seen_at > now() - make_interval(secs => %(fresh)s) "
    f"AND {LIVE_INSTANCE} "
    "AND h.id NOT IN (SELECT a.host_id FROM jobs a WHERE (a.state IN "  # Hashed: one scan.
    "('assigned', 'initializing', 'ready', 'terminating') OR a.held_until IS NOT NULL) "
    "AND a.host_id IS NOT NULL))")  # held_until: a failed job's held host (0019)

# Whether free host h may run the jobs of {job} (owner_id, admin, tags,
# image_kind), as :func:`treadmill.switchboard.scheduling.may_run` decides.
_MAY_RUN = (
    "h.tags @> {job}.tags AND (h.kinds IS NULL OR {job}.image_kind IS NULL "
    "OR {job}.image_kind = ANY(h.kinds)) AND ({job}.admin OR h.owner_id = {job}.owner_id "
    "OR EXISTS (SELECT 1 FROM grants g WHERE g.host_id = h.id "
    "AND g.privilege IN ('start', 'manage') "
    "AND (g.user_id = {job}.owner_id OR g.user_id IS NULL)))")

# Queued -> assigned for every (job, host) pair at once, as
# :func:`treadmill.switchboard.store.lifecycle.transition` moves one job (the
# row stamped, the event appended), skipping jobs locked elsewhere. Stamped with
# the statement's time, after the enqueue that this statement saw committed.
_ASSIGN = """
    WITH pairs AS (SELECT * FROM unnest(%(jobs)s::uuid[], %(hosts)s::bigint[],
                                        %(messages)s::text[]) AS p(id, host_id, message)),
    mine AS (SELECT j.id FROM jobs j JOIN pairs p ON p.id = j.id
             WHERE j.state = 'queued' FOR UPDATE OF j SKIP LOCKED),
    moved AS (UPDATE jobs j SET host_id = p.host_id, state = 'assigned', stage = NULL,
                     updated_at = statement_timestamp(), event_seq = j.event_seq + 1,
                     assigned_at = coalesce(j.assigned_at, statement_timestamp()),
                     deadline = statement_timestamp() + make_interval(secs => j.timeout),
                     termination_message = p.message
              FROM pairs p WHERE j.id = p.id AND j.id IN (SELECT id FROM mine)
              RETURNING j.id, j.event_seq, p.message,
                        extract(epoch FROM clock_timestamp() - j.created_at) AS since_created),
    events AS (INSERT INTO job_events (job_id, seq, state, message)
               SELECT id, event_seq, 'assigned', message FROM moved)
    SELECT id, since_created FROM moved"""


# The oldest queued jobs some free host may run: of each (owner, tags, image
# kind), no more than the free hosts that may run it (``room``, counted up to the
# kind's queued jobs only, so PostgreSQL stops at the first such hosts): jobs no
# free host can take, and more jobs of a kind than its hosts, are never read.
_JOBS = (
    f"WITH {_FREE}, "
    "kinds AS (SELECT k.owner_id, u.admin, k.tags, k.image_kind, k.queued FROM (SELECT "
    "  owner_id, tags, image_kind, count(*) AS queued FROM jobs WHERE state = 'queued' "
    "  GROUP BY owner_id, tags, image_kind) k JOIN users u ON u.id = k.owner_id), "
    "runnable AS (SELECT k.*, r.room FROM kinds k CROSS JOIN LATERAL "
    "  (SELECT count(*) AS room FROM (SELECT FROM free h "
    f"  WHERE {_MAY_RUN.format(job='k')} LIMIT k.queued) f) r WHERE r.room > 0), "
    "ranked AS (SELECT j.id, j.seq, j.owner_id, r.admin, j.tags, j.image_kind, r.room, "
    "  row_number() OVER (PARTITION BY j.owner_id, j.tags, j.image_kind "
    "  ORDER BY j.seq) AS n FROM jobs j "
    "  JOIN runnable r ON r.owner_id = j.owner_id AND r.tags = j.tags "
    "  AND r.image_kind IS NOT DISTINCT FROM j.image_kind "
    "  WHERE j.state = 'queued') "
    "SELECT id, seq, owner_id, admin, tags, image_kind FROM ranked WHERE n <= room "
    "ORDER BY seq LIMIT %(limit)s")

# The free hosts the matching can pick for the jobs read: it gives each job the
# first free host it may run on (fewest tags, then name: ``assign``), so with N
# jobs none looks past the first N hosts of its (owner, tags, image kind).
_HOSTS = (
    f"WITH {_FREE}, "
    "k AS (SELECT DISTINCT j.owner_id, u.admin, j.tags, j.image_kind FROM jobs j "
    "  JOIN users u ON u.id = j.owner_id WHERE j.id = ANY(%(jobs)s::uuid[])) "
    "SELECT DISTINCT h.id, h.name, h.owner_id, h.tags, h.kinds, "
    "ARRAY(SELECT g.user_id FROM grants g "
    "  WHERE g.host_id = h.id AND g.privilege IN ('start', 'manage')) AS starters "
    "FROM k CROSS JOIN LATERAL (SELECT h.* FROM free h "
    f"  WHERE {_MAY_RUN.format(job='k')} "
    "  ORDER BY cardinality(h.tags), h.name COLLATE \"C\" LIMIT %(n)s) h")


@dataclass(frozen=True)
class ScheduleResult:
    """One scheduling pass: whether it held the lock, the (job, host id) pairs it
    assigned, whether more may fit at once (it read ``limit`` jobs), how many
    jobs it skipped because another transaction had them locked, and how many
    jobs it left queued (runnable or not)."""

    locked: bool = True
    pairs: list[tuple[str, int]] = field(default_factory=list)
    more: bool = False
    skipped: int = 0
    queued: int = 0


class SchedulerQueries(Queries):
    """What the scheduler reads and writes."""

    async def schedule(self, fresh_within: float, fairness_window: float = 3600.0, *,
                       dead_after: float = INSTANCE_DEAD_AFTER, limit: int = 2000,
                       timeouts: dict[str, int] | None = None) -> ScheduleResult:
        """Assign queued jobs to free hosts in one transaction.

        Free hosts are enabled, healthy, idle and connected through a live
        instance (:data:`LIVE_INSTANCE`, ``dead_after``) on a link that has
        reported its kinds (answered a status request: ``kinds_session``). The
        pass costs what the queue needs, not what the fleet holds: PostgreSQL
        filters, and the pass reads only jobs some free host may run (``limit``
        at most, and of each owner, tag set and image kind no more than the free
        hosts that may run them, so a runnable job is never stuck behind jobs no
        host can take), then of the free hosts only those the matching can
        pick, as tuples. With nothing queued it reads nothing. A user's share
        is the number of jobs holding hosts plus those assigned within
        ``fairness_window`` seconds: the user with the smallest share goes first.

        Only one instance schedules at a time (a transaction advisory lock,
        tried, never waited for: ``locked`` is False when another holds it).
        The transaction runs under :data:`SCHEDULING_TIMEOUTS`, and locks only
        the jobs it assigns (``SKIP LOCKED``: a job locked elsewhere, being
        cancelled say, waits for a later pass: ``skipped``).
        """
        limits = {**SCHEDULING_TIMEOUTS, **(timeouts or {})}

        async def run(cur: Cursor) -> ScheduleResult:
            sets = ", ".join(f"set_config('{name}', %({name})s, true)" for name in limits)
            [head] = await cur.rows(
                f"SELECT {sets}, pg_try_advisory_xact_lock(%(lock)s), "
                "(SELECT count(*) FROM jobs WHERE state = 'queued')",
                {**{name: str(value) for name, value in limits.items()},
                 "lock": SCHEDULER_LOCK})
            locked, queued = head[-2:]
            if not locked:
                return ScheduleResult(locked=False)
            if not queued:
                return ScheduleResult()
            params = {"fresh": fresh_within, "dead": dead_after}
            jobs = [QueuedJob(str(id_), seq, owner, admin, frozenset(tags), kind)
                    for id_, seq, owner, admin, tags, kind
                    in await cur.rows(_JOBS, {**params, "limit": limit})]
            if not jobs:
                return ScheduleResult(queued=queued)
            hosts = [FreeHost(id_, name, owner, frozenset(tags), frozenset(starters),
                              frozenset(kinds) if kinds is not None else None)
                     for id_, name, owner, tags, kinds, starters in await cur.rows(
                         _HOSTS, {**params, "jobs": [job.id for job in jobs],
                                  "n": len(jobs)})]
            owners = list({job.owner_id for job in jobs})
            # A user's share matters only when several users compete.
            shares = dict(await cur.rows(
                "SELECT owner_id, count(*) FROM jobs WHERE (state IN "
                "('assigned', 'initializing', 'ready', 'terminating') "
                "OR assigned_at > now() - make_interval(secs => %s)) "
                "AND owner_id = ANY(%s) GROUP BY owner_id",
                (fairness_window, owners))) if len(owners) > 1 else {}
            pairs = assign(jobs, hosts, shares)
            if not pairs:
                return ScheduleResult(queued=queued)
            rows = await cur.rows(
                _ASSIGN, {"jobs": [job.id for job, _ in pairs],
                          "hosts": [host.id for _, host in pairs],
                          "messages": [f"assigned to {host.name}" for _, host in pairs]})
            for _, since_created in rows:  # For this instance's metrics, once committed.
                cur.note("queue_wait", float(since_created))
            mine = {str(id_) for id_, _ in rows}
            done = [(job.id, host.id) for job, host in pairs if job.id in mine]
            return ScheduleResult(pairs=done, more=len(jobs) >= limit,
                                  skipped=len(pairs) - len(done), queued=queued - len(done))

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
