"""The switchboard as operators run it: ``twistd treadmill-switchboard`` in its own process."""

from __future__ import annotations

import io
import signal
from pathlib import Path

import psycopg2
import pytest_twisted
import treq
from twisted.internet import reactor

from tests.support import write_switchboard_config
from tests.util.daemons import Daemon, bootstrap_admin, refused_config, run_twistd
from tests.util.ports import free_port
from treadmill.cli.main import run as tml


async def cli(url: str, token: str, *argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await tml(reactor, ["--url", url, *argv], out, err,
                     {"TREADMILL_TOKEN": token, "S": "hidden"},
                     stdin=io.StringIO("a long enough password\n"))
    return code, out.getvalue() + err.getvalue()


def test_config_error_names_file_and_key(tmp_path: Path) -> None:
    output = refused_config("treadmill-switchboard", tmp_path / "switchboard.toml",
                            'listen = ["tcp:8080"]\n[database]\ndsn = "x"\nbogus = 1\n')
    assert "database.bogus" in output and "unknown" in output


@pytest_twisted.ensureDeferred
async def test_switchboard_daemon_end_to_end(database: str, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_switchboard_config(tmp_path / "switchboard.toml", database, port, tmp_path)
    daemon = Daemon("treadmill-switchboard", ["--config", str(config)])
    daemon.start()
    try:
        await daemon.wait_http(f"{url}/healthz")
        admin = await bootstrap_admin("--config", str(config))

        code, out = await cli(url, admin, "admin", "user", "add", "alice", "--password-stdin")
        assert code == 0, out
        code, out = await cli(url, admin, "admin", "host", "add", "board-1", "--tag", "qemu")
        assert code == 0 and "tmh_" in out, out
        code, out = await cli(url, admin, "job", "submit", "sha256:" + "1" * 64,
                              "--tag", "qemu", "--param", "A=b", "--secret-param", "S")
        assert code == 0, out
        job = out.strip().splitlines()[-1].split()[-1]

        # Killed without warning, the daemon loses nothing: the job is still queued.
        assert await daemon.signal(signal.SIGKILL) != 0
        daemon.start()
        await daemon.wait_http(f"{url}/healthz")
        code, out = await cli(url, admin, "--json", "job", "show", job)
        assert code == 0 and '"state": "queued"' in out.replace('":"', '": "'), out
        assert "hidden" not in out

        code, out = await cli(url, admin, "job", "cancel", job)
        assert code == 0, out
        code, out = await cli(url, admin, "job", "events", job)
        assert code == 0 and "user_terminated" in out, out
    finally:
        await daemon.stop()
    assert "Traceback (most recent" not in daemon.output, daemon.output


@pytest_twisted.ensureDeferred
async def test_two_switchboards_share_one_database(database: str, tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    daemons = []
    for i, port in enumerate(ports):
        state = tmp_path / f"sb{i}"
        state.mkdir()
        config = write_switchboard_config(state / "switchboard.toml", database, port, tmp_path)
        daemons.append(Daemon("treadmill-switchboard",
                              ["--config", str(config), "--instance", f"sb{i}"]))
    for daemon in daemons:
        daemon.start()
    try:
        for daemon, port in zip(daemons, ports, strict=True):
            await daemon.wait_http(f"http://127.0.0.1:{port}/healthz")
    finally:
        for daemon in daemons:
            await daemon.stop()
    conn = psycopg2.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT version, count(*) FROM schema_migrations GROUP BY version")
            rows = cur.fetchall()
    finally:
        conn.close()
    assert rows and all(count == 1 for _, count in rows)


@pytest_twisted.ensureDeferred
async def test_operators_reach_metrics_and_manhole(database: str, tmp_path: Path) -> None:
    from tests.util.ssh import conch_session, make_client_key

    port, metrics_port, manhole_port = free_port(), free_port(), free_port()
    key = tmp_path / "operator_key"
    public = make_client_key(key).public().toString("OPENSSH").decode()
    (tmp_path / "authorized_keys").write_text(public + "\n")
    config = write_switchboard_config(tmp_path / "switchboard.toml", database, port, tmp_path)
    with config.open("a") as f:
        f.write(f'[metrics]\nlisten = ["tcp:{metrics_port}:interface=127.0.0.1"]\n'
                f'[manhole]\nlisten = ["tcp:{manhole_port}:interface=127.0.0.1"]\n'
                f'authorized_keys = "{tmp_path / "authorized_keys"}"\n'
                f'host_key = "{tmp_path / "manhole_host_key"}"\n')
    daemon = Daemon("treadmill-switchboard", ["--config", str(config), "--instance", "ops-1"])
    daemon.start()
    try:
        await daemon.wait_http(f"http://127.0.0.1:{port}/healthz")
        response = await treq.get(f"http://127.0.0.1:{metrics_port}/metrics")
        text = (await response.content()).decode()
        assert response.code == 200
        assert 'treadmill_http_requests_total{code="200",method="GET"}' in text
        assert "treadmill_supervisor_links 0.0" in text
        # Counters are counters; the lone (so leading) instance exports hosts by state.
        assert "# TYPE treadmill_scheduler_passes_total counter" in text
        assert 'treadmill_jobs_terminated_total{reason="workload_exited"} 0.0' in text
        assert "process_resident_memory_bytes" in text
        typed = b"print(switchboard.config.instance, len(links.by_host))\r\x04"
        output = await conch_session(manhole_port, key, typed, timeout=20)
        assert b"ops-1 0" in output["output"]
    finally:
        await daemon.stop()


def test_a_busy_port_stops_the_daemon(database: str, tmp_path: Path) -> None:
    # Staying up without its API would look healthy to systemd: it exits 1 instead.
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = write_switchboard_config(tmp_path / "switchboard.toml", database,
                              busy.getsockname()[1], tmp_path)
        code, output = run_twistd("treadmill-switchboard", "--config", str(config))
    assert code == 1, output
    assert "Address already in use" in output
