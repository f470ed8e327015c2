"""docs/install.md's install, checked: the built wheel, installed alone into a clean
virtual environment (no checkout on the path), carries every role's twistd plugin,
the console scripts and the packaged data, and dry-runs the migrations; it also
installs the units, example configurations and documentation the guide copies from
``/opt/treadmill/share`` (no checkout on the machine), and a site started by the
units' command lines from those files, as the guide's PostgreSQL role, runs a job."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from tests.util.certs import make_pki
from tests.util.metricnames import documented, scraped
from tests.util.pgroles import least_privileged_database
from tests.util.ports import free_port
from tests.util.units import TWISTD, parse, values
from tests.wheels import ROOT, new_venv, run
from treadmill.dev.pgcluster import drop_database
from treadmill.protocol import supervisor as protocol
from treadmill.switchboard.database import migrations

ROLES = ("switchboard", "imagestore", "logserver", "proxy", "supervisor")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory,
              built_wheel: Path) -> tuple[Path, Path]:
    """(the wheel, the virtual environment it is installed in), as /opt/treadmill."""
    base = tmp_path_factory.mktemp("install")
    venv = new_venv(base / "opt-treadmill")
    run(venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check",
        f"{built_wheel}[server]", cwd=base)
    # The step install.md prescribes after every install or upgrade.
    run(venv / "bin" / "python", "-c",
        "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))", cwd=base)
    return built_wheel, venv


def test_wheel_holds_every_packaged_file(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = subprocess.run(["git", "ls-files", "treadmill", "twisted/plugins"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.split()
    else:
        tracked = [str(p.relative_to(ROOT)) for d in ("treadmill", "twisted/plugins")
                   for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    # Every source and data file (schemas, migrations, plugins) the roles read at run time.
    assert sorted(set(tracked) - names) == []
    assert not [n for n in names if n.endswith("dropin.cache") or n.startswith("tests/")]


def test_installed_roles_console_scripts_and_migrations(installed: tuple[Path, Path],
                                                        database: str, tmp_path: Path) -> None:
    _, venv = installed
    bin_ = venv / "bin"
    where = run(bin_ / "python", "-c", "import treadmill; print(treadmill.__file__)",
                cwd=tmp_path).stdout.strip()
    assert where.startswith(str(venv)), where
    plugins = next((venv / "lib").glob("python3*/site-packages/twisted/plugins"))
    assert (plugins / "dropin.cache").exists()
    listed = run(bin_ / "twistd", "--help", cwd=tmp_path).stdout
    for role in ROLES:
        assert f"treadmill-{role}" in listed
        help_text = run(bin_ / "twistd", f"treadmill-{role}", "--help", cwd=tmp_path).stdout
        assert "--config" in help_text, (role, help_text)
    assert "usage" in run(bin_ / "tml", "--help", cwd=tmp_path).stdout.lower()
    # The web console's files, xterm.js included, are served from the installed package.
    served = run(bin_ / "python", "-c", "from treadmill.switchboard.web import Assets; "
                 "a = Assets(); print(a.root); print(*(len(a.get(p)[0]) for p in ("
                 "'index.html', 'app.js', 'pages/job.js', 'vendor/xterm/xterm.mjs', "
                 "'vendor/xterm/xterm.css')))", cwd=tmp_path).stdout.splitlines()
    assert served[0].startswith(str(venv)) and all(int(n) > 0 for n in served[1].split())

    dry = run(bin_ / "treadmill-switchboard-migrate", "--database-dsn", database, "--dry-run",
              cwd=tmp_path)
    assert dry.stdout.splitlines() == [f"pending {name}" for _, name, _ in migrations()]
    applied = run(bin_ / "treadmill-switchboard-migrate", "--database-dsn", database,
                  cwd=tmp_path)
    assert len(applied.stdout.splitlines()) == len(migrations())
    again = run(bin_ / "python", "-m", "treadmill.switchboard.migrate", "--database-dsn",
                database, "--dry-run", "--check", cwd=tmp_path)
    assert again.stdout == "nothing pending\n"


# The example configuration install.md copies for each unit (a supervisor unit's %i
# names /etc/treadmill/supervisor-%i.toml, written from the example of its kind).
EXAMPLE_OF_UNIT = {"treadmill-supervisor@.service": "supervisor-mock.toml",
                   "treadmill-supervisor-qemu@.service": "supervisor-qemu.toml",
                   "treadmill-supervisor-serial@.service": "supervisor-serial.toml"}


def _share(venv: Path) -> Path:
    return venv / "share" / "treadmill"


def test_installed_share_holds_units_configs_and_docs(installed: tuple[Path, Path]) -> None:
    """What install.md copies is under the environment's share/, the checkout's files."""
    _, venv = installed
    share = _share(venv)
    for source, target in ((ROOT / "systemd", share / "systemd"),
                           (ROOT / "etc" / "treadmill", share / "etc")):
        expected = sorted(p.name for p in source.iterdir())
        assert sorted(p.name for p in target.iterdir()) == expected, target
        for name in expected:
            assert (target / name).read_bytes() == (source / name).read_bytes(), name
    assert (share / "grafana" / "treadmill.json").read_bytes() == (
        ROOT / "etc" / "grafana" / "treadmill.json").read_bytes()
    docs = venv / "share" / "doc" / "treadmill"
    assert sorted(p.name for p in docs.glob("*.md")) == sorted(
        p.name for p in (ROOT / "docs").glob("*.md"))
    for unit in (share / "systemd").iterdir():
        (documentation,) = [v for k, v in parse(unit)["Unit"] if k == "Documentation"]
        assert documentation.startswith("file:///opt/treadmill/"), unit.name
        local = Path(documentation.removeprefix("file://").replace("/opt/treadmill",
                                                                    str(venv), 1))
        assert local.is_file(), (unit.name, documentation)


def _exec_start(venv: Path, unit: Path, tmp_path: Path) -> list[str]:
    """The installed unit's ExecStart, with /opt/treadmill the test's environment, its
    config the installed example and systemd's directories under ``tmp_path``."""
    (line,) = values(parse(unit), "ExecStart")
    example = EXAMPLE_OF_UNIT.get(unit.name)
    argv = []
    for word in shlex.split(line):
        word = word.replace(TWISTD, str(venv / "bin" / "twistd"))
        if word.startswith("/etc/treadmill/"):
            word = str(_share(venv) / "etc" / (example or word.rsplit("/", 1)[1]))
        word = word.replace("${STATE_DIRECTORY}", str(tmp_path / "state"))
        word = word.replace("${CREDENTIALS_DIRECTORY}", str(tmp_path / "credentials"))
        argv.append(word)
    return argv


def test_every_installed_unit_runs_its_installed_role(installed: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    """Each unit's command line, from the installed files, is accepted by the installed
    role's plugin (the example configuration parses); only --help is added."""
    _, venv = installed
    units = sorted((_share(venv) / "systemd").iterdir())
    assert len(units) == 8
    for unit in units:
        argv = _exec_start(venv, unit, tmp_path)
        assert argv[0] == str(venv / "bin" / "twistd"), unit.name
        help_text = run(*argv, "--help", cwd=tmp_path).stdout
        assert "--config" in help_text, unit.name


@pytest.fixture
def least_privileged(pg_admin_dsn: str) -> Iterator[str]:
    """install.md's role and database, made by its SQL; a DSN acting as the role."""
    with least_privileged_database(pg_admin_dsn) as dsn:
        yield dsn


class _Daemons:
    """Roles started by their installed unit's command line, stopped at the end."""

    def __init__(self, venv: Path, tmp_path: Path, ca: Path | None = None):
        self.venv, self.tmp_path = venv, tmp_path
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.tls = ssl.create_default_context(cafile=str(ca) if ca else None)
        if ca is not None:
            self.env["TREADMILL_CA_FILE"] = str(ca)
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def output(self, name: str) -> str:
        return (self.tmp_path / f"{name}.out").read_text(errors="replace")

    def start(self, unit: str, *overrides: str, minor: int | None = None
              ) -> subprocess.Popen[bytes]:
        """The unit's ExecStart (its state and credentials under ``tmp_path/NAME``) and
        the test's ``overrides`` (ports, paths, peers) after it; ``minor``: the role
        speaks that supervisor protocol minor instead of the current one."""
        name = unit.split(".")[0]
        home = self.tmp_path / name
        (home / "state").mkdir(parents=True, exist_ok=True)
        argv = [*_exec_start(self.venv, _share(self.venv) / "systemd" / unit, home),
                *overrides]
        if minor is not None:
            argv[:1] = [str(self.venv / "bin" / "python"), "-c",
                        "import treadmill.protocol.supervisor as p; "
                        f"p.MINOR = {minor}; "
                        "from twisted.scripts.twistd import run; run()"]
        with (self.tmp_path / f"{name}.out").open("ab") as out:
            proc = subprocess.Popen(argv, cwd=home, env=self.env, stdout=out, stderr=out)
        self.running.append((name, proc))
        return proc

    def stop_one(self, name: str) -> None:
        proc = dict(self.running)[name]
        self.running.remove((name, proc))
        proc.terminate()
        assert proc.wait(timeout=30) in (0, -15), self.output(name)

    def wait_http(self, name: str, url: str) -> None:
        proc = dict(self.running)[name]
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, self.output(name)
            try:
                with urllib.request.urlopen(url, timeout=5, context=self.tls):
                    return
            except urllib.error.HTTPError:
                return  # it answers
            except OSError:
                pass
            assert time.monotonic() < deadline, self.output(name)
            time.sleep(0.2)

    def tml(self, url: str, token: str, *args: str) -> Any:
        """``tml --json ARGS`` as the user of ``token``: its JSON, or its text."""
        done = subprocess.run([str(self.venv / "bin" / "tml"), "--json", *args],
                              cwd=self.tmp_path, capture_output=True, text=True, timeout=60,
                              env={**self.env, "TREADMILL_URL": url, "TREADMILL_TOKEN": token},
                              check=False)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return json.loads(done.stdout) if done.stdout.strip().startswith(("{", "[")) \
            else done.stdout

    def run_job(self, url: str, token: str, tag: str) -> dict[str, Any]:
        """Submit a job for hosts tagged ``tag``; the job once it ended, well."""
        job = self.tml(url, token, "job", "submit", "--tag", tag, "sha256:" + "7" * 64)
        deadline = time.monotonic() + 60
        while (shown := self.tml(url, token, "job", "show", job["id"]))["state"] \
                != "terminated":
            assert time.monotonic() < deadline, (shown, self.output("treadmill-supervisor@"))
            time.sleep(0.3)
        assert shown["termination"]["reason"] == "workload_exited", shown
        return shown

    def stop(self) -> None:
        for name, proc in reversed(self.running):
            proc.terminate()
            # twistd ends by its SIGTERM (systemd counts that as a clean stop).
            assert proc.wait(timeout=30) in (0, -15), self.output(name)
        for name, _ in self.running:
            assert "Traceback" not in self.output(name), self.output(name)


FAST_MOCK = ("--mock-run-time", "0.5", *[
    arg for stage in ("starting", "fetching-image", "allocating", "provisioning", "booting")
    for arg in (f"--mock-stages-{stage}", "0.05")])
"""The mock supervisor's options for a job of about a second."""


def test_a_site_from_the_installed_files_runs_a_job(
        installed: tuple[Path, Path], least_privileged: str, tmp_path: Path) -> None:
    """install.md from the installed files only, as the PostgreSQL role of its SQL:
    migrate (then a dry run finds nothing), start the switchboard (TLS, as section 4
    says), a log server and a mock supervisor by their units' command lines and example
    configurations (ports, directories and peers overridden for the test, as an
    operator edits them), create the first admin, register the host, and run a job
    whose console the installed ``tml`` reads from the log server. Every table belongs
    to the unprivileged role, and each daemon's ``/metrics`` has its documented names
    (docs/operations.md) and passes ``promtool check metrics``."""
    _, venv = installed
    bin_ = venv / "bin"
    database = least_privileged
    config = _share(venv) / "etc" / "switchboard.toml"
    run(bin_ / "treadmill-switchboard-migrate", "--config", config, "--database-dsn",
        database, cwd=tmp_path)
    assert run(bin_ / "treadmill-switchboard-migrate", "--config", config, "--database-dsn",
               database, "--dry-run", cwd=tmp_path).stdout == "nothing pending\n"
    port, logs_port = free_port(), free_port()
    metrics = {role: free_port() for role in ("Switchboard", "Log server", "Supervisor")}

    def scrape_at(role: str) -> tuple[str, str]:
        return "--metrics-listen", f"tcp:{metrics[role]}:interface=127.0.0.1"

    url, logs_url = f"https://localhost:{port}", f"http://127.0.0.1:{logs_port}"
    (tmp_path / "tls").mkdir()
    tls = make_pki(tmp_path / "tls", "site")
    daemons = _Daemons(venv, tmp_path, tls["ca"])
    try:
        daemons.start("treadmill-switchboard.service", "--database-dsn", database,
                      "--listen", f"ssl:{port}:interface=127.0.0.1:privateKey={tls['key']}"
                                  f":certKey={tls['cert']}",
                      "--capabilities-signing-key", str(tmp_path / "capability-key.pem"),
                      "--logs-servers", logs_url, *scrape_at("Switchboard"))
        daemons.wait_http("treadmill-switchboard", f"{url}/healthz")
        daemons.start("treadmill-logserver.service",
                      "--listen", f"tcp:{logs_port}:interface=127.0.0.1",
                      "--root", str(tmp_path / "logs"),
                      "--auth-keys-url", f"{url}/.well-known/treadmill/capability-keys",
                      "--auth-ca-file", str(tls["ca"]),
                      "--auth-keys-file", str(tmp_path / "logs-keys.json"),
                      *scrape_at("Log server"))
        daemons.wait_http("treadmill-logserver", f"{logs_url}/")
        token = run(bin_ / "python", "-m", "treadmill.switchboard.bootstrap", "--config",
                    config, "--database-dsn", database, "--admin", "alice",
                    cwd=tmp_path).stdout.strip()
        assert daemons.tml(url, token, "admin", "user", "show", "alice")["admin"] is True
        host = daemons.tml(url, token, "admin", "host", "add", "mock-1", "--tag", "mock")
        credentials = tmp_path / "treadmill-supervisor@" / "credentials"
        credentials.mkdir(parents=True)
        (credentials / "token").write_text(host["token"])
        daemons.start("treadmill-supervisor@.service", "--switchboard-url",
                      f"wss://localhost:{port}", "--switchboard-ca-file", str(tls["ca"]),
                      "--mock-console",
                      "hello from the installed site\n", *FAST_MOCK, *scrape_at("Supervisor"))
        job = daemons.run_job(url, token, "mock")
        logs = daemons.tml(url, token, "job", "logs", job["id"])
        assert "hello from the installed site" in logs
        with psycopg2.connect(database) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_user, count(*) FILTER (WHERE tableowner <> "
                        "current_user), count(*) FROM pg_tables WHERE schemaname = 'public' "
                        "GROUP BY current_user")
            role, foreign, tables = cur.fetchone()
        conn.close()
        assert role.startswith("treadmill_") and foreign == 0 and tables > 10
        tables_of = documented()
        for name, metrics_port in metrics.items():
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                        timeout=10) as response:
                text = response.read().decode()
            assert {family: kind for family, (kind, _) in scraped(text).items()} == {
                family: kind for family, (kind, _) in tables_of[name].items()}, name
            if promtool := shutil.which("promtool"):
                checked = subprocess.run([promtool, "check", "metrics"], input=text,
                                         capture_output=True, text=True, timeout=60)
                assert checked.returncode == 0, (name, checked.stdout + checked.stderr)
    finally:
        daemons.stop()


def _pg_tool(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)), None)
    if found is None:
        pytest.skip(f"no {name}")
    return str(found)


def test_backup_and_restore_as_install_md_says(installed: tuple[Path, Path],
                                               least_privileged: str, pg_admin_dsn: str,
                                               tmp_path: Path) -> None:
    """install.md's backup: pg_dump (custom format) of a migrated database with its first
    admin; restore into an empty database owned by the role with ``--no-owner
    --role``; the restored database has nothing pending, the admin, and only the role's
    objects."""
    _, venv = installed
    bin_ = venv / "bin"
    run(bin_ / "treadmill-switchboard-migrate", "--database-dsn", least_privileged,
        cwd=tmp_path)
    run(bin_ / "python", "-m", "treadmill.switchboard.bootstrap", "--database-dsn",
        least_privileged, "--admin", "alice", cwd=tmp_path)
    params = dict(part.split("=", 1) for part in least_privileged.split() if "=" in part)
    role = params["dbname"]
    dump = tmp_path / "treadmill.dump"
    admin = make_dsn(pg_admin_dsn, dbname=role)
    run(_pg_tool("pg_dump"), "--format=custom", f"--file={dump}", f"--dbname={admin}",
        cwd=tmp_path)
    restored = f"{role}_restored"
    conn = psycopg2.connect(pg_admin_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(restored), sql.Identifier(role)))
        run(_pg_tool("pg_restore"), f"--dbname={make_dsn(pg_admin_dsn, dbname=restored)}",
            "--no-owner", f"--role={role}", "--single-transaction", dump, cwd=tmp_path)
        as_role = make_dsn(pg_admin_dsn, dbname=restored, options=f"-c role={role}")
        assert run(bin_ / "treadmill-switchboard-migrate", "--database-dsn", as_role,
                   "--dry-run", cwd=tmp_path).stdout == "nothing pending\n"
        with psycopg2.connect(as_role) as restored_conn, restored_conn.cursor() as cur:
            cur.execute("SELECT name, admin FROM users")
            assert cur.fetchall() == [("alice", True)]
            cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' "
                        "AND tableowner <> current_user")
            assert cur.fetchone() == (0,)
        restored_conn.close()
    finally:
        drop_database(pg_admin_dsn, restored)
        conn.close()


def test_a_supervisor_one_minor_behind_rides_a_switchboard_restart(
        installed: tuple[Path, Path], least_privileged: str, tmp_path: Path) -> None:
    """install.md "Upgrading": the new switchboard serves a supervisor that speaks the
    previous protocol minor (the installed supervisor made to announce it), and its
    restart (step 3) leaves that supervisor to reconnect and run the next job."""
    _, venv = installed
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    switchboard = ("treadmill-switchboard.service", "--database-dsn", least_privileged,
                   "--listen", f"tcp:{port}:interface=127.0.0.1",
                   "--capabilities-signing-key", str(tmp_path / "capability-key.pem"))
    daemons = _Daemons(venv, tmp_path)
    try:
        daemons.start(*switchboard)
        daemons.wait_http("treadmill-switchboard", f"{url}/healthz")
        token = run(venv / "bin" / "python", "-m", "treadmill.switchboard.bootstrap",
                    "--database-dsn", least_privileged, "--admin", "alice",
                    cwd=tmp_path).stdout.strip()
        host = daemons.tml(url, token, "admin", "host", "add", "old-1", "--tag", "old")
        credentials = tmp_path / "treadmill-supervisor@" / "credentials"
        credentials.mkdir(parents=True)
        (credentials / "token").write_text(host["token"])
        older = protocol.MINOR - 1
        daemons.start("treadmill-supervisor@.service", "--switchboard-url",
                      f"ws://127.0.0.1:{port}", *FAST_MOCK, minor=older)
        daemons.run_job(url, token, "old")
        assert f"Supervisor of old-1 connected (minor {older})" in daemons.output(
            "treadmill-switchboard")
        daemons.stop_one("treadmill-switchboard")
        daemons.start(*switchboard)
        daemons.wait_http("treadmill-switchboard", f"{url}/healthz")
        deadline = time.monotonic() + 60
        while not daemons.tml(url, token, "host", "show", "old-1")["connected"]:
            assert time.monotonic() < deadline, daemons.output("treadmill-supervisor@")
            time.sleep(0.3)
        daemons.run_job(url, token, "old")
        assert daemons.output("treadmill-switchboard").count(
            f"Supervisor of old-1 connected (minor {older})") == 2
    finally:
        daemons.stop()
