"""Configuration, the twistd plugin, the systemd unit, and the daemon as operators run it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import pytest_twisted
import treq

from tests.logserver.support import Keys, LogClient, new_job
from tests.util.daemons import Daemon, refused_config, run_twistd
from tests.util.ports import free_port
from treadmill.common.config import ConfigError, load_file
from treadmill.logserver import tap

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "etc" / "treadmill" / "logserver.toml"
UNIT = ROOT / "systemd" / "treadmill-logserver.service"


def options(*argv: str) -> tap.Options:
    parsed = tap.Options()
    parsed.parseOptions(list(argv))
    return parsed


def test_the_example_configuration_parses() -> None:
    values = load_file(str(EXAMPLE), tap.Options.all_settings())
    assert values["root"] == "/var/lib/treadmill-logserver"
    config = tap.config_from(options("--config", str(EXAMPLE), "--root", "/srv/logs").values)
    assert config.root == "/srv/logs"  # the command line wins
    assert config.fsync == "always" and config.max_append == 1024 * 1024
    assert config.service == "treadmill-logserver"
    assert config.retention_max_age == 30 * 24 * 3600.0 and config.retention_max_bytes is None
    assert config.auth["auth.keys_file"].endswith("capability-keys.json")


def test_defaults_and_overrides() -> None:
    config = tap.config_from(options("--root", "/x", "--auth-keys-file", "/k",
                                     "--retention-max-age", "0",
                                     "--retention-max-bytes", "1000000",
                                     "--fsync", "never", "--service", "logs-1").values)
    assert config.listen == ["tcp:8070:interface=127.0.0.1"]
    assert config.retention_max_age is None and config.retention_max_bytes == 1_000_000
    assert config.fsync == "never" and config.service == "logs-1"


@pytest.mark.parametrize(("argv", "words"), [
    ((), "root"),
    (("--root", "/x"), "auth.keys_file"),
    (("--root", "/x", "--auth-keys-file", "/k", "--fsync", "sometimes"), "fsync"),
    (("--root", "/x", "--auth-keys-file", "/k", "--appends-max-bytes", "0"), "positive"),
    (("--root", "/x", "--auth-keys-file", "/k", "--retention-max-age", "-1"), "zero or more"),
    (("--root", "/x", "--auth-keys-file", "/k", "--listen", "bogus:1"), "listen"),
])
def test_bad_settings(argv: tuple[str, ...], words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        options(*argv)
    assert words in str(caught.value)


def test_the_unit_runs_the_plugin() -> None:
    unit = UNIT.read_text()
    assert "treadmill-logserver --config /etc/treadmill/logserver.toml" in unit
    assert "StateDirectory=treadmill-logserver" in unit


def test_config_error_names_file_and_key(tmp_path: Path) -> None:
    output = refused_config("treadmill-logserver", tmp_path / "logserver.toml",
                            'root = "/x"\n[auth]\nkeys_file = "/k"\n[retention]\nbogus = 1\n')
    assert "retention.bogus" in output


@pytest_twisted.ensureDeferred
async def test_the_daemon_serves_and_keeps_acknowledged_bytes(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    port, metrics = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    daemon = Daemon("treadmill-logserver", [
        "--config", str(EXAMPLE), "--root", str(tmp_path / "logs"),
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--auth-keys-file", str(keys.keys_file),
        "--metrics-listen", f"tcp:{metrics}:interface=127.0.0.1"])
    daemon.start()
    try:
        await daemon.wait_http(f"{url}/healthz")
        client = LogClient(url)
        job = new_job()
        w = keys.token(job, "append")
        assert (await client.append(job, "console", 0, b"durable", w)).code == 200
        await daemon.signal(signal.SIGKILL)
        daemon.start()
        await daemon.wait_http(f"{url}/healthz")
        assert (await client.read(job, "console", keys.token(job, "read"))).body == b"durable"
        scrape = await (await treq.get(f"http://127.0.0.1:{metrics}/metrics")).text()
        assert "treadmill_logs_stored_bytes 7.0" in scrape
        assert 'treadmill_http_requests_total{code="200",method="GET"}' in scrape
        await daemon.stop()
        assert "Log server listening" in daemon.output
    finally:
        await daemon.stop()


def test_an_unusable_root_stops_the_daemon(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, output = run_twistd("treadmill-logserver", "--root", str(blocker / "logs"),
                              "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
                              "--auth-keys-file", str(keys.keys_file))
    assert code == 1
    assert "cannot start" in output
