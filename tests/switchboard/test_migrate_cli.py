"""``treadmill-switchboard-migrate``: the dry run lists and changes nothing, the real
run applies, both as the least-privileged role docs/install.md creates."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from tests.util.pgroles import least_privileged_database
from treadmill.switchboard.database import migrations
from treadmill.switchboard.migrate import run_migrations


@pytest.fixture
def owner_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A database owned by a role with no other right (no superuser, no CREATEDB, no
    CREATEROLE), made by docs/install.md's SQL; the DSN acts as it."""
    with least_privileged_database(pg_admin_dsn) as dsn:
        yield dsn


async def cli(*flags: str) -> tuple[int, str, str]:
    """The command line in a child process: (exit status, stdout, stderr)."""
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "treadmill.switchboard.migrate", *flags], env=os.environ)
    return code, out.decode(), err.decode()


def tables(dsn: str) -> set[str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {row[0] for row in cur.fetchall()}


@pytest_twisted.ensureDeferred
async def test_dry_run_then_apply_as_database_owner(owner_dsn: str) -> None:
    names = [name for _, name, _ in migrations()]
    with psycopg2.connect(owner_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT rolsuper, rolcreatedb FROM pg_roles WHERE rolname = current_user")
        assert cur.fetchone() == (False, False)

    assert await run_migrations(reactor, owner_dsn, dry_run=True) == names
    code, out, err = await cli("--database-dsn", owner_dsn, "--dry-run", "--check")
    assert (code, out.splitlines()) == (1, [f"pending {name}" for name in names]), err
    assert tables(owner_dsn) == set()  # not even schema_migrations

    assert await run_migrations(reactor, owner_dsn, dry_run=False) == names
    assert {"schema_migrations", "users", "jobs"} <= tables(owner_dsn)
    assert await run_migrations(reactor, owner_dsn, dry_run=True) == []
    assert await run_migrations(reactor, owner_dsn, dry_run=False) == []
    assert await cli("--database-dsn", owner_dsn, "--dry-run", "--check") == \
        (0, "nothing pending\n", "")


@pytest_twisted.ensureDeferred
async def test_dry_run_lists_only_what_is_missing(owner_dsn: str) -> None:
    await run_migrations(reactor, owner_dsn, dry_run=False)
    last = migrations()[-1]
    with psycopg2.connect(owner_dsn) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM schema_migrations WHERE version = %s", (last[0],))
    assert await run_migrations(reactor, owner_dsn, dry_run=True) == [last[1]]
    with psycopg2.connect(owner_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM schema_migrations")
        assert cur.fetchone() == (len(migrations()) - 1,)


@pytest_twisted.ensureDeferred
async def test_bad_usage_is_a_clear_error(tmp_path) -> None:
    code, _, err = await cli("--database-dsn", "dbname=x", "--check")
    assert code == 2 and "--check needs --dry-run" in err
    bad = tmp_path / "switchboard.toml"
    bad.write_text("[database]\ndsn = 3\n")
    code, _, err = await cli("--config", str(bad))
    assert code == 2 and err.startswith("migrate: ") and "Traceback" not in err
