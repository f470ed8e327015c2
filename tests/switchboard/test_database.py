"""The PostgreSQL plumbing: migrations, the LISTEN connection and its reconnection,
and the job notification trigger, against a real database."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred

from tests.util.waiting import eventually as wait_for
from tests.util.waiting import sleep
from treadmill.switchboard.database import Listener, Pool, migrate, migrations
from treadmill.switchboard.notifications import JobNote


@pytest_twisted.async_yield_fixture
async def pool(database):
    pool = Pool(reactor, database, size=2)
    await pool.start()
    try:
        yield pool
    finally:
        pool.close()


class Recorder:
    """Collects notification payloads and lets a test wait for the next ones."""

    def __init__(self) -> None:
        self.payloads: list[str] = []

    def __call__(self, payload: str) -> None:
        self.payloads.append(payload)

    async def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        return await wait_for(lambda: predicate(self.payloads), timeout)


@pytest_twisted.async_yield_fixture
async def listener(database, pool):
    """A started Listener on ``treadmill_jobs``, with a recorder of payloads."""
    await migrate(pool)
    listener = Listener(reactor, database)
    recorder = Recorder()
    listener.observe("treadmill_jobs", recorder)
    listener.startService()
    await listener.ready()
    try:
        yield listener, recorder
    finally:
        await listener.stopService()


# -- migrations ----------------------------------------------------------------


def test_migrations_are_numbered_from_one():
    found = migrations()
    assert found, "no migrations packaged"
    versions = [version for version, _, _ in found]
    # Parallel branches get their own numbers, so a gap may remain; never a duplicate.
    assert versions[0] == 1 and versions == sorted(set(versions))


@pytest_twisted.ensureDeferred
async def test_migrate_applies_all_then_is_a_noop(pool):
    names = [name for _, name, _ in migrations()]
    applied = await migrate(pool)
    assert applied == names
    rows = await pool.fetchall("SELECT version, name FROM schema_migrations ORDER BY version")
    assert [(r["version"], r["name"]) for r in rows] == [(v, n) for v, n, _ in migrations()]
    tables = await pool.fetchall(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
    assert {"users", "api_tokens", "hosts", "images", "jobs", "job_events",
            "grants"} <= {t["table_name"] for t in tables}

    assert await migrate(pool) == []
    again = await pool.fetchall("SELECT version FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in again] == [r["version"] for r in rows]


@pytest_twisted.ensureDeferred
async def test_concurrent_migrations_on_two_pools_apply_each_once(database):
    first, second = Pool(reactor, database, size=1), Pool(reactor, database, size=1)
    await first.start()
    await second.start()
    try:
        results = await DeferredList(
            [ensureDeferred(migrate(first)), ensureDeferred(migrate(second))],
            fireOnOneErrback=True, consumeErrors=True)
        applied = [names for _, names in results]
        names = [name for _, name, _ in migrations()]
        # One of them applied everything; the other found nothing left to do.
        assert sorted(applied, key=len) == [[], names]
        rows = await first.fetchall(
            "SELECT version, count(*) AS n FROM schema_migrations GROUP BY version "
            "ORDER BY version")
        assert [(r["version"], r["n"]) for r in rows] == [(v, 1) for v, _, _ in migrations()]
    finally:
        first.close()
        second.close()


@pytest_twisted.ensureDeferred
async def test_pool_transaction_rolls_back_on_error(pool):
    await migrate(pool)

    async def failing(cur):
        await cur.execute("INSERT INTO users (name) VALUES ('rollback')")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await pool.transaction(failing)
    assert await pool.fetchone("SELECT id FROM users WHERE name = 'rollback'") is None


# The BEGIN of a transaction travels with its first statement (one round trip less).

TXID = "SELECT txid_current() AS t"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("first", ["fetchone", "rows"])
async def test_a_transaction_s_first_statement_is_inside_it(pool, first):
    async def txids(cur):
        if first == "rows":
            (opening,) = (await cur.rows(TXID))[0]
        else:
            opening = (await cur.fetchone(TXID))["t"]
        return opening, (await cur.fetchone(TXID))["t"], (await cur.rows(TXID))[0][0]

    for _ in range(3):  # on every pooled connection, again and again
        opening, second, third = await pool.transaction(txids)
        assert opening == second == third


@pytest_twisted.ensureDeferred
async def test_a_failing_first_statement_rolls_back_and_leaves_the_connection_clean(pool):
    await migrate(pool)

    async def failing(cur):
        await cur.execute("INSERT INTO users (name) VALUES ('first'); SELECT 1 / 0")

    for _ in range(2 * pool.size):
        with pytest.raises(Exception, match="division by zero"):
            await pool.transaction(failing)
    assert await pool.fetchone("SELECT id FROM users WHERE name = 'first'") is None
    # No connection was left inside a transaction: an autocommitted write is seen at once
    # from every other connection, and transactions still work.
    for n in range(2 * pool.size):
        await pool.execute("INSERT INTO users (name) VALUES (%s)", (f"after-{n}",))
        assert await pool.fetchone("SELECT count(*) AS n FROM users WHERE name LIKE 'after-%%'"
                                   ) == {"n": n + 1}
    opening, second, _ = await pool.transaction(_txids)
    assert opening == second


async def _txids(cur):
    return ((await cur.fetchone(TXID))["t"], (await cur.fetchone(TXID))["t"], None)


@pytest_twisted.ensureDeferred
async def test_a_transaction_that_sends_nothing_sends_no_commit(pool):
    async def nothing(cur):
        return "done"

    async def raising(cur):
        raise LookupError("before any statement")

    for _ in range(2 * pool.size):
        assert await pool.transaction(nothing) == "done"
        with pytest.raises(LookupError):
            await pool.transaction(raising)
    # Had a COMMIT or BEGIN gone astray, a connection would now be idle in a transaction.
    rows = await pool.fetchall(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
        "AND state LIKE 'idle in transaction%%'")
    assert rows == [{"n": 0}]
    opening, second, _ = await pool.transaction(_txids)
    assert opening == second


# -- LISTEN / NOTIFY -------------------------------------------------------------


async def delivered(pool: Pool, recorder: Recorder, payload: str, timeout: float = 2) -> None:
    """``NOTIFY treadmill_jobs, 'payload'``; wait until the listener delivers it."""
    await pool.execute(f"NOTIFY treadmill_jobs, '{payload}'")
    assert await recorder.wait_for(lambda p: payload in p, timeout=timeout)


@pytest_twisted.ensureDeferred
async def test_listener_receives_notify(pool, listener):
    _, recorder = listener
    await delivered(pool, recorder, "x y")
    # Only the channels observed are delivered.
    await pool.execute("NOTIFY treadmill_other, 'nope'")
    await delivered(pool, recorder, "second")
    assert recorder.payloads == ["x y", "second"]


@pytest_twisted.ensureDeferred
async def test_listener_reconnects_after_backend_is_killed(pool, listener):
    service, recorder = listener
    reconnected: list[bool] = []
    service.on_reconnect(lambda: reconnected.append(True))
    await delivered(pool, recorder, "before")

    killed = await pool.fetchall(
        "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND query LIKE 'LISTEN%'")
    assert [row["ok"] for row in killed] == [True], "the LISTEN connection was not found"

    # It notices, reconnects (the first attempt is immediate), LISTENs again
    # and runs the on_reconnect callbacks.
    assert await wait_for(lambda: reconnected, timeout=8), "on_reconnect never ran"
    listening = await pool.fetchall(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND query LIKE 'LISTEN%'")
    assert len(listening) == 1

    await delivered(pool, recorder, "after", timeout=3)
    assert recorder.payloads == ["before", "after"]


@pytest_twisted.ensureDeferred
async def test_observer_failure_does_not_stop_delivery(pool, listener):
    service, recorder = listener

    def broken(payload: str) -> None:
        raise ValueError(payload)

    service.observe("treadmill_jobs", broken)
    await pool.execute("NOTIFY treadmill_jobs, 'one'")
    await pool.execute("NOTIFY treadmill_jobs, 'two'")
    assert await recorder.wait_for(lambda p: p == ["one", "two"], timeout=2)


@pytest_twisted.ensureDeferred
async def test_job_trigger_notifies_insert_and_update(pool, listener):
    """Every insert or update of a job notifies a :class:`JobNote`
    (``"<id> <state> <host id or ->"``)."""
    _, recorder = listener

    def heads(payloads: list[str]) -> list[list[str]]:
        notes = [JobNote.parse(payload) for payload in payloads]
        assert None not in notes, payloads
        assert {note.host_id for note in notes} <= {None}
        return [[note.job_id, note.state] for note in notes]

    user = await pool.fetchone("INSERT INTO users (name) VALUES ('owner') RETURNING id")
    job = await pool.fetchone(
        "INSERT INTO jobs (owner_id, image_digest, timeout, queue_timeout, queue_deadline) "
        "VALUES (%s, %s, 60, 60, now() + interval '1 minute') RETURNING id",
        (user["id"], "sha256:" + "0" * 64))
    job_id = str(job["id"])
    assert await recorder.wait_for(lambda p: [job_id, "queued"] in heads(p), timeout=2), \
        recorder.payloads

    await pool.execute("UPDATE jobs SET state = 'assigned' WHERE id = %s", (job_id,))
    await pool.execute(
        "UPDATE jobs SET state = 'terminated', termination_reason = 'user_terminated' "
        "WHERE id = %s", (job_id,))
    expected = [[job_id, "queued"], [job_id, "assigned"], [job_id, "terminated"]]
    assert await recorder.wait_for(lambda p: heads(p) == expected, timeout=2), \
        recorder.payloads


@pytest_twisted.ensureDeferred
async def test_notifications_wait_for_commit(pool, listener):
    """A NOTIFY inside a transaction arrives only once it commits, and never on rollback."""
    _, recorder = listener
    gate: Deferred[None] = Deferred()

    async def notify_then_wait(cur):
        await cur.execute("NOTIFY treadmill_jobs, 'committed'")
        await gate

    async def notify_then_fail(cur):
        await cur.execute("NOTIFY treadmill_jobs, 'rolled back'")
        raise RuntimeError("abort")

    pending = ensureDeferred(pool.transaction(notify_then_wait))
    await sleep(0.2)
    assert recorder.payloads == []
    gate.callback(None)
    await pending
    assert await recorder.wait_for(lambda p: p == ["committed"], timeout=2)

    with pytest.raises(RuntimeError):
        await pool.transaction(notify_then_fail)
    await pool.execute("NOTIFY treadmill_jobs, 'marker'")
    assert await recorder.wait_for(lambda p: "marker" in p, timeout=2)
    assert recorder.payloads == ["committed", "marker"]


@pytest_twisted.ensureDeferred
async def test_an_urgent_statement_goes_ahead_of_those_waiting_for_a_connection(
        database: str) -> None:
    """A failover's link registrations must not wait behind hundreds of
    reconciliations queued for the pool's connections."""
    pool = Pool(reactor, database, size=1)
    await pool.start()
    try:
        done: list[str] = []

        async def run(name: str, urgent: bool = False) -> None:
            await pool.fetchall(f"SELECT '{name}' AS name, pg_sleep(0.05)", urgent=urgent)
            done.append(name)

        busy = ensureDeferred(run("busy"))  # takes the one connection
        queued = [ensureDeferred(run(f"queued-{i}")) for i in range(3)]
        urgent = ensureDeferred(run("urgent", urgent=True))
        await DeferredList([busy, *queued, urgent], fireOnOneErrback=True)
        assert done == ["busy", "urgent", "queued-0", "queued-1", "queued-2"]
        await pool.fetchall("SELECT 1", urgent=True)  # with a free connection: at once
    finally:
        pool.close()
