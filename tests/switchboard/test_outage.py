"""Database outages: timeouts, reconnection, 503 answers and supervisor reports.

The outage is real: the test's database refuses connections and its sessions
are terminated (:mod:`tests.switchboard.outage`), then it comes back.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from tests.support import RunningSwitchboard, mock_supervisor, start_switchboard
from tests.switchboard import support
from tests.switchboard.outage import Outage
from tests.switchboard.outage import outage as outage  # the fixture
from tests.switchboard.peer import Peer, Script
from tests.util.running import stopping
from tests.util.waiting import eventually, sleep
from treadmill.protocol import supervisor as protocol
from treadmill.switchboard.database import (
    DatabaseUnavailable,
    Listener,
    Pool,
    StatementCancelled,
    Timeouts,
    session_dsn,
    unavailable,
)
from treadmill.switchboard.links import LinkPolicy


async def failure_of(work: Any) -> BaseException | None:
    try:
        await work
    except Exception as e:
        return e
    return None


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
    assert parsed["options"] == ("-c jit=off -c search_path=a -c statement_timeout=1500 "
                                 "-c lock_timeout=250 -c idle_in_transaction_session_timeout=0")
    # JIT off first, so that the DSN's own options may turn it on again.
    assert psycopg2.extensions.parse_dsn(session_dsn("options='-c jit=on'", Timeouts()))[
        "options"].startswith("-c jit=off -c jit=on ")
    assert parsed["keepalives_idle"] == "5" and parsed["keepalives_count"] == "3"
    # What the DSN says about keepalives stands.
    mine = psycopg2.extensions.parse_dsn(session_dsn("dbname=x keepalives_idle=60",
                                                     Timeouts()))
    assert mine["keepalives_idle"] == "60" and mine["keepalives_interval"] == "2"


@pytest_twisted.ensureDeferred
async def test_sessions_compile_nothing(small_pool: Pool) -> None:
    """JIT is off on the switchboard's connections (database.NO_JIT)."""
    assert (await small_pool.fetchone("SHOW jit"))["jit"] == "off"


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
async def test_a_transaction_cut_midway_is_an_outage_without_a_traceback(
        small_pool: Pool, outage: Outage) -> None:
    """The server goes away inside a transaction: its next statement and the rollback
    fail; the caller gets an outage and nothing logs a traceback (the chaos run found
    txpostgres logging the failed rollback, and the reactor an fd of -1)."""
    tracebacks: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event or event.get("isError"):
            tracebacks.append(event)

    async def cut_midway(cur: Any) -> None:
        await cur.execute("SELECT 1")
        await outage.cut()
        await sleep(0.3)
        await cur.execute("SELECT 2")

    globalLogPublisher.addObserver(observe)
    try:
        error = await failure_of(small_pool.transaction(cut_midway))
        await sleep(0.5)
        assert await small_pool.fetchone("SELECT 1 AS one") == {"one": 1}
    finally:
        globalLogPublisher.removeObserver(observe)
    assert error is not None and unavailable(error), error
    assert tracebacks == []


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


# -- supervisor reports and reconciliation --------------------------------------------


class Failures:
    """Failures (tracebacks) and warnings logged by the supervisor links, the API, the
    scheduler, the timeout enforcer and the job counter (an outage is a warning for each,
    never a traceback).
    """

    NAMESPACES = ("treadmill.switchboard.links", "treadmill.switchboard.api",
                  "treadmill.switchboard.scheduler", "treadmill.switchboard.timeouts",
                  "treadmill.switchboard.service", "treadmill.switchboard.auth")

    def __init__(self) -> None:
        self.failures: list[dict[str, Any]] = []
        self.warnings: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if not str(event.get("log_namespace", "")).startswith(self.NAMESPACES):
            return
        if "log_failure" in event:
            self.failures.append(event)
        elif event.get("log_level") is LogLevel.warn:
            self.warnings.append(formatEvent(event))

    def tracebacks(self) -> list[str]:
        return [formatEvent(e) + repr(e["log_failure"].value) for e in self.failures]


@pytest.fixture
def logged() -> Any:
    failures = Failures()
    globalLogPublisher.addObserver(failures)
    yield failures
    globalLogPublisher.removeObserver(failures)


@pytest_twisted.async_yield_fixture
async def sb(database: str, tmp_path: Path) -> AsyncIterator[RunningSwitchboard]:
    async with stopping(await start_switchboard(database, tmp_path, scheduler_interval=0.2,
                                                links=LinkPolicy(reconcile_retry=0.5))) as running:
        yield running


async def until_back(outage: Outage, sb: RunningSwitchboard) -> float:
    """End the outage; return when it ended (reactor time) once the API answers again."""
    await outage.end()
    back = reactor.seconds()

    async def healthy() -> bool:
        return (await sb.admin.get("/healthz")).status == 200

    await eventually(healthy, timeout=5)
    return back


async def ready_job(sb: RunningSwitchboard, peer: Peer, **fields: Any) -> str:
    job_id = await support.assigned_job(sb, peer, **fields)
    for state, fields in (("initializing", {"stage": "starting"}), ("ready", {})):
        assert (await peer.event(job_id, state, **fields))["ok"]
    await support.reaches(sb, job_id, "ready")
    return job_id


async def host_idle(sb: RunningSwitchboard) -> bool:
    return (await sb.admin.get("/api/v1/hosts/h1")).body["current_job"] is None


@pytest_twisted.ensureDeferred
async def test_an_event_sent_during_an_outage_is_refused_then_stored(
        sb: RunningSwitchboard, outage: Outage, logged: Failures) -> None:
    """Minor 4: acked ``unavailable`` (never ``ok``) until stored; then everything
    converges within 10 s of the database's return."""
    peer = await support.host_peer(sb)
    job_id = await ready_job(sb, peer)
    await outage.begin()
    # The workload exits: the supervisor reports it and no longer runs the job.
    peer.script.job = None
    delivery = Deferred.fromCoroutine(peer.deliver(protocol.job_event(
        0, job_id, "terminated", reason="workload_exited", exit_status=0, message="exit 0")))
    while not peer.of_type("ack") or len([a for a in peer.of_type("ack")
                                          if protocol.is_retryable(a)]) < 3:
        await sleep(0.05)
    await sleep(1.0)  # reconciliations fail meanwhile, and are retried
    back = await until_back(outage, sb)
    acks = await delivery
    assert [a["ok"] for a in acks[:-1]] == [False] * (len(acks) - 1) and acks[-1]["ok"]
    assert all(a["error"]["code"] == "unavailable" for a in acks[:-1])
    body = await support.reaches(sb, job_id, "terminated", reason="workload_exited", exit_status=0)
    assert body["termination"]["message"] == "exit 0"
    await eventually(lambda: host_idle(sb), timeout=10)
    # The host is free again: the next job starts on it.
    job2 = await support.submit(sb)
    await peer.wait_for("start_job", job_id=job2, timeout=10)
    assert reactor.seconds() - back < 10
    assert logged.tracebacks() == []


@pytest_twisted.ensureDeferred
async def test_an_older_supervisor_is_disconnected_and_resends(
        sb: RunningSwitchboard, outage: Outage, logged: Failures) -> None:
    """Minor 3 would drop an event acked ``ok: false``: the link closes (4003) instead,
    the upgrade is refused with 503 while the database is away, and the event
    sent again after the reconnect is stored."""
    token = await support.add_host(sb)
    peer = Peer(sb.url, token, minor=3)
    await peer.connect()
    await peer.wait_for("status_request")
    job_id = await ready_job(sb, peer)
    await outage.begin()
    peer.script.job = None
    event = protocol.job_event(0, job_id, "terminated", reason="workload_exited",
                               exit_status=0)
    request_id = 1000
    peer.send({**event, "request_id": request_id})
    assert await peer.closed() == protocol.CloseCode.INTERNAL_ERROR
    assert not [a for a in peer.of_type("ack") if a["request_id"] == request_id]
    with pytest.raises(ConnectionRefusedError):
        await peer.connect()
    upgrade = await treq.get(sb.url + protocol.PATH, headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Protocol": protocol.SUBPROTOCOL, "Authorization": f"Bearer {token}"})
    await upgrade.content()
    assert upgrade.code == 503
    assert sb.service.links.gate.in_progress == 0  # the refused handshakes freed their slots
    back = await until_back(outage, sb)

    async def reconnected() -> bool:
        try:
            await peer.connect()
        except ConnectionRefusedError:
            return False
        return True

    await eventually(reconnected, timeout=10, interval=0.2)
    assert (await peer.event(job_id, "terminated", reason="workload_exited",
                             exit_status=0))["ok"]
    await support.reaches(sb, job_id, "terminated", reason="workload_exited")
    await eventually(lambda: host_idle(sb), timeout=10)
    assert reactor.seconds() - back < 10
    assert logged.tracebacks() == []


@pytest_twisted.ensureDeferred
async def test_a_reconciliation_that_fails_is_retried_soon(sb: RunningSwitchboard,
                                                           outage: Outage) -> None:
    """R3 during an outage: the job the host dropped ends within seconds of the return."""
    peer = await support.host_peer(sb)
    job_id = await ready_job(sb, peer)
    await outage.begin()
    peer.script.job = None  # the host lost the job (say it rebooted)
    link = sb.service.links.by_host[next(iter(sb.service.links.by_host))]
    peer.received.clear()
    link.links.spawn(link.reconcile())
    await peer.wait_for("status_request", count=3, timeout=5)  # retried every ~0.5 s
    back = await until_back(outage, sb)
    await support.reaches(sb, job_id, "terminated", reason="host_dropped_job")
    assert reactor.seconds() - back < 10


@pytest_twisted.ensureDeferred
async def test_an_unanswered_status_request_is_retried(sb: RunningSwitchboard) -> None:
    token = await support.add_host(sb)
    sb.service.links.request_timeout = 0.3
    peer = await support.connected_peer(sb, token, Script(answer_status=False))
    await peer.wait_for("status_request", count=3, timeout=5)
    peer.script.answer_status = True
    job_id = await support.submit(sb)
    await peer.wait_for("start_job", job_id=job_id)


@pytest_twisted.ensureDeferred
async def test_hosts_connected_through_an_outage_are_not_unreachable(
        database: str, tmp_path: Path, outage: Outage) -> None:
    """An outage longer than unreachable_after must not end jobs of connected hosts:
    R9 waits until this instance has recorded its links' liveness again."""
    sb = await start_switchboard(database, tmp_path, scheduler_interval=0.2,
                                 links=LinkPolicy(reconcile_retry=0.5, unreachable_after=1.0))
    links = sb.service.links
    try:
        token = await support.add_host(sb)
        peer = await support.connected_peer(sb, token)
        job_id = await ready_job(sb, peer)
        # The periodic work runs by hand here, in the order that would go wrong.
        for name in ("touch", "unreachable"):
            await links.getServiceNamed(name).stopService()
        await links.touch()
        await outage.begin()
        await sleep(1.2)
        await until_back(outage, sb)

        async def listener_back() -> bool:  # it tells the links the records are stale
            return links._touched_since is None

        await eventually(listener_back, timeout=5)
        await links.end_unreachable()  # before any touch since the return
        assert (await support.job(sb, job_id))["state"] == "ready"
        await links.touch()
        await sleep(2.5 * links.policy.touch_interval)
        await links.touch()
        await links.end_unreachable()
        assert (await support.job(sb, job_id))["state"] == "ready"
        peer.disconnect()
        await sleep(1.2)
        await links.end_unreachable()
        await support.reaches(sb, job_id, "terminated", reason="host_unreachable")
    finally:
        await sb.stop()


# -- the API ---------------------------------------------------------------------------

OPENAPI = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json")
                     .read_text(encoding="utf-8"))
NO_DATABASE = {("get", "/.well-known/treadmill/capability-keys"),
               ("get", "/api/v1/openapi.json"),  # a static document
               ("get", "/api/v1/supervisor")}  # (the WebSocket: see the link tests)
PATH_VALUES = {"name": "h1", "job_id": "6f1d2c3b-0000-4000-8000-000000000001",
               "token_id": "6f1d2c3b-0000-4000-8000-000000000002",
               "snapshot_id": "6f1d2c3b-0000-4000-8000-000000000003",
               "user": "someone", "privilege": "read", "namespace": "team", "kind": "hosts",
               "service": "treadmill-imagestore", "key_id": "6f1d2c3b-0000-4000-8000-000000000004"}
QUERIES = {"/api/v1/registry/token": "?service=treadmill-imagestore&scope=repository:a:pull"}
BODIES = {"/api/v1/login": {"user": "admin", "password": "whatever"},
          "/api/v1/jobs": {"image": "sha256:" + "c" * 64},
          "/api/v1/hosts/{name}/tags": {"tags": ["a"]}}
ROUTES = sorted((method, path) for path, methods in OPENAPI["paths"].items()
                for method in methods if method in ("get", "post", "put", "patch", "delete")
                and (method, path) not in NO_DATABASE)


def test_the_route_table_covers_the_api() -> None:
    assert len(ROUTES) >= 40 and {("post", "/api/v1/jobs"), ("get", "/healthz")} <= set(ROUTES)


@pytest_twisted.ensureDeferred
async def test_every_route_answers_503_with_retry_after_during_an_outage(
        sb: RunningSwitchboard, outage: Outage, logged: Failures) -> None:
    fresh = await sb.user("fresh", admin=True)  # its token is in no cache
    await outage.begin()
    wrong = []
    for method, path in ROUTES:
        url = re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path) + QUERIES.get(
            path, "")
        body = BODIES.get(path, {}) if method in ("post", "put", "patch") else None
        r = await fresh.request(method.upper(), url, body)
        if (r.status, r.error) != (503, "unavailable") or \
                r.headers.getRawHeaders(b"retry-after") != [b"2"]:
            wrong.append((method, path, r.status, r.body))
    assert wrong == []
    assert logged.tracebacks() == []
    assert len([w for w in logged.warnings if "503" in w]) >= len(ROUTES) - 2
    await until_back(outage, sb)
    assert (await fresh.get("/api/v1/whoami")).status == 200


@pytest_twisted.ensureDeferred
async def test_token_uses_seen_before_an_outage_are_recorded_after_it(
        sb: RunningSwitchboard, outage: Outage, logged: Failures) -> None:
    """The batched last-use times of API tokens: flushing them during an outage is a
    warning, not a traceback (the devstack's first outage logged one), and they are
    written by the first flush after it."""
    user = await sb.user("toucher")
    assert (await user.get("/api/v1/whoami")).status == 200
    await outage.begin()
    await sb.service.auth.flush_usage()
    assert logged.tracebacks() == []
    assert [w for w in logged.warnings if "token use" in w]
    await until_back(outage, sb)
    await sb.service.auth.flush_usage()  # the user's token was not used since
    [token] = await sb.store.list_tokens((await sb.store.get_user("toucher"))["id"])
    assert token["last_used_at"] is not None


@pytest_twisted.ensureDeferred
async def test_no_request_fails_otherwise_than_503_through_an_outage(
        sb: RunningSwitchboard, outage: Outage, logged: Failures) -> None:
    """Polling all along: only 200 or 503, and 200 within 2 s of the return."""
    statuses: list[tuple[float, int]] = []
    stop = False

    async def poll() -> None:
        while not stop:
            r = await sb.admin.get("/api/v1/jobs")
            statuses.append((reactor.seconds(), r.status))
            await sleep(0.05)

    poller = Deferred.fromCoroutine(poll())
    await sleep(0.2)
    await outage.begin()
    await sleep(1.0)
    await outage.end()
    back = reactor.seconds()
    await sleep(2.0)
    stop = True
    await poller
    assert {status for _, status in statuses} == {200, 503}
    first_ok = min(at for at, status in statuses if at > back and status == 200)
    assert first_ok - back < 2.0
    assert all(status == 200 for at, status in statuses if at > first_ok)
    health = await sb.admin.get("/healthz")
    assert health.status == 200
    assert logged.tracebacks() == []


@pytest_twisted.ensureDeferred
async def test_a_lock_held_by_a_stalled_peer_answers_503_soon(database: str,
                                                              tmp_path: Path) -> None:
    """A peer holding a lock the request needs: lock_timeout, 503, no traceback."""
    sb = await start_switchboard(database, tmp_path,
                                 timeouts=Timeouts(statement=5, lock=0.3))
    try:
        fresh = await sb.user("fresh")
        holding: Deferred[None] = Deferred()
        release: Deferred[None] = Deferred()

        async def stall(cur: Any) -> None:
            await cur.execute("LOCK TABLE api_tokens IN ACCESS EXCLUSIVE MODE")
            holding.callback(None)
            await release

        held = Deferred.fromCoroutine(sb.service.pool.transaction(stall))
        await holding
        started = time.monotonic()
        r = await fresh.get("/api/v1/whoami")
        release.callback(None)
        await held
        assert (r.status, r.error) == (503, "unavailable")
        assert time.monotonic() - started < 2.0
        assert (await fresh.get("/api/v1/whoami")).status == 200
    finally:
        await sb.stop()


@pytest_twisted.ensureDeferred
async def test_a_watch_stream_ends_cleanly_in_an_outage(sb: RunningSwitchboard, outage: Outage,
                                                        logged: Failures) -> None:
    """Its status line is long gone: the stream ends with an SSE retry hint, no JSON."""
    job_id = await support.submit(sb)
    response = await treq.get(f"{sb.url}/api/v1/jobs/{job_id}/events/watch",
                              headers=sb.admin.headers(), unbuffered=True)
    assert response.code == 200
    chunks: list[bytes] = []
    ended = treq.collect(response, chunks.append)
    while b"id: " not in b"".join(chunks):
        await sleep(0.05)
    await outage.begin()
    sb.service.watchers.wake_all()  # as a notification would: it reads again
    ended.addTimeout(5, reactor)
    await ended
    text = b"".join(chunks).decode()
    assert text.endswith(": the database is unavailable\nretry: 2000\n\n"), text
    assert "error" not in text
    assert logged.tracebacks() == []
    await until_back(outage, sb)


@pytest_twisted.ensureDeferred
async def test_a_job_that_exited_in_time_is_not_an_execution_timeout(
        sb: RunningSwitchboard, outage: Outage) -> None:
    """Its deadline passed during the outage, its exit is reported after the return:
    it ends workload_exited (execution timeouts wait a little after an outage)."""
    peer = await support.host_peer(sb)
    job_id = await ready_job(sb, peer, timeout=1)
    sb.service.getServiceNamed("timeouts").after_outage = 3.0
    await outage.begin()
    peer.script.job = None
    delivery = Deferred.fromCoroutine(peer.deliver(protocol.job_event(
        0, job_id, "terminated", reason="workload_exited", exit_status=0), every=1.5))
    await sleep(1.2)  # the deadline passes
    await until_back(outage, sb)
    await delivery
    await support.reaches(sb, job_id, "terminated", reason="workload_exited", exit_status=0)


@pytest_twisted.ensureDeferred
async def test_execution_timeouts_resume_after_an_outage(sb: RunningSwitchboard,
                                                         outage: Outage) -> None:
    peer = await support.host_peer(sb)
    job_id = await ready_job(sb, peer, timeout=1)
    sb.service.getServiceNamed("timeouts").after_outage = 1.5
    await outage.begin()
    await sleep(1.1)
    back = await until_back(outage, sb)

    async def stopping() -> bool:
        return (await support.job(sb, job_id))["state"] != "ready"

    await eventually(stopping, timeout=15)
    assert reactor.seconds() - back >= 1.2
    body = await support.job(sb, job_id)
    assert body["termination"]["reason"] == "execution_timeout"


@pytest_twisted.ensureDeferred
async def test_a_connection_that_cannot_register_leaves_the_current_link_in_charge(
        database: str, tmp_path: Path) -> None:
    """A second connection of a host whose registration times out (a lock held) is
    refused with 503, and the host's working link keeps receiving its jobs."""
    sb = await start_switchboard(database, tmp_path, scheduler_interval=0.2,
                                 timeouts=Timeouts(statement=5, lock=0.3))
    try:
        token = await support.add_host(sb)
        first = await support.connected_peer(sb, token)
        holding: Deferred[None] = Deferred()
        release: Deferred[None] = Deferred()

        async def stall(cur: Any) -> None:
            await cur.execute("LOCK TABLE hosts IN EXCLUSIVE MODE")  # reads still pass
            holding.callback(None)
            await release

        held = Deferred.fromCoroutine(sb.service.pool.transaction(stall))
        await holding
        second = Peer(sb.url, token)
        try:
            with pytest.raises(ConnectionRefusedError):
                await second.connect()
        finally:
            release.callback(None)
            await held
        assert first.connection is not None
        job_id = await support.submit(sb)
        await first.wait_for("start_job", job_id=job_id)
    finally:
        await sb.stop()


@pytest_twisted.ensureDeferred
async def test_retries_do_not_pile_up_behind_a_held_status_request(
        sb: RunningSwitchboard, outage: Outage) -> None:
    """A supervisor answers status only once its reports are stored: while it waits,
    the switchboard sends no more status requests, and one answer settles it."""
    peer = await support.host_peer(sb)
    job_id = await ready_job(sb, peer)
    await outage.begin()
    peer.script.job = None
    delivery = Deferred.fromCoroutine(peer.deliver(protocol.job_event(
        0, job_id, "terminated", reason="workload_exited", exit_status=0)))
    peer.received.clear()
    link = next(iter(sb.service.links.by_host.values()))
    link.links.spawn(link.reconcile())  # its status request is held
    await sleep(2.0)  # four retry intervals
    assert len(peer.of_type("status_request")) == 1
    await until_back(outage, sb)
    await delivery
    await support.reaches(sb, job_id, "terminated", reason="workload_exited")
    await eventually(lambda: host_idle(sb), timeout=5)


# -- end to end: a real supervisor --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_real_supervisor_through_an_outage(database: str, tmp_path: Path,
                                                   outage: Outage) -> None:
    """Real switchboard, supervisor (mock driver) and PostgreSQL: the workload exits
    while the database is away; within 10 s of its return the job has ended
    workload_exited, the host is idle and runs the next job. Its resend backoff (5 s
    and more) is longer than the outage: the switchboard makes it resend at once when
    the database answers again (it closes the link: 4005)."""
    sb = await start_switchboard(database, tmp_path, scheduler_interval=0.2,
                                 links=LinkPolicy(reconcile_retry=0.5))
    r = await sb.admin.post("/api/v1/hosts", {"name": "mock-1", "tags": ["mock"]})
    assert r.status == 201, r.body
    supervisor = mock_supervisor(sb.url, r.body["token"], tmp_path / "mock-1", stage_time=0.02,
                                 run_time=0.2,
                                 config={"event_ack_timeout": 5.0, "event_resend_max": 30.0})
    try:
        await supervisor.connected()

        async def enqueue(run_time: str) -> str:
            r = await sb.admin.post("/api/v1/jobs", {
                "image": "sha256:" + "e" * 64, "tags": ["mock"],
                "parameters": {"mock.run_time": {"value": run_time, "secret": False}}})
            assert r.status == 201, r.body
            return r.body["id"]

        job_id = await enqueue("1.0")
        await support.reaches(sb, job_id, "ready")
        await outage.begin()
        await sleep(2.0)  # the workload exits meanwhile
        assert [e["state"] for e in supervisor.runner.pending_events] == ["terminated"]
        back = await until_back(outage, sb)
        body = await support.reaches(sb, job_id, "terminated", reason="workload_exited",
                             exit_status=0)
        assert body["host"] == "mock-1"
        assert reactor.seconds() - back < 3.0  # not after the supervisor's backoff

        async def idle() -> bool:
            r = await sb.admin.get("/api/v1/hosts/mock-1")
            return r.status == 200 and r.body["current_job"] is None

        await eventually(idle, timeout=10)
        assert reactor.seconds() - back < 10
        second = await enqueue("0.1")
        await support.reaches(sb, second, "terminated", reason="workload_exited")
        events = (await sb.admin.get(f"/api/v1/jobs/{job_id}/events")).body["events"]
        assert [e["state"] for e in events].count("terminated") == 1
    finally:
        await supervisor.stopService()
        await sb.stop()


@pytest_twisted.ensureDeferred
async def test_a_deadlock_does_not_cost_the_connection(small_pool: Pool) -> None:
    """Errors the server reports on a healthy session keep the connection."""
    pids = {(await small_pool.fetchone("SELECT pg_backend_pid() AS pid"))["pid"]
            for _ in range(6)}
    for code in ("40P01", "40001", "55P03"):
        error = await failure_of(small_pool.execute(
            f"DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '{code}'; END $$"))
        assert isinstance(error, psycopg2.OperationalError) and error.pgcode == code
    after = {(await small_pool.fetchone("SELECT pg_backend_pid() AS pid"))["pid"]
             for _ in range(6)}
    assert after <= pids


@pytest_twisted.ensureDeferred
async def test_a_link_closing_with_several_requests_pending_fails_them_all(
        sb: RunningSwitchboard) -> None:
    """(An errback popping its entry used to cut the loop short: the other requests
    waited for their timeout and the link was never unregistered.)"""
    peer = await support.host_peer(sb, script=Script(answer_status=False))
    links = sb.service.links
    link = next(iter(links.by_host.values()))
    tasks = [link.links.spawn(link.reconcile()) for _ in range(3)]
    await peer.wait_for("status_request", count=4)
    peer.disconnect()
    for task in tasks:
        task.addTimeout(2, reactor)
        await task

    async def disconnected() -> bool:
        return links.by_host == {} and (
            await sb.admin.get("/api/v1/hosts/h1")).body["connected"] is False

    await eventually(disconnected, timeout=5)


@pytest_twisted.ensureDeferred
async def test_healthz_does_not_wait_behind_a_busy_pool(sb: RunningSwitchboard,
                                                        outage: Outage) -> None:
    """A load balancer's health check (500 ms in etc/haproxy) must not queue behind the
    pool's real work: an instance busy with link acceptances was marked down, its
    sessions shut, and the reconnecting fleet kept every instance busy (10,000
    supervisors never settled). A statement answered within a second proves the
    database reachable; a failure since then does not."""
    pool = sb.service.pool

    async def health() -> int:
        r = await treq.get(sb.url + "/healthz", persistent=False)
        await r.content()
        return r.code

    await sb.store.ping()
    busy = [Deferred.fromCoroutine(pool.fetchone("SELECT pg_sleep(1.5)"))
            for _ in range(pool.size * 2)]
    t0 = time.monotonic()
    assert await health() == 200  # as HAProxy asks: no credentials
    assert time.monotonic() - t0 < 0.5
    for d in busy:
        await d
    # A statement that fails for want of the database voids the last answer at once.
    await outage.begin()
    try:
        await sb.store.ping()
    except Exception as e:
        assert unavailable(e)
    assert not pool.answered_within(1.0)
    assert await health() == 503
    await until_back(outage, sb)
