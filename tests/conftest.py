"""Fixtures shared by every test (a real PostgreSQL, a real switchboard), and the tiers.

PostgreSQL is an ephemeral cluster started once per session (so once per
pytest-xdist worker) from the system's server binaries (UNIX socket only),
unless ``TREADMILL_TEST_DSN`` names a server whose role may create databases.
Each test that asks for ``database`` gets a fresh, empty database of its own;
``migrated_database`` is a fresh database with every migration applied (a copy
of one migrated once per session), which is what the ``switchboard`` fixtures
start on. Every test gets a tier marker here (``unit``, ``integration``,
``e2e``; see ``tier_of``).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
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


@pytest.fixture(scope="session")
def migrated_template(pg_admin_dsn: str) -> Iterator[str]:
    """The name of a database with every migration applied (by the migration command),
    copied by ``migrated_database``; nothing connects to it afterwards."""
    name = f"treadmill_template_{uuid.uuid4().hex[:12]}"
    create_database(pg_admin_dsn, name)
    try:
        subprocess.run([sys.executable, "-m", "treadmill.switchboard.migrate",
                        "--database-dsn", make_dsn(pg_admin_dsn, dbname=name)],
                       check=True, capture_output=True, timeout=120)
        yield name
    finally:
        drop_database(pg_admin_dsn, name)


@contextmanager
def _migrated(pg_admin_dsn: str, template: str) -> Iterator[str]:
    name = f"treadmill_test_{uuid.uuid4().hex[:12]}"
    create_database(pg_admin_dsn, name, template=template)
    try:
        yield make_dsn(pg_admin_dsn, dbname=name)
    finally:
        drop_database(pg_admin_dsn, name)


@pytest.fixture
def migrated_database(pg_admin_dsn: str, migrated_template: str) -> Iterator[str]:
    """The DSN of a new database with every migration applied, dropped after the test."""
    with _migrated(pg_admin_dsn, migrated_template) as dsn:
        yield dsn


@pytest_twisted.async_yield_fixture
async def switchboard(migrated_database: str, tmp_path) -> AsyncIterator[RunningSwitchboard]:
    """A switchboard in this process on a loopback port, with an admin user."""
    running = await start_switchboard(migrated_database, tmp_path)
    try:
        yield running
    finally:
        await running.stop()


@pytest_twisted.async_yield_fixture(scope="module")
async def module_switchboard(pg_admin_dsn: str, migrated_template: str,
                             tmp_path_factory: pytest.TempPathFactory,
                             ) -> AsyncIterator[RunningSwitchboard]:
    """One switchboard shared by a module's tests, for tests that leave no state another
    test of the module could see (fresh names, their own users)."""
    with _migrated(pg_admin_dsn, migrated_template) as dsn:
        running = await start_switchboard(dsn, tmp_path_factory.mktemp("switchboard"))
        try:
            yield running
        finally:
            await running.stop()


# -- tiers ---------------------------------------------------------------------------------
# Every test gets one tier marker, by rule, in this order:
#   1. a tier marker the test or its module sets itself;
#   2. ``e2e``: the files below (several real roles, twistd processes, QEMU, a package
#      install, external tools);
#   3. ``integration``: a test that runs on the real reactor (an async test or fixture:
#      loopback sockets, timers) or uses PostgreSQL;
#   4. ``unit``: any other plain function (pure logic, ``Clock``, ``MemoryReactorClock``).
# A test none of these reach fails the collection.

TIERS = ("unit", "integration", "e2e")
E2E_FILES = (
    "tests/test_chaos.py", "tests/test_devstack.py", "tests/test_e2e_*.py",
    "tests/test_install_wheel.py", "tests/test_light_client.py", "tests/test_metrics_names.py",
    "tests/test_pgcluster.py", "tests/test_systemd_units.py",
    "tests/*/test_daemon.py", "tests/*/test_e2e_*.py", "tests/*/test_*_e2e.py",
    "tests/imagestore/test_skopeo.py", "tests/supervisor/test_fleet.py",
    "tests/supervisor/qemu/test_boot.py", "tests/supervisor/qemu/test_results.py",
    "tests/supervisor/qemu/test_service.py", "tests/supervisor/qemu/test_snapshot.py",
    "tests/supervisor/qemu/test_ssh.py", "tests/supervisor/serial/test_serial_results.py",
)
LONGEST_FIRST = (
    "tests/test_devstack.py", "tests/test_chaos.py", "tests/supervisor/qemu/test_service.py",
    "tests/test_install_wheel.py", "tests/web/test_console_browser.py",
    "tests/supervisor/qemu/test_boot.py", "tests/web/test_console_hosts_browser.py",
)
"""The longest files (CONTRIBUTING.md, "Where the time goes"), handed out before the rest."""
POSTGRES_FIXTURES = {"pg_admin_dsn", "database", "migrated_database", "migrated_template",
                     "switchboard", "module_switchboard"}
_REACTOR_MARKS = {"async_test", "inline_callbacks_test", "async_fixture", "async_yield_fixture"}
_ROOT = Path(__file__).resolve().parent.parent


def tier_of(item: pytest.Item) -> str | None:
    """The tier the rules above give ``item``, or None."""
    given = [m.name for m in item.iter_markers() if m.name in TIERS]
    if given:
        return given[0]
    path = item.path.resolve().relative_to(_ROOT).as_posix()
    if any(fnmatch.fnmatch(path, pattern) for pattern in E2E_FILES):
        return "e2e"
    function = getattr(item, "obj", None)
    if function is None or not callable(function):
        return None
    fixtures = set(getattr(item, "fixturenames", ()))
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    on_reactor = getattr(function, "_pytest_twisted_mark", None) in _REACTOR_MARKS or any(
        getattr(d.func, "_pytest_twisted_mark", None) in _REACTOR_MARKS
        for ds in defs.values() for d in ds)
    if on_reactor or fixtures & POSTGRES_FIXTURES:
        return "integration"
    return "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    untiered = []
    for item in items:
        tier = tier_of(item)
        if tier is None:
            untiered.append(item.nodeid)
        elif not any(m.name == tier for m in item.iter_markers()):
            item.add_marker(tier)
    if untiered:
        raise pytest.UsageError("tests without a tier (see tests/conftest.py): "
                                + ", ".join(untiered[:10]))
    if hasattr(config, "workerinput"):
        # Under pytest-xdist (tools/test), the slow tiers first, so that the long files do
        # not end the run on one worker while the other idles; a file's tests stay together.
        # The longest files of all go first of all.
        rank = {"e2e": 0, "integration": 1, "unit": 2}
        by_file: dict[Path, tuple[int, int]] = {}
        for item in items:
            path = item.path.resolve().relative_to(_ROOT).as_posix()
            first = (-1, LONGEST_FIRST.index(path)) if path in LONGEST_FIRST else (3, 0)
            by_file[item.path] = min(by_file.get(item.path, first),
                                     (rank[tier_of(item) or "unit"], 0), first)
        items.sort(key=lambda item: by_file[item.path])
