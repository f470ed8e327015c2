"""What a scheduling pass reads (issue 13): PostgreSQL filters the free hosts and the
queue, so a pass costs what the queue needs, not what the fleet holds.

A real :class:`Store` on a real database, with no switchboard service (so no
other pass runs); the hosts' links and instances are rows written here.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from treadmill.switchboard import database
from treadmill.switchboard.database import Pool
from treadmill.switchboard.scheduling import FreeHost, QueuedJob, assign
from treadmill.switchboard.store import Store

DIGEST = "sha256:" + "e" * 64
FRESH = 15.0


@pytest_twisted.async_yield_fixture
async def store(migrated_database: str) -> AsyncIterator[Store]:
    pool = Pool(reactor, migrated_database, size=2)
    await pool.start()
    try:
        yield Store(pool)
    finally:
        pool.close()


class Reads:
    """Counts the statements a transaction runs and the rows it reads back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.statements = 0
        self.rows = 0
        for name in ("rows", "fetchall"):
            monkeypatch.setattr(database.Cursor, name, self._counting(
                getattr(database.Cursor, name)))

        original = database.Cursor.fetchone

        async def fetchone(cursor: Any, sql: str, params: Any = None) -> Any:
            row = await original(cursor, sql, params)
            self.statements += 1
            self.rows += row is not None
            return row

        monkeypatch.setattr(database.Cursor, "fetchone", fetchone)

    def _counting(self, method: Any) -> Any:
        async def counted(cursor: Any, sql: str, params: Any = None) -> Any:
            rows = await method(cursor, sql, params)
            self.statements += 1
            self.rows += len(rows)
            return rows

        return counted

    def reset(self) -> None:
        self.statements = self.rows = 0


async def live_instance(store: Store, *, dead: bool = False) -> str:
    row = await store.pool.fetchone(
        "INSERT INTO instances (id, name, heartbeat_at) VALUES (gen_random_uuid(), %s, "
        "now() - %s * interval '1 minute') RETURNING id", ("dead" if dead else "live", int(dead)))
    return str(row["id"])


async def user(store: Store, name: str, admin: bool = False) -> int:
    row = await store.pool.fetchone(
        "INSERT INTO users (name, admin) VALUES (%s, %s) RETURNING id", (name, admin))
    return int(row["id"])


async def add_hosts(store: Store, instance: str, names: list[str], tags: list[str], *,
                    owner: int | None = None, kinds: list[str] | None = None,
                    everyone: bool = True, **columns: Any) -> list[int]:
    """Connected hosts (a link that reported its kinds, seen now) unless ``columns``
    say otherwise; ``everyone``: a ``start`` grant to every user."""
    rows = await store.pool.fetchall(
        "INSERT INTO hosts (name, tags, owner_id, kinds, token_hash, session, last_seen_at, "
        "instance_id) SELECT n, %s, %s, %s, decode(md5(n), 'hex'), gen_random_uuid(), now(), "
        "%s FROM unnest(%s::text[]) AS n RETURNING id",
        (tags, owner, kinds, instance, names))
    ids = [row["id"] for row in rows]
    await store.pool.execute("UPDATE hosts SET kinds_session = session WHERE id = ANY(%s)",
                             (ids,))
    if columns:
        sets = ", ".join(f"{name} = %({name})s" for name in columns)
        await store.pool.execute(f"UPDATE hosts SET {sets} WHERE id = ANY(%(ids)s)",
                                 {**columns, "ids": ids})
    if everyone:
        await store.pool.execute(
            "INSERT INTO grants (host_id, privilege) SELECT unnest(%s::bigint[]), 'start'",
            (ids,))
    return ids


async def enqueue(store: Store, owner: int, tags: list[str], count: int = 1,
                  kind: str | None = None) -> list[str]:
    rows = await store.pool.fetchall(
        "INSERT INTO jobs (owner_id, image_digest, tags, image_kind, timeout, queue_timeout, "
        "queue_deadline, event_seq) SELECT %s, %s, %s, %s, 60, 3600, now() + interval '1 hour', "
        "1 FROM generate_series(1, %s) RETURNING id, seq", (owner, DIGEST, tags, kind, count))
    return [str(row["id"]) for row in sorted(rows, key=lambda row: row["seq"])]


async def host_names(store: Store, pairs: list[tuple[str, int]]) -> dict[str, str]:
    rows = await store.pool.fetchall("SELECT id, name FROM hosts WHERE id = ANY(%s)",
                                     ([host for _, host in pairs],))
    names = {row["id"]: row["name"] for row in rows}
    return {job: names[host] for job, host in pairs}


@pytest_twisted.ensureDeferred
async def test_one_job_and_1000_free_hosts_read_a_few_rows(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    instance = await live_instance(store)
    owner = await user(store, "u")
    await add_hosts(store, instance, [f"h{i:04d}" for i in range(1000)], ["t", "x"])
    await add_hosts(store, instance, ["z-plain"], ["t"])  # Fewest tags: it is taken.
    reads = Reads(monkeypatch)
    # Nothing queued: one statement, one row, whatever the fleet.
    result = await store.schedule(FRESH)
    assert (result.locked, result.pairs, result.queued) == (True, [], 0)
    assert (reads.statements, reads.rows) == (1, 1)
    [job] = await enqueue(store, owner, ["t"])
    reads.reset()
    result = await store.schedule(FRESH)
    assert await host_names(store, result.pairs) == {job: "z-plain"}
    assert result.queued == 0
    # The lock and the queue's size, the job, its host, the assignment.
    assert reads.statements <= 4 and reads.rows <= 4, (reads.statements, reads.rows)
    row = await store.pool.fetchone(
        "SELECT j.state, j.event_seq, j.assigned_at >= j.created_at AS ordered, "
        "j.deadline - j.assigned_at AS timeout, e.state AS event, e.message "
        "FROM jobs j JOIN job_events e ON e.job_id = j.id AND e.seq = j.event_seq "
        "WHERE j.id = %s", (job,))
    assert row == {"state": "assigned", "event_seq": 2, "ordered": True,
                   "timeout": row["timeout"], "event": "assigned",
                   "message": "assigned to z-plain"}
    assert row["timeout"].total_seconds() == 60


@pytest_twisted.ensureDeferred
async def test_a_runnable_job_behind_many_unrunnable_ones_is_assigned_in_one_pass(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    instance = await live_instance(store)
    owner, other = await user(store, "u"), await user(store, "v")
    await add_hosts(store, instance, [f"h{i}" for i in range(200)], ["t"], kinds=["qemu"])
    await enqueue(store, owner, ["gpu"], 300)  # No host has the tag.
    await enqueue(store, owner, ["t"], 300, kind="board")  # No host runs the kind.
    await add_hosts(store, instance, ["mine"], ["private"], owner=owner, everyone=False)
    await enqueue(store, other, ["private"], 300)  # The only host is not theirs.
    [job] = await enqueue(store, other, ["t"], kind="qemu")
    reads = Reads(monkeypatch)
    # Even when the pass reads far fewer jobs than the queue holds.
    result = await store.schedule(FRESH, limit=10)
    assert [j for j, _ in result.pairs] == [job]
    assert result.queued == 900 and not result.more
    assert reads.rows <= 4, reads.rows


@pytest_twisted.ensureDeferred
async def test_of_a_kind_no_more_jobs_are_read_than_hosts_can_take(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    instance = await live_instance(store)
    owner = await user(store, "u")
    await add_hosts(store, instance, ["gpu-1", "gpu-2"], ["gpu", "t"])
    await add_hosts(store, instance, [f"h{i}" for i in range(300)], ["t"])
    gpu = await enqueue(store, owner, ["gpu"], 500)
    reads = Reads(monkeypatch)
    result = await store.schedule(FRESH)
    assert sorted(await host_names(store, result.pairs)) == sorted(gpu[:2])
    assert reads.rows <= 1 + 2 + 2 + 2, reads.rows


BAD_HOSTS: dict[str, dict[str, Any]] = {
    "disabled": {"enabled": False},
    "unhealthy": {"healthy": False},
    "unconnected": {"session": None},
    "kinds-not-reported": {"kinds_session": None},
    "not-seen-lately": {"last_seen_at": None},
}


@pytest_twisted.ensureDeferred
async def test_a_host_that_cannot_take_a_job_is_never_chosen(store: Store) -> None:
    instance, dead = await live_instance(store), await live_instance(store, dead=True)
    owner = await user(store, "u")
    # Each bad host would be the matching's first pick (fewest tags, first name).
    for name, columns in BAD_HOSTS.items():
        await add_hosts(store, instance, [f"a-{name}"], ["t"], **columns)
    await add_hosts(store, instance, ["a-stale"], ["t"])
    await store.pool.execute(
        "UPDATE hosts SET last_seen_at = now() - interval '1 minute' WHERE name = 'a-stale'")
    await add_hosts(store, dead, ["a-held-by-a-dead-instance"], ["t"])
    [busy] = await add_hosts(store, instance, ["a-busy"], ["t"])
    await store.pool.execute(
        "INSERT INTO jobs (owner_id, image_digest, tags, timeout, queue_timeout, queue_deadline, "
        "state, host_id) VALUES (%s, %s, '{}', 60, 60, now(), 'ready', %s), "
        "(%s, %s, '{}', 60, 60, now(), 'ready', NULL)",  # Its host deleted: busies none.
        (owner, DIGEST, busy, owner, DIGEST))
    await add_hosts(store, instance, ["a-not-granted"], ["t"], everyone=False)
    await add_hosts(store, instance, ["a-other-kind"], ["t"], kinds=["board"])
    await add_hosts(store, instance, ["z-good"], ["t", "u", "v"], kinds=["qemu"])
    jobs = await enqueue(store, owner, ["t"], 5, kind="qemu")
    result = await store.schedule(FRESH)
    assert await host_names(store, result.pairs) == {jobs[0]: "z-good"}
    assert result.queued == 4
    result = await store.schedule(FRESH)
    assert (result.pairs, result.queued) == ([], 4)


# The free hosts as the scheduler read them before it filtered in SQL: every one.
_EVERY_FREE_HOST = """
    SELECT h.id, h.name, h.owner_id, h.tags, h.kinds,
           ARRAY(SELECT g.user_id FROM grants g
                 WHERE g.host_id = h.id AND g.privilege IN ('start', 'manage')) AS starters
    FROM hosts h JOIN instances i ON i.id = h.instance_id
    WHERE h.enabled AND h.healthy AND h.session IS NOT NULL AND h.kinds_session = h.session
      AND h.last_seen_at > now() - interval '15 seconds'
      AND i.stopped_at IS NULL AND i.heartbeat_at > now() - interval '5 seconds'
      AND NOT EXISTS (SELECT 1 FROM jobs a WHERE a.host_id = h.id
                      AND a.state IN ('assigned', 'initializing', 'ready', 'terminating'))"""


async def expected_pairs(store: Store) -> set[tuple[str, int]]:
    """What :func:`assign` makes of every free host and every queued job."""
    hosts = [FreeHost(h["id"], h["name"], h["owner_id"], frozenset(h["tags"]),
                      frozenset(h["starters"]),
                      None if h["kinds"] is None else frozenset(h["kinds"]))
             for h in await store.pool.fetchall(_EVERY_FREE_HOST)]
    jobs = [QueuedJob(str(j["id"]), j["seq"], j["owner_id"], j["admin"], frozenset(j["tags"]),
                      j["image_kind"])
            for j in await store.pool.fetchall(
                "SELECT j.id, j.seq, j.owner_id, u.admin, j.tags, j.image_kind FROM jobs j "
                "JOIN users u ON u.id = j.owner_id WHERE j.state = 'queued'")]
    shares = {r["owner_id"]: r["n"] for r in await store.pool.fetchall(
        "SELECT owner_id, count(*) AS n FROM jobs WHERE state IN "
        "('assigned', 'initializing', 'ready', 'terminating') "
        "OR assigned_at > now() - interval '1 hour' GROUP BY owner_id")}
    return {(job.id, host.id) for job, host in assign(jobs, hosts, shares)}


@pytest.mark.parametrize("seed", range(4))
@pytest_twisted.ensureDeferred
async def test_the_filtered_pass_assigns_as_matching_every_free_host_would(
        store: Store, seed: int) -> None:
    rng = random.Random(seed)
    instance, dead = await live_instance(store), await live_instance(store, dead=True)
    users = [await user(store, f"u{i}", admin=i == 0) for i in range(4)]
    tags = ["a", "b", "c", "d"]
    for i in range(60):
        await add_hosts(
            store, dead if rng.random() < 0.1 else instance, [f"h{i:02d}"],
            rng.sample(tags, rng.randint(0, 3)),
            owner=rng.choice([None, *users]), everyone=rng.random() < 0.6,
            kinds=rng.choice([None, ["qemu"], ["board"], ["qemu", "board"]]),
            enabled=rng.random() < 0.9)
    for _ in range(3):  # Passes one after another, shares growing.
        for _ in range(rng.randint(5, 40)):
            await enqueue(store, rng.choice(users), rng.sample(tags, rng.randint(0, 2)),
                          kind=rng.choice([None, "qemu", "board"]))
        expected = await expected_pairs(store)
        result = await store.schedule(FRESH)
        assert set(result.pairs) == expected
        assert not result.skipped
        await store.pool.execute(  # Some jobs end, freeing their hosts.
            "UPDATE jobs SET state = 'terminated' WHERE state = 'assigned' AND random() < 0.5")
