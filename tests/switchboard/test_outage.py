"""Database outages: timeouts, reconnection, 503 answers and supervisor reports.

The outage is real: the test's database refuses connections and its sessions
are terminated (:mod:`tests.switchboard.outage`), then it comes back.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from tests.switchboard.outage import Outage
from treadmill.switchboard.database import (
    DatabaseUnavailable,
    Listener,
    Pool,
    StatementCancelled,
    Timeouts,
    session_dsn,
    unavailable,
)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def failure_of(work: Any) -> BaseException | None:
    try:
        await work
    except Exception as e:
        return e
    return None


@pytest.fixture
def outage(pg_admin_dsn: str, database: str):
    outage = Outage(pg_admin_dsn, database)
    yield outage
    if outage.active:
        pytest_twisted.blockon(Deferred.fromCoroutine(outage.end()))


@pytest_twisted.async_yield_fixture
async def small_pool(database: str) -> AsyncIterator[Pool]:
    pool = Pool(reactor, database, size=3,
                timeouts=Timeouts(statement=0.3, lock=0.2, idle_in_transaction=0.3))
    await pool.start()
    try:
        yield pool
    finally:
        pool.close()


# -- timeouts -------------------------------------------------------------------------


def test_timeouts_are_added_to_the_dsn_options() -> None:
    dsn = session_dsn("dbname=x options='-c search_path=a'", Timeouts(1.5, 0.25, 0))
    parsed = psycopg2.extensions.parse_dsn(dsn)
    assert parsed["dbname"] == "x"
    assert parsed["options"] == ("-c search_path=a -c statement_timeout=1500 "
                                 "-c lock_timeout=250 -c idle_in_transaction_session_timeout=0")


@pytest_twisted.ensureDeferred
async def test_statement_timeout_cancels_a_long_statement(small_pool: Pool) -> None:
    before = await small_pool.fetchone("SELECT pg_backend_pid() AS pid")
    started = time.monotonic()
    error = await failure_of(small_pool.fetchone("SELECT pg_sleep(5)"))
    assert isinstance(error, StatementCancelled), error
    assert time.monotonic() - started < 2.0
    assert unavailable(error)
    # The connection survives a cancelled statement: no reconnection.
    pids = {(await small_pool.fetchone("SELECT pg_backend_pid() AS pid"))["pid"]
            for _ in range(6)}
    assert before["pid"] in pids and len(pids) <= 3


@pytest_twisted.ensureDeferred
async def test_lock_timeout_gives_up_waiting(small_pool: Pool) -> None:
    await small_pool.execute("CREATE TABLE t (id int PRIMARY KEY)")
    await small_pool.execute("INSERT INTO t VALUES (1)")
    holding: Deferred[None] = Deferred()
    release: Deferred[None] = Deferred()

    async def hold(cur: Any) -> None:
        await cur.execute("SELECT id FROM t WHERE id = 1 FOR UPDATE")
        holding.callback(None)
        await release

    held = Deferred.fromCoroutine(small_pool.transaction(hold))
    await holding
    started = time.monotonic()
    error = await failure_of(small_pool.fetchone("SELECT id FROM t WHERE id = 1 FOR UPDATE"))
    release.callback(None)
    await held
    assert isinstance(error, psycopg2.errors.LockNotAvailable), error
    assert time.monotonic() - started < 1.5
    assert unavailable(error)


@pytest_twisted.ensureDeferred
async def test_idle_in_transaction_timeout_ends_a_stalled_transaction(small_pool: Pool) -> None:
    await small_pool.execute("CREATE TABLE t (id int PRIMARY KEY)")
    await small_pool.execute("INSERT INTO t VALUES (1)")

    async def stall(cur: Any) -> None:
        await cur.execute("SELECT id FROM t WHERE id = 1 FOR UPDATE")
        await sleep(1.0)  # a stalled peer, holding the row lock
        await cur.execute("UPDATE t SET id = 2")

    stalled = Deferred.fromCoroutine(small_pool.transaction(stall))
    await sleep(0.6)
    # The server ended the stalled session: its lock is free again.
    row = await small_pool.fetchone("SELECT id FROM t WHERE id = 1 FOR UPDATE NOWAIT")
    assert row == {"id": 1}
    error = await failure_of(stalled)
    assert error is not None and unavailable(error), error
    assert (await small_pool.fetchone("SELECT id FROM t"))["id"] == 1


@pytest_twisted.ensureDeferred
async def test_the_listen_connection_has_the_timeouts(database: str) -> None:
    listener = Listener(reactor, database, Timeouts(statement=1.25, lock=0.5,
                                                    idle_in_transaction=2))
    listener.observe("x", lambda payload: None)
    listener.startService()
    await listener.ready()
    try:
        conn = listener._conn
        assert conn is not None
        shown = [(await conn.runQuery(f"SHOW {name}"))[0][0] for name in (
            "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")]
        assert shown == ["1250ms", "500ms", "2s"]
    finally:
        await listener.stopService()


# -- reconnection -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_queries_fail_fast_during_an_outage_and_work_soon_after(small_pool: Pool,
                                                                      outage: Outage) -> None:
    await small_pool.fetchone("SELECT 1")
    await outage.begin()
    for _ in range(8):
        started = time.monotonic()
        error = await failure_of(small_pool.fetchone("SELECT 1"))
        assert error is not None and unavailable(error), error
        assert time.monotonic() - started < 1.0
    await sleep(1.5)  # several reconnection attempts fail meanwhile
    await outage.end()
    back = time.monotonic()
    while True:
        if await failure_of(small_pool.fetchone("SELECT 1")) is None:
            break
        assert time.monotonic() - back < 2.5, "the pool did not reconnect quickly"
        await sleep(0.05)
    # Every connection is back: no query fails any more.
    for _ in range(12):
        assert await small_pool.fetchone("SELECT 1 AS one") == {"one": 1}


@pytest_twisted.ensureDeferred
async def test_idle_connections_cut_by_a_restart_do_not_fail_later_queries(
        small_pool: Pool, outage: Outage) -> None:
    for _ in range(3):
        await small_pool.fetchone("SELECT 1")
    await outage.cut()  # the server restarted while the pool was idle
    await sleep(1.0)
    for _ in range(12):
        assert await small_pool.fetchone("SELECT 1 AS one") == {"one": 1}


@pytest_twisted.ensureDeferred
async def test_a_pool_that_is_not_connected_is_unavailable(database: str) -> None:
    pool = Pool(reactor, database)
    error = await failure_of(pool.fetchone("SELECT 1"))
    assert isinstance(error, DatabaseUnavailable) and unavailable(error)


def test_bugs_are_not_outages() -> None:
    assert not unavailable(psycopg2.errors.UniqueViolation())
    assert not unavailable(psycopg2.errors.SyntaxError())
    assert not unavailable(ValueError())
    assert unavailable(psycopg2.errors.AdminShutdown())
