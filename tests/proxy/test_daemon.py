"""Configuration, the twistd plugin, the systemd unit, and the daemon as operators run it."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor

from tests.proxy.support import (
    EXAMPLE,
    Keys,
    Transfer,
    TransferService,
    new_job,
    proxy_daemon,
    tcp_transfer,
)
from tests.util.daemons import Daemon, refused_config
from tests.util.ports import free_range
from treadmill.common.config import ConfigError
from treadmill.proxy import tap
from treadmill.supervisor.exposure import ExposureManager

ROOT = Path(__file__).parents[2]
UNIT = ROOT / "systemd" / "treadmill-proxy.service"
MiB = 1024 * 1024


def options(*argv: str) -> tap.Options:
    parsed = tap.Options()
    parsed.parseOptions(list(argv))
    return parsed


def test_the_example_configuration_parses() -> None:
    config = tap.config_from(options("--config", str(EXAMPLE), "--grace", "5").values)
    assert config.listen == ["tcp:8090:interface=127.0.0.1"]
    assert config.data_listen == ["tcp:8091:interface=127.0.0.1"]
    assert config.service == "treadmill-proxy"
    assert config.tunnels.ports == (40000, 40999) and config.tunnels.static == {}
    assert config.tunnels.grace == 5.0  # the command line wins
    assert config.tunnels.public_host == "proxy.example.org"
    assert config.tunnels.max_connections_per_tunnel == 256
    assert (config.tunnels.pool_per_job, config.tunnels.pool_max) == (2, 4096)
    assert config.auth["auth.keys_file"].endswith("capability-keys.json")


def test_static_ports_from_a_table_or_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text('ports = ""\n[auth]\nkeys_file = "/k"\n'
                    '[static]\n"board-7/console" = 22014\n"job-1/ssh" = 22015\n')
    config = tap.config_from(options("--config", str(path)).values)
    assert config.tunnels.ports is None
    assert config.tunnels.static == {"board-7/console": 22014, "job-1/ssh": 22015}
    config = tap.config_from(options("--config", str(path), "--static", "a/ssh=2022").values)
    assert config.tunnels.static == {"a/ssh": 2022}


@pytest.mark.parametrize(("argv", "toml", "words"), [
    ((), "", "auth.keys_file"),
    (("--ports", "9-1"), "", "ports"),
    (("--ports", "40000"), "", "ports"),
    (("--ports", ""), "", "no public ports"),
    (("--static", "nonsense"), "", "static"),
    (("--grace", "-1"), "", "zero or more"),
    (("--max-connections-per-tunnel", "0"), "", "positive"),
    (("--data-listen", "unix:/tmp/x"), "", "data_listen"),
    (("--public-url", "http://x"), "", "ws://"),
    ((), '[static]\n"x/ssh" = 70000\n', "static"),
    ((), '[static]\n"a/ssh" = 2000\n"b/ssh" = 2000\n', "same port"),
    ((), "[bogus]\nkey = 1\n", "bogus.key"),
])
def test_bad_settings(tmp_path: Path, argv: tuple[str, ...], toml: str, words: str) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(toml)
    keys = () if not argv and not toml else ("--auth-keys-file", "/k")
    with pytest.raises(ConfigError) as caught:
        options("--config", str(path), *keys, *argv)
    assert words in str(caught.value)


def test_the_unit_runs_the_plugin() -> None:
    unit = UNIT.read_text()
    assert "treadmill-proxy --config /etc/treadmill/proxy.toml" in unit
    assert "CAP_NET_BIND_SERVICE" in unit and "LimitNOFILE=" in unit


def test_config_error_names_file_and_key(tmp_path: Path) -> None:
    output = refused_config("treadmill-proxy", tmp_path / "proxy.toml",
                            '[auth]\nkeys_file = "/k"\n[limits]\nbogus = 1\n')
    assert "limits.bogus" in output


def _vm(pid: int, field: str) -> int:
    """A /proc/PID/status memory figure in bytes (VmHWM: peak RSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_keeps_the_daemons_memory_bounded(tmp_path: Path) -> None:
    """256 MiB from a fast service to a reader that keeps pausing: the proxy daemon's
    peak RSS grows by far less than what is in flight (backpressure on both legs)."""
    keys = Keys(tmp_path)
    running = proxy_daemon(keys)
    daemon, http, metrics = running.daemon, running.http, running.metrics
    first, last = running.ports
    daemon.start()
    size = 256 * MiB
    sizes = [16 * MiB, size]  # a warm-up, then the measured transfer
    service = TransferService(lambda: Transfer(sizes.pop(0), seed=7))
    job = new_job()
    manager = ExposureManager(reactor, job, [{"url": f"ws://127.0.0.1:{http}",
                                              "token": keys.token(job)}],
                              {"source": ("127.0.0.1", service.listen(), True)},
                              reconnect_initial=0.1)
    try:
        await daemon.wait_http(f"http://127.0.0.1:{http}/healthz")
        manager.start()
        port = (await manager.published())[0]["port"]
        assert first <= port <= last
        pid = daemon._transport.pid
        warm = await tcp_transfer(port, Transfer(0, seed=0, expect=None))
        assert warm.received_bytes == 16 * MiB
        before = _vm(pid, "VmHWM")
        slow = Transfer(0, seed=0, pause_every=16 * MiB, pause_for=0.15)
        outcome = await tcp_transfer(port, slow)
        assert outcome.received_bytes == size
        assert outcome.received == (await service.outcomes[1]).sent
        growth = _vm(pid, "VmHWM") - before
        assert growth < 64 * MiB, f"the proxy's peak RSS grew by {growth / MiB:.1f} MiB"
        scrape = await (await treq.get(f"http://127.0.0.1:{metrics}/metrics")).text()
        assert 'treadmill_proxy_clients_total{outcome="spliced"} 2.0' in scrape
        assert "treadmill_proxy_tunnels 1.0" in scrape
    finally:
        await manager.close()
        await service.stop()
        await daemon.stop()
    assert "Proxy listening on" in daemon.output


@pytest_twisted.ensureDeferred
async def test_a_port_that_cannot_be_bound_ends_the_daemon_with_status_1(
        tmp_path: Path) -> None:
    """Under twistd, services start before the reactor runs: a failed start-up must still
    end the process (status 1, so systemd restarts it), not leave it up and deaf."""
    import socket

    keys = Keys(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon("treadmill-proxy", [
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--data-listen", "tcp:0:interface=127.0.0.1", "--ports", "%d-%d" % free_range(2),
            "--auth-keys-file", str(keys.keys_file)])
        daemon.start()
        assert daemon._proto is not None
        code = await daemon._proto.ended.addTimeout(30, reactor)
    assert code == 1, daemon.output
    assert "Address already in use" in daemon.output
