"""PostgreSQL plumbing: the connection pool, migrations and LISTEN.

Every query of the switchboard goes through one txpostgres
:class:`ConnectionPool`; the SQL itself lives in :mod:`treadmill.switchboard.store`.
Schema changes are versioned ``.sql`` files in ``migrations/``, applied at
start in one transaction under an advisory lock, so two switchboards starting
at once apply each migration exactly once.

Every connection (the pool's and the LISTEN one) runs with statement, lock and
idle-in-transaction timeouts (:class:`Timeouts`), so a stalled peer cannot hold
locks for long. A connection the server closes is reconnected at once and then
every :data:`RECONNECT_MAX` seconds at most; while the database is away every
query fails fast with an error :func:`unavailable` recognises (the API answers
``503``), and the pool prefers connections that are alive.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg2
import psycopg2.extras
from psycopg2.extensions import make_dsn, parse_dsn
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import reconnection, retrying, txpostgres

T = TypeVar("T")

# pg_advisory_xact_lock key for migrations: "treadmil" in ASCII.
MIGRATION_LOCK = 0x74726561646D696C

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

RECONNECT_MAX = 1.0
"""Longest wait in seconds between two attempts to reconnect a dead connection."""


class DatabaseUnavailable(Exception):
    """The database cannot be reached now (the pool is not connected)."""


class StatementCancelled(DatabaseUnavailable):
    """The server cancelled a statement (``statement_timeout``; txpostgres reports it
    as a ``CancelledError``, which here would read as a client that went away)."""


def _server_cancelled(failure: Failure) -> Failure:
    # Our queries are never cancelled from this side (see shielded), so a
    # CancelledError out of txpostgres is the server's QueryCanceled.
    if failure.check(CancelledError):
        return Failure(StatementCancelled("the statement was cancelled (statement_timeout)"))
    return failure


@dataclass(frozen=True)
class Timeouts:
    """Server-side timeouts of every connection, in seconds (0 disables one)."""

    statement: float = 10.0
    lock: float = 5.0
    idle_in_transaction: float = 10.0

    def options(self) -> str:
        """The libpq ``options`` that set them for a session."""
        return " ".join(
            f"-c {name}={round(value * 1000)}" for name, value in (
                ("statement_timeout", self.statement), ("lock_timeout", self.lock),
                ("idle_in_transaction_session_timeout", self.idle_in_transaction)))


TCP_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2",
                  "keepalives_count": "3"}
"""libpq TCP keepalives unless the DSN sets them: a server gone silent (a network
partition, a host powered off) is noticed in about 11 s, not after the kernel's
two hours. (Ignored on UNIX sockets.)"""


NO_JIT = "-c jit=off"
"""Session option: no JIT compilation. The switchboard's statements are short, but with
10,000 hosts the planner's cost estimate of a scheduling pass crosses ``jit_above_cost``
and PostgreSQL spent 32 to 55 ms compiling a statement that runs in 1 ms, on every pass. The
DSN's own ``options`` come after it, so an operator may turn JIT back on."""


def session_dsn(dsn: str, timeouts: Timeouts) -> str:
    """``dsn`` with :data:`NO_JIT` and the session settings of ``timeouts`` added to its
    ``options``, and :data:`TCP_KEEPALIVES` where it names none."""
    given = parse_dsn(dsn)
    keepalives = {key: value for key, value in TCP_KEEPALIVES.items() if key not in given}
    options = f"{NO_JIT} {given.get('options', '')} {timeouts.options()}"
    return make_dsn(dsn, options=" ".join(options.split()), **keepalives)


# SQLSTATEs of errors (psycopg2 makes them OperationalError) after which the
# connection is still usable: a statement cancelled (statement_timeout), a lock
# not obtained (lock_timeout), a serialization failure or a deadlock.
_CONNECTION_SURVIVES = frozenset({"57014", "55P03", "40001", "40P01"})


def unavailable(error: BaseException | Failure) -> bool:
    """Whether ``error`` means the database is unavailable (down, unreachable,
    restarting, a connection lost or a statement timed out), not a bug."""
    if isinstance(error, Failure):
        error = error.value
    return isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError,
                              reconnection.ConnectionDead, txpostgres.RollbackFailed,
                              DatabaseUnavailable))


def _dead(failure: Failure) -> bool:
    """Whether a failure on a connection means the connection is gone."""
    if failure.check(psycopg2.OperationalError):
        return getattr(failure.value, "pgcode", None) not in _CONNECTION_SURVIVES
    return bool(failure.check(psycopg2.InterfaceError, txpostgres.RollbackFailed,
                              ConnectionLost, ConnectionDone))


def _reconnect_delays() -> Iterator[float]:
    """At once, then after 0.1 s, growing to :data:`RECONNECT_MAX`, until stopped."""
    yield 0.0
    delay = 0.1
    while True:
        yield delay
        delay = min(delay * 2, RECONNECT_MAX)


class _Detector(reconnection.DeadConnectionDetector):
    """txpostgres' reconnection with our death check and delays, that can be stopped."""

    log = Logger()

    def __init__(self, reactor: Any):
        super().__init__(deathChecker=_dead, reconnectionIterator=_reconnect_delays,
                         reactor=reactor)
        self.stopped = False

    def startReconnecting(self, f: Failure) -> None:
        if self.stopped:
            return
        retry = retrying.RetryingCall(self.reconnect)
        retry.reactor = self.reactor
        d = retry.start(self.reconnectionIterator())

        def reconnected(_: object) -> Any:
            if self.stopped:
                self._close()
                return None
            return self.connectionRecovered()

        def failed(failure: Failure) -> None:
            if not self.stopped:
                self.log.failure("Database reconnection gave up", failure)

        d.addCallback(reconnected).addErrback(failed)

    def reconnect(self) -> Any:
        if self.stopped:
            raise DatabaseUnavailable("stopped")  # ends the retries
        return super().reconnect()

    def _close(self) -> None:
        try:
            self.reconnectable.close()
        except Exception:
            pass

    def stop(self) -> None:
        """Stop reconnecting, and close the connection."""
        self.stopped = True
        if self.reconnectable is not None:
            self._close()


class _Connection(txpostgres.Connection):
    """A txpostgres connection that reports a server closing it as a lost connection.

    Idle connections watch their socket (for notifications), so they notice at
    once when the server goes away, and reconnect; txpostgres would also have
    the reactor log a traceback for it.
    """

    _log = Logger()

    def doRead(self) -> Any:
        try:
            super().doRead()
        except psycopg2.Error as e:
            return ConnectionLost(str(e).strip().splitlines()[0] if str(e).strip() else "")
        except ValueError:
            # libpq closed the socket (the server shut down) before psycopg2 marked the
            # connection closed, and txpostgres watched it again: its fileno is now -1.
            if not self._socket_gone():
                raise
            return ConnectionLost("the server closed the connection")
        return None

    begin_pending = False
    """An interaction has begun and sent nothing yet: its first statement carries the
    ``BEGIN`` (:class:`_Cursor`), which saves a round trip per transaction."""

    def cursor(self) -> txpostgres.Cursor:
        return _Cursor(self._connection.cursor(), self)

    def _runInteraction(self, interaction: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """txpostgres's, except that ``BEGIN`` travels with the first statement, a
        transaction that sent nothing sends no ``COMMIT``, and a rollback failing on a
        connection that is gone (the server shut down mid-transaction) is no traceback:
        the caller gets ``RollbackFailed`` (an outage, see :func:`unavailable`) and the
        pool reconnects."""
        c = self.cursor()
        self.begin_pending = True

        def commit(ret: Any) -> Any:
            if self.begin_pending:  # nothing was sent: there is no transaction
                self.begin_pending = False
                return ret
            return c.execute("commit").addCallback(lambda _: ret)

        def rollback(f: Failure) -> Any:
            if self.begin_pending:
                self.begin_pending = False
                return f
            e = maybeDeferred(c.execute, "rollback")

            def failed(rf: Failure) -> Failure:
                if not _dead(rf):  # a connection gone (then replaced) is no news
                    self._log.failure("Rollback failed", rf)
                return Failure(txpostgres.RollbackFailed(self, f))

            return e.addCallbacks(lambda _: f, failed)

        d = maybeDeferred(interaction, c, *args, **kwargs)
        return d.addCallback(commit).addErrback(rollback)

    def tuple_cursor(self) -> txpostgres.Cursor:
        """A cursor of this connection whose rows are plain tuples (the pool's give dicts)."""
        return _Cursor(self._connection.cursor(cursor_factory=psycopg2.extensions.cursor), self)

    def _socket_gone(self) -> bool:
        try:
            return self.fileno() < 0
        except Exception:
            return True


class _Cursor(txpostgres.Cursor):
    """A txpostgres cursor whose first statement in a transaction begins it
    (``BEGIN; …`` in one round trip: the results are the last statement's)."""

    def execute(self, query: str, params: Any = None) -> Deferred[Any]:
        connection = self._connection
        if getattr(connection, "begin_pending", False):
            connection.begin_pending = False
            query = "BEGIN; " + query
        return super().execute(query, params)


class Cursor:
    """What an interaction function receives: ``await cur.execute(...)``."""

    def __init__(self, cursor: txpostgres.Cursor):
        self._cursor = cursor
        self._tuples: txpostgres.Cursor | None = None
        self.notes: list[tuple[str, Any]] = []
        """What the transaction did, for :attr:`Pool.on_commit` once it commits."""

    def note(self, kind: str, value: Any) -> None:
        """Record a fact to report once (and only if) the transaction commits."""
        self.notes.append((kind, value))

    async def execute(self, sql: str, params: Any = None) -> None:
        await self._cursor.execute(sql, params)

    async def fetchall(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        await self._cursor.execute(sql, params)
        return self._cursor.fetchall()

    async def fetchone(self, sql: str, params: Any = None) -> dict[str, Any] | None:
        await self._cursor.execute(sql, params)
        return self._cursor.fetchone()

    async def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Like :meth:`fetchall`, in the same transaction, as plain tuples: no dict
        is built per row (for reads of many rows on the reactor thread)."""
        if self._tuples is None:
            self._tuples = self._cursor._connection.tuple_cursor()
        await self._tuples.execute(sql, params)
        return self._tuples.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount


def _cooperator(reactor: IReactorTime) -> Cooperator:
    return Cooperator(scheduler=lambda work: reactor.callLater(0, work))


def shielded(d: Deferred[T]) -> Deferred[T]:
    """``d``, except that cancelling the result does not cancel ``d``.

    A web request whose client hangs up is cancelled; cancelling a running
    txpostgres query would cancel it on the server and can break the pooled
    connection, and a transaction half-way should finish (commit or roll
    back) on its own. The caller stops waiting; the query completes. A
    ``CancelledError`` out of ``d`` itself (the server cancelled the statement)
    becomes :class:`StatementCancelled`.
    """
    result: Deferred[T] = Deferred()

    def forward(outcome: Any) -> None:
        if not result.called:
            result.callback(outcome)

    d.addErrback(_server_cancelled).addBoth(forward)
    return result


class _TxPool(txpostgres.ConnectionPool):
    """txpostgres' pool with our reactor and quickly reconnecting connections.

    A query takes a connection that is alive when there is one.
    """

    def __init__(self, reactor: Any, dsn: str, size: int):
        self.reactor = reactor
        self.cooperator = _cooperator(reactor)
        self.everyone: list[txpostgres.Connection] = []
        super().__init__(None, dsn, min=size, cursor_factory=psycopg2.extras.RealDictCursor)

    def connectionFactory(self, reactor: Any, cooperator: Any) -> txpostgres.Connection:
        conn = _Connection(reactor, cooperator, detector=_Detector(reactor))
        self.everyone.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.everyone:  # idle or busy
            conn.detector.stop()

    def _take(self) -> txpostgres.Connection:
        for conn in self.connections:
            if not conn.detector.connectionIsDead:
                self.connections.remove(conn)
                return conn
        return self.connections.pop()

    def _runQuery(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        c = self._take()
        return c.runQuery(*args, **kwargs).addBoth(self._putBackAndPassthrough, c)

    def runUrgentQuery(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """``runQuery``, ahead of every statement waiting for a connection."""
        semaphore = self._semaphore
        turn = semaphore.acquire()
        if not turn.called:  # queued last: go first
            semaphore.waiting.remove(turn)
            semaphore.waiting.insert(0, turn)
        turn.addCallback(lambda _: self._runQuery(*args, **kwargs))
        return turn.addBoth(semaphore._releaseAndReturn)

    def _runOperation(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        c = self._take()
        return c.runOperation(*args, **kwargs).addBoth(self._putBackAndPassthrough, c)

    def _runInteraction(self, interaction: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        c = self._take()
        return c.runInteraction(interaction, *args, **kwargs).addBoth(
            self._putBackAndPassthrough, c)


class Pool:
    """A fixed-size pool of asynchronous connections to one database."""

    log = Logger()

    def __init__(self, reactor: Any, dsn: str, size: int = 4,
                 timeouts: Timeouts | None = None):
        self.reactor = reactor
        self.dsn = dsn
        self.size = size
        self.timeouts = timeouts or Timeouts()
        self._pool: _TxPool | None = None
        self.on_commit: Callable[[list[tuple[str, Any]]], None] | None = None
        """Called with a committed transaction's :meth:`Cursor.note` facts (metrics)."""
        self.answered_at: float | None = None
        """Reactor time of the last statement the database answered."""
        self.failed_at: float | None = None
        """Reactor time of the last statement that failed for want of the database."""

    async def start(self) -> None:
        pool = _TxPool(self.reactor, session_dsn(self.dsn, self.timeouts), self.size)
        await pool.start()
        self._pool = pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def answered_within(self, seconds: float) -> bool:
        """Whether the database answered a statement in the last ``seconds``, and none
        failed for want of it since: then it is reachable without asking again (a
        health check must not wait in the queue of a pool busy with real work)."""
        answered = self.answered_at
        return (answered is not None and self.reactor.seconds() - answered <= seconds
                and (self.failed_at is None or self.failed_at < answered))

    def _require(self) -> _TxPool:
        if self._pool is None:
            raise DatabaseUnavailable("the database pool is not connected")
        return self._pool

    async def _run(self, call: Callable[[_TxPool], Deferred[T]]) -> T:
        """``call(pool)``, again while it lands on a connection that is still
        reconnecting although another is back (nothing was sent on it)."""
        waited = 0.0
        while True:
            try:
                pool = self._require()
                result = await shielded(call(pool))
            except reconnection.ConnectionDead:
                self.failed_at = self.reactor.seconds()
                if waited >= 2 * RECONNECT_MAX or not any(
                        not conn.detector.connectionIsDead for conn in pool.everyone):
                    raise
            except CancelledError:
                raise  # Not an answer either way.
            except Exception as e:
                if unavailable(e):
                    self.failed_at = self.reactor.seconds()
                else:  # The database answered (an error of the statement's own).
                    self.answered_at = self.reactor.seconds()
                raise
            else:
                self.answered_at = self.reactor.seconds()
                return result
            await deferLater(self.reactor, 0.05, lambda: None)
            waited += 0.05

    async def fetchall(self, sql: str, params: Any = None, *,
                       urgent: bool = False) -> list[dict[str, Any]]:
        """The rows of ``sql``; ``urgent``: ahead of the statements waiting for a
        connection (a failover's link registrations, behind which every handshake
        waits, before the reconciliations of the links already made)."""
        if urgent:
            return await self._run(lambda pool: pool.runUrgentQuery(sql, params))
        return await self._run(lambda pool: pool.runQuery(sql, params))

    async def fetchone(self, sql: str, params: Any = None) -> dict[str, Any] | None:
        rows = await self._run(lambda pool: pool.runQuery(sql, params))
        return rows[0] if rows else None

    async def execute(self, sql: str, params: Any = None) -> None:
        await self._run(lambda pool: pool.runOperation(sql, params))

    async def transaction(self, fn: Callable[[Cursor], Awaitable[T]]) -> T:
        """Run ``fn(cursor)`` in one transaction; commit on return, roll back on error."""

        cursors: list[Cursor] = []

        def interaction(cur: txpostgres.Cursor) -> Deferred[T]:
            cursor = Cursor(cur)
            cursors[:] = [cursor]  # a retried interaction starts afresh
            return Deferred.fromCoroutine(fn(cursor))

        result = await self._run(lambda pool: pool.runInteraction(interaction))
        if self.on_commit is not None and cursors and cursors[0].notes:
            self.on_commit(cursors[0].notes)
        return result


def migrations() -> list[tuple[int, str, str]]:
    """The packaged migrations, as ``(version, name, sql)`` in order."""
    found = []
    for entry in importlib.resources.files("treadmill.switchboard.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    # Numbers are handed out to parallel branches, so a gap may stay open for a while.
    if len(set(versions)) != len(versions) or versions[:1] not in ([], [1]):
        raise RuntimeError(f"migrations are not numbered uniquely from 1: {versions}")
    return found


async def migrate(pool: Pool) -> list[str]:
    """Apply every migration not yet applied; return the names applied."""
    log = Logger(namespace="treadmill.switchboard.database")

    async def apply(cur: Cursor) -> list[str]:
        # Migrations may be slow, and wait for another instance's.
        await cur.execute("SET LOCAL statement_timeout = 0")
        await cur.execute("SET LOCAL lock_timeout = 0")
        await cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())")
        rows = await cur.fetchall("SELECT version FROM schema_migrations")
        done = {row["version"] for row in rows}
        applied = []
        for version, name, sql in migrations():
            if version in done:
                continue
            await cur.execute(sql)
            await cur.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                              (version, name))
            applied.append(name)
        return applied

    applied = await pool.transaction(apply)
    for name in applied:
        log.info("Applied migration {name}", name=name)
    return applied


async def pending_migrations(pool: Pool) -> list[str]:
    """The names of the packaged migrations not yet applied, in order; applies nothing."""
    row = await pool.fetchone("SELECT to_regclass('schema_migrations') IS NOT NULL AS present")
    done = set()
    if row and row["present"]:
        done = {r["version"] for r in await pool.fetchall("SELECT version FROM schema_migrations")}
    return [name for version, name, _ in migrations() if version not in done]


class Listener(Service):
    """A dedicated connection that LISTENs on channels and reconnects.

    ``observe(channel, fn)`` calls ``fn(payload)`` for every notification on
    ``channel``. After a reconnect every ``on_reconnect`` callback runs, since
    notifications sent while the connection was down are lost: observers
    must then re-read the state they follow.
    """

    log = Logger()

    def __init__(self, reactor: Any, dsn: str, timeouts: Timeouts | None = None):
        self.reactor = reactor
        self.dsn = session_dsn(dsn, timeouts or Timeouts())
        self._observers: dict[str, list[Callable[[str], object]]] = {}
        self._on_reconnect: list[Callable[[], object]] = []
        self._conn: txpostgres.Connection | None = None
        self._started: Deferred[None] | None = None

    def observe(self, channel: str, fn: Callable[[str], object]) -> None:
        self._observers.setdefault(channel, []).append(fn)

    def on_reconnect(self, fn: Callable[[], object]) -> None:
        self._on_reconnect.append(fn)

    def _notify(self, notify: Any) -> None:
        for fn in list(self._observers.get(notify.channel, ())):
            try:
                fn(notify.payload)
            except Exception:
                self.log.failure("Notification observer failed on {channel}",
                                 channel=notify.channel)

    def _listen_all(self) -> Deferred[Any]:
        assert self._conn is not None
        return DeferredList([
            self._conn.runOperation(f'LISTEN "{channel}"') for channel in self._observers
        ], fireOnOneErrback=True, consumeErrors=True)

    def _recovered(self) -> Deferred[Any]:
        self.log.info("Database LISTEN connection recovered")
        d = self._listen_all()

        def reconnected(_: object) -> None:
            for fn in self._on_reconnect:
                try:
                    fn()
                except Exception:
                    self.log.failure("Reconnect observer failed")

        return d.addCallback(reconnected)

    def startService(self) -> None:
        super().startService()
        self._started = Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        detector = _Detector(self.reactor)
        conn = _Connection(self.reactor, _cooperator(self.reactor), detector=detector)
        self._conn = conn
        conn.addNotifyObserver(self._notify)
        detector.addRecoveryHandler(self._recovered)
        try:
            await conn.connect(self.dsn)
        except psycopg2.Error as e:
            self.log.warn("Database LISTEN connection failed: {error}; retrying", error=e)
            detector.checkForDeadConnection(Failure(e))
            return
        await self._listen_all()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._conn is not None:
            self._conn.detector.stop()
            self._conn = None
        return succeed(None)

    def ready(self) -> Deferred[None]:
        """Fires once the first LISTEN is in place."""
        return self._started if self._started is not None else succeed(None)

