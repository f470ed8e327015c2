"""A database outage for one test (the fixture ``outage``): its database refuses connections
and loses its sessions.

``ALTER DATABASE … ALLOW_CONNECTIONS false`` and ``pg_terminate_backend`` on the
test's own database only, from an administrative connection (in a thread, off the
reactor), so other tests and the session's cluster are untouched. To a client this
is what a restarting or unreachable server looks like: established sessions are
cut and new connections are refused with an ``OperationalError``.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import pytest
import pytest_twisted
from psycopg2 import sql
from psycopg2.extensions import parse_dsn
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread


class Outage:
    """Make the database of ``dsn`` unavailable (:meth:`begin`) and back (:meth:`end`)."""

    def __init__(self, admin_dsn: str, dsn: str):
        self.admin_dsn = admin_dsn
        self.name = parse_dsn(dsn)["dbname"]
        self.active = False

    def _run(self, allow: bool) -> None:
        conn = psycopg2.connect(self.admin_dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                    sql.Identifier(self.name), sql.SQL("true" if allow else "false")))
                if not allow:
                    self.terminate(cur)
        finally:
            conn.close()

    def terminate(self, cur: psycopg2.extensions.cursor) -> None:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()", (self.name,))

    async def begin(self) -> None:
        """Cut every session of the database and refuse new ones."""
        self.active = True
        await deferToThread(self._run, False)

    async def end(self) -> None:
        """Accept connections again."""
        await deferToThread(self._run, True)
        self.active = False

    async def cut(self) -> None:
        """Only cut the sessions (a server restart between two queries)."""

        def run() -> None:
            conn = psycopg2.connect(self.admin_dsn)
            try:
                conn.autocommit = True
                with conn.cursor() as cur:
                    self.terminate(cur)
            finally:
                conn.close()

        await deferToThread(run)


@pytest.fixture
def outage(pg_admin_dsn: str, database: str) -> Iterator[Outage]:
    """An :class:`Outage` of the test's ``database``, ended after the test if it is on."""
    outage = Outage(pg_admin_dsn, database)
    yield outage
    if outage.active:
        pytest_twisted.blockon(Deferred.fromCoroutine(outage.end()))
