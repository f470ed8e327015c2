"""The private PostgreSQL cluster is its owner's alone (the tests' session cluster).

Another local account must not connect, over the socket or TCP, under any role;
the cluster's files are not readable by others. Tests that need a second local
account run only as root (they use ``nobody``).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from psycopg2.extensions import parse_dsn

from treadmill.dev.pgcluster import find_bindir

OTHER = "nobody"


@pytest.fixture(scope="module")
def cluster_run(pg_admin_dsn: str) -> Path:
    if os.environ.get("TREADMILL_TEST_DSN"):
        pytest.skip("TREADMILL_TEST_DSN names a server these tests did not set up")
    return Path(parse_dsn(pg_admin_dsn)["host"])


def as_other(*argv: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("needs root to act as another local user")
    return subprocess.run(["runuser", "-u", OTHER, "--", *argv], capture_output=True,
                          text=True, timeout=30, check=False)


def psql_as_other(dsn: str) -> subprocess.CompletedProcess[str]:
    return as_other(str(find_bindir() / "psql"), dsn, "-Atc", "SELECT 'connected'")


def test_the_owner_connects(pg_admin_dsn: str, cluster_run: Path) -> None:
    conn = psycopg2.connect(pg_admin_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('listen_addresses'), "
                        "current_setting('unix_socket_permissions'), "
                        "(SELECT array_agg(auth_method) FROM pg_hba_file_rules)")
            listen, mode, methods = cur.fetchone()
    finally:
        conn.close()
    assert (listen, mode) == ("", "0700")
    assert methods == ["peer"]


@pytest.mark.parametrize("role", ["postgres", OTHER, "treadmill"])
def test_another_local_user_cannot_connect(cluster_run: Path, pg_admin_dsn: str,
                                           role: str) -> None:
    port = parse_dsn(pg_admin_dsn).get("port", "5432")
    for dsn in (f"host={cluster_run} port={port} user={role} dbname=postgres",
                f"host=127.0.0.1 port={port} user={role} dbname=postgres connect_timeout=5",
                f"host=::1 port={port} user={role} dbname=postgres connect_timeout=5"):
        proc = psql_as_other(dsn)
        assert proc.returncode != 0 and "connected" not in proc.stdout, (dsn, proc)


def test_peer_authentication_refuses_another_user_who_reaches_the_socket(
        cluster_run: Path, pg_admin_dsn: str) -> None:
    """Even with the socket's directory opened up, peer authentication says no."""
    socket = next(cluster_run.glob(".s.PGSQL.*"))
    port = socket.name.rsplit(".", 1)[1]
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in (
        cluster_run.parent, cluster_run, socket)}
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another local user")
    try:
        for path in modes:
            os.chmod(path, 0o777)
        proc = psql_as_other(f"host={cluster_run} port={port} user=postgres dbname=postgres")
    finally:
        for path, mode in modes.items():
            os.chmod(path, mode)
    assert proc.returncode != 0 and "connected" not in proc.stdout
    assert "Peer authentication failed" in proc.stderr, proc.stderr


def _tree(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    yield root, root.lstat()
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            yield path, path.lstat()


def test_cluster_files_are_not_readable_by_others(cluster_run: Path) -> None:
    loose = [(str(path), oct(stat.S_IMODE(st.st_mode))) for path, st in _tree(cluster_run.parent)
             if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077]
    assert loose == []
    if os.geteuid() == 0:
        proc = as_other("ls", str(cluster_run.parent))
        assert proc.returncode != 0
        proc = as_other("cat", str(cluster_run.parent / "data" / "pg_hba.conf"))
        assert proc.returncode != 0
