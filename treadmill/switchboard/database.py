"""PostgreSQL plumbing: the connection pool, migrations and LISTEN.

Every query of the switchboard goes through one txpostgres
:class:`ConnectionPool`; the SQL itself lives in :mod:`treadmill.switchboard.store`.
Schema changes are versioned ``.sql`` files in ``migrations/``, applied at
start in one transaction under an advisory lock, so two switchboards starting
at once apply each migration exactly once.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg2
import psycopg2.extras
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from txpostgres import reconnection, txpostgres

T = TypeVar("T")

# pg_advisory_xact_lock key for migrations: "treadmil" in ASCII.
MIGRATION_LOCK = 0x74726561646D696C

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class Cursor:
    """What an interaction function receives: ``await cur.execute(...)``."""

    def __init__(self, cursor: txpostgres.Cursor):
        self._cursor = cursor

    async def execute(self, sql: str, params: Any = None) -> None:
        await self._cursor.execute(sql, params)

    async def fetchall(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        await self._cursor.execute(sql, params)
        return self._cursor.fetchall()

    async def fetchone(self, sql: str, params: Any = None) -> dict[str, Any] | None:
        await self._cursor.execute(sql, params)
        return self._cursor.fetchone()

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
    back) on its own. The caller stops waiting; the query completes.
    """
    result: Deferred[T] = Deferred()

    def forward(outcome: Any) -> None:
        if not result.called:
            result.callback(outcome)

    d.addBoth(forward)
    return result


class _TxPool(txpostgres.ConnectionPool):
    """txpostgres' pool with our reactor and reconnecting connections."""

    def __init__(self, reactor: Any, dsn: str, size: int):
        self.reactor = reactor
        self.cooperator = _cooperator(reactor)
        super().__init__(None, dsn, min=size, cursor_factory=psycopg2.extras.RealDictCursor)

    def connectionFactory(self, reactor: Any, cooperator: Any) -> txpostgres.Connection:
        detector = reconnection.DeadConnectionDetector(reactor=reactor)
        return txpostgres.Connection(reactor, cooperator, detector=detector)


class Pool:
    """A fixed-size pool of asynchronous connections to one database."""

    log = Logger()

    def __init__(self, reactor: Any, dsn: str, size: int = 4):
        self.reactor = reactor
        self.dsn = dsn
        self.size = size
        self._pool: _TxPool | None = None

    async def start(self) -> None:
        pool = _TxPool(self.reactor, self.dsn, self.size)
        await pool.start()
        self._pool = pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _require(self) -> _TxPool:
        if self._pool is None:
            raise RuntimeError("the database pool is not started")
        return self._pool

    async def fetchall(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        return await shielded(self._require().runQuery(sql, params))

    async def fetchone(self, sql: str, params: Any = None) -> dict[str, Any] | None:
        rows = await shielded(self._require().runQuery(sql, params))
        return rows[0] if rows else None

    async def execute(self, sql: str, params: Any = None) -> None:
        await shielded(self._require().runOperation(sql, params))

    async def transaction(self, fn: Callable[[Cursor], Awaitable[T]]) -> T:
        """Run ``fn(cursor)`` in one transaction; commit on return, roll back on error."""

        def interaction(cur: txpostgres.Cursor) -> Deferred[T]:
            return Deferred.fromCoroutine(fn(Cursor(cur)))

        return await shielded(self._require().runInteraction(interaction))


def migrations() -> list[tuple[int, str, str]]:
    """The packaged migrations, as ``(version, name, sql)`` in order."""
    found = []
    for entry in importlib.resources.files("treadmill.switchboard.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    # Numbers are handed out to parallel branches: a gap is fine, a duplicate is not.
    if len(set(versions)) != len(versions) or (versions and versions[0] < 1):
        raise RuntimeError(f"migrations are not numbered uniquely from 1: {versions}")
    return found


async def migrate(pool: Pool) -> list[str]:
    """Apply every migration not yet applied; return the names applied."""
    log = Logger(namespace="treadmill.switchboard.database")

    async def apply(cur: Cursor) -> list[str]:
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


class Listener(Service):
    """A dedicated connection that LISTENs on channels and reconnects.

    ``observe(channel, fn)`` calls ``fn(payload)`` for every notification on
    ``channel``. After a reconnect every ``on_reconnect`` callback runs, since
    notifications sent while the connection was down are lost: observers
    must then re-read the state they follow.
    """

    log = Logger()

    def __init__(self, reactor: Any, dsn: str):
        self.reactor = reactor
        self.dsn = dsn
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
        detector = reconnection.DeadConnectionDetector(reactor=self.reactor)
        conn = txpostgres.Connection(self.reactor, _cooperator(self.reactor), detector=detector)
        self._conn = conn
        conn.addNotifyObserver(self._notify)
        detector.addRecoveryHandler(self._recovered)
        try:
            await conn.connect(self.dsn)
        except psycopg2.Error as e:
            self.log.warn("Database LISTEN connection failed: {error}; retrying", error=e)
            detector.checkForDeadConnection(_failure(e))
            return
        await self._listen_all()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None
        return succeed(None)

    def ready(self) -> Deferred[None]:
        """Fires once the first LISTEN is in place."""
        return self._started if self._started is not None else succeed(None)


def _failure(e: BaseException) -> Any:
    from twisted.python.failure import Failure

    return Failure(e)
