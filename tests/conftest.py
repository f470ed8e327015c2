"""Fixtures shared by every test: a real PostgreSQL, a real switchboard.

PostgreSQL is an ephemeral cluster started once per session from the
system's server binaries (UNIX socket only), unless ``TREADMILL_TEST_DSN``
names a server whose role may create databases. Each test that asks for
``database`` gets a fresh database of its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from psycopg2.extensions import make_dsn

from tests.support import RunningSwitchboard, start_switchboard
from tests.wheels import build_wheel
from treadmill.dev.pgcluster import Cluster, create_database, drop_database


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout's wheel, built once for the tests that install it."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """A DSN with the right to create databases."""
    given = os.environ.get("TREADMILL_TEST_DSN")
    if given:
        yield given
        return
    root = tempfile.mkdtemp(prefix="treadmill-pg-")
    os.chmod(root, 0o711)  # The postgres user must reach its cluster; no one may list.
    cluster = Cluster(os.path.join(root, "pg"), durable=False)
    cluster.start()
    try:
        yield cluster.dsn()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def database(pg_admin_dsn: str) -> Iterator[str]:
    """The DSN of a new, empty database, dropped after the test."""
    name = f"treadmill_test_{uuid.uuid4().hex[:12]}"
    create_database(pg_admin_dsn, name)
    try:
        yield make_dsn(pg_admin_dsn, dbname=name)
    finally:
        drop_database(pg_admin_dsn, name)


@pytest_twisted.async_yield_fixture
async def switchboard(database: str, tmp_path) -> AsyncIterator[RunningSwitchboard]:
    """A switchboard in this process on a loopback port, with an admin user."""
    running = await start_switchboard(database, tmp_path)
    try:
        yield running
    finally:
        await running.stop()
