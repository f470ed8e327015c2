"""``treadmill-switchboard-migrate``: the dry run lists and changes nothing, the real
run applies, both as the least-privileged role docs/install.md creates."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from treadmill.dev.pgcluster import drop_database
from treadmill.switchboard.database import migrations


@pytest.fixture
def owner_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A database owned by a new role with no other right (no superuser, no
    CREATEDB, no CREATEROLE), as docs/install.md sets it up; the DSN acts as it."""
    suffix = uuid.uuid4().hex[:10]
    role, dbname = f"tm_sb_{suffix}", f"tm_db_{suffix}"
    conn = psycopg2.connect(pg_admin_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE").format(
            sql.Identifier(role)))
        cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(dbname), sql.Identifier(role)))
    try:
        # The test cluster only knows peer logins as postgres: become the role at once.
        yield make_dsn(pg_admin_dsn, dbname=dbname, options=f"-c role={role}")
    finally:
        drop_database(pg_admin_dsn, dbname)
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        conn.close()


def run(dsn: str, *flags: str) -> subprocess.CompletedProcess[str]:
    # --database-dsn carries no password here: the test cluster uses peer logins.
    return subprocess.run(
        [sys.executable, "-m", "treadmill.switchboard.migrate", "--database-dsn", dsn, *flags],
        capture_output=True, text=True, timeout=60, check=False)


def tables(dsn: str) -> set[str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {row[0] for row in cur.fetchall()}


def test_dry_run_then_apply_as_database_owner(owner_dsn: str) -> None:
    names = [name for _, name, _ in migrations()]
    with psycopg2.connect(owner_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT rolsuper, rolcreatedb FROM pg_roles WHERE rolname = current_user")
        assert cur.fetchone() == (False, False)

    dry = run(owner_dsn, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [f"pending {name}" for name in names]
    assert tables(owner_dsn) == set()  # not even schema_migrations
    assert run(owner_dsn, "--dry-run", "--check").returncode == 1

    applied = run(owner_dsn)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == [f"applied {name}" for name in names]
    assert {"schema_migrations", "users", "jobs"} <= tables(owner_dsn)

    again = run(owner_dsn, "--dry-run", "--check")
    assert (again.returncode, again.stdout) == (0, "nothing pending\n")
    assert run(owner_dsn).stdout == "nothing to apply\n"


def test_dry_run_lists_only_what_is_missing(owner_dsn: str) -> None:
    assert run(owner_dsn).returncode == 0
    last = migrations()[-1]
    with psycopg2.connect(owner_dsn) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM schema_migrations WHERE version = %s", (last[0],))
    dry = run(owner_dsn, "--dry-run")
    assert dry.stdout.splitlines() == [f"pending {last[1]}"]
    with psycopg2.connect(owner_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM schema_migrations")
        assert cur.fetchone() == (len(migrations()) - 1,)


def test_bad_usage_is_a_clear_error(tmp_path) -> None:
    check_alone = run("dbname=x", "--check")
    assert check_alone.returncode == 2 and "--check needs --dry-run" in check_alone.stderr
    bad = tmp_path / "switchboard.toml"
    bad.write_text("[database]\ndsn = 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "treadmill.switchboard.migrate", "--config", str(bad)],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and result.stderr.startswith("migrate: ")
    assert "Traceback" not in result.stderr
