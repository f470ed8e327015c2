"""Configuration, the twistd plugin, and the daemon as operators run it."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.application.service import IServiceCollection
from twisted.internet import reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from tests.supervisor.peer import FakeSwitchboard, quick_job_ready
from tests.util.daemons import Daemon, refused_config
from tests.util.ports import free_port
from tests.util.waiting import within
from treadmill.common.config import ConfigError, load_file
from treadmill.protocol.supervisor import CloseCode
from treadmill.supervisor import tap
from treadmill.supervisor.blobcache import DEFAULT_LOCAL_LIMIT
from treadmill.supervisor.drivers.mock import MockSettings
from treadmill.supervisor.service import SupervisorService

EXAMPLE = Path(__file__).parents[2] / "etc" / "treadmill" / "supervisor-mock.toml"
UNIT = Path(__file__).parents[2] / "systemd" / "treadmill-supervisor@.service"


def options(*argv: str) -> tap.Options:
    parsed = tap.Options()
    parsed.parseOptions(list(argv))
    return parsed


def test_the_example_configuration_parses(tmp_path: Path) -> None:
    values = load_file(str(EXAMPLE), tap.Options.all_settings())
    assert values["switchboard.url"] == "ws://127.0.0.1:8080"
    token = tmp_path / "token"
    token.write_text("  tmh_example-token\n")
    parsed = options("--config", str(EXAMPLE), "--switchboard-token-file", str(token),
                     "--state-dir", str(tmp_path / "state"))
    config = tap.config_from(parsed.values)
    assert config.token == "tmh_example-token"
    assert config.state_dir == str(tmp_path / "state")
    mock = MockSettings.from_values(config.driver_values)
    assert mock.durations["booting"] == 2.0 and mock.run_time == 10.0
    assert all(key.startswith("mock.") for key in config.driver_values)
    assert SupervisorService(reactor, config).driver.settings == mock
    assert config.heartbeat_interval == 5.0 and config.heartbeat_timeout == 10.0


def test_defaults() -> None:
    config = tap.config_from(options("--switchboard-url", "wss://sb.example.org",
                                     "--switchboard-token", "t", "--state-dir", "/x").values)
    assert (config.reconnect_initial, config.reconnect_max) == (1.0, 60.0)
    assert (config.heartbeat_interval, config.heartbeat_timeout) == (5.0, 10.0)
    assert config.driver == "mock"
    assert MockSettings.from_values(config.driver_values) == MockSettings()
    assert (config.event_ack_timeout, config.event_resend_max) == (5.0, 60.0)
    runner = SupervisorService(reactor, config).runner
    assert runner.ack_timeout == 5.0


@pytest.mark.parametrize("given, warned", [("argv", True), ("file", False), ("config", False)])
def test_a_host_token_on_the_command_line_is_warned_about(tmp_path: Path, given: str,
                                                          warned: bool) -> None:
    """Other local users read a process's argv (ps): the host token belongs in a file."""
    token = tmp_path / "token"
    token.write_text("tmh_secret\n")
    config = tmp_path / "supervisor.toml"
    config.write_text('[switchboard]\nurl = "ws://sb"\ntoken = "tmh_secret"\n')
    argv = {"argv": ["--switchboard-url", "ws://sb", "--switchboard-token", "tmh_secret"],
            "file": ["--switchboard-url", "ws://sb", "--switchboard-token-file", str(token)],
            "config": ["--config", str(config)]}[given]
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        parsed = options(*argv, "--state-dir", "/x")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert parsed.values["switchboard.token"] == "tmh_secret"
    warnings = [formatEvent(e) for e in events if e.get("log_level") is LogLevel.warn]
    assert [w for w in warnings if "--switchboard-token" in w] == (
        ["--switchboard-token puts the host token on the command line, where other local "
         "users can read it; use switchboard.token_file (or --switchboard-token-file)"]
        if warned else [])
    assert not any("tmh_secret" in w for w in warnings)


def test_event_resend_settings() -> None:
    config = tap.config_from(options(
        "--switchboard-url", "ws://sb", "--switchboard-token", "t", "--state-dir", "/x",
        "--events-ack-timeout", "0.5", "--events-resend-max", "8").values)
    assert (config.event_ack_timeout, config.event_resend_max) == (0.5, 8.0)


def test_image_settings(tmp_path: Path) -> None:
    base = ("--switchboard-url", "wss://sb.example.org:8443", "--switchboard-token", "t",
            "--state-dir", str(tmp_path / "state"))
    config = tap.config_from(options(*base).values)
    assert config.images_cache_mount is None and config.images_dir is None
    assert config.images_local_limit == DEFAULT_LOCAL_LIMIT
    fetcher = SupervisorService(reactor, config).fetcher
    assert fetcher.local_dir == str(tmp_path / "state" / "images")
    assert fetcher.cache_mount is None and fetcher.local_limit == DEFAULT_LOCAL_LIMIT
    assert fetcher.trusted_realms == ("https://sb.example.org:8443",)
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    config = tap.config_from(options(
        *base, "--images-cache-mount", "/mnt/treadmill-cache", "--images-dir", "/var/cache/x",
        "--images-local-limit", "1000", "--images-trusted-realms",
        "https://sb.example.org/api/v1/registry/token", "--images-ca-file", str(ca)).values)
    fetcher = SupervisorService(reactor, config).fetcher
    assert fetcher.cache_mount == "/mnt/treadmill-cache" and fetcher.local_dir == "/var/cache/x"
    assert fetcher.local_limit == 1000 and fetcher.ca_file == str(ca)
    assert fetcher.trusted_realms == ("https://sb.example.org/api/v1/registry/token",)
    assert config.driver_values["mock.fetch"] == "auto"
    never = tap.config_from(options(*base, "--mock-fetch", "never").values)
    assert SupervisorService(reactor, never).driver.settings.fetch == "never"


@pytest.mark.parametrize("argv, key", [
    (["--state-dir", "/x"], "switchboard.token"),
    (["--state-dir", "/x", "--switchboard-token", "t", "--switchboard-token-file", "/f"],
     "switchboard.token"),
    (["--state-dir", "/x", "--switchboard-token-file", "/nonexistent/token"],
     "switchboard.token_file"),
    (["--switchboard-token", "t"], "state_dir"),
    (["--state-dir", "/x", "--switchboard-token", "t", "--driver", "nonesuch"], "--driver"),
    (["--state-dir", "/x", "--switchboard-token", "t", "--reconnect-initial", "100"],
     "reconnect.initial"),
    (["--state-dir", "/x", "--switchboard-token", "t", "--events-ack-timeout", "100"],
     "events.ack_timeout"),
    (["--state-dir", "/x", "--switchboard-token", "t", "--events-ack-timeout", "0"],
     "--events-ack-timeout"),
    (["--state-dir", "/x", "--switchboard-token", "t", "--mock-fail-at", "nowhere"],
     "--mock-fail-at"),
    (["--state-dir", "/x", "--switchboard-token", "t", "--switchboard-ca-file", "/nope.pem"],
     "switchboard.ca_file"),
    (["--state-dir", "/x", "--switchboard-token", "t", "--images-ca-file", "/nope.pem"],
     "images.ca_file"),
    (["--state-dir", "/x", "--switchboard-token", "t", "--images-cache-mount", "relative"],
     "--images-cache-mount"),
    (["--state-dir", "/x", "--switchboard-token", "t", "--images-local-limit", "-1"],
     "--images-local-limit"),
    (["--state-dir", "/x", "--switchboard-token", "t", "--images-trusted-realms", "ftp://x"],
     "--images-trusted-realms"),
    (["--state-dir", "/x", "--switchboard-token", "t", "--mock-fetch", "always"],
     "--mock-fetch"),
])
def test_bad_settings_name_the_key(argv: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        options("--switchboard-url", "ws://127.0.0.1:8080", *argv)
    assert key in str(raised.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "ws:///x", "ws://h:0x"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError, match="--switchboard-url"):
        options("--switchboard-url", url, "--switchboard-token", "t", "--state-dir", "/x")


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="does not hold a token"):
        options("--switchboard-url", "ws://h", "--switchboard-token-file", str(empty),
                "--state-dir", "/x")


def test_make_service_builds_the_tree(tmp_path: Path) -> None:
    parsed = options("--switchboard-url", "ws://127.0.0.1:8080", "--switchboard-token", "t",
                     "--state-dir", str(tmp_path / "state"), "--mock-run-time", "3")
    service = tap.makeService(parsed)
    assert isinstance(service, SupervisorService)
    assert service.namespace()["runner"] is service.runner
    assert service.namespace()["driver"] is service.driver
    assert service.namespace()["fetcher"] is service.fetcher is service.driver.fetcher
    assert service.driver.settings.run_time == 3.0
    assert (tmp_path / "state" / "journal").is_dir()
    # The link joins after start-up; gc-freeze is the operator services' (always).
    assert [child.name for child in IServiceCollection(service)] == [
        "logs", "exposure", "runner", "fetcher", "gc-freeze"]


def test_make_service_refuses_a_locked_state_directory(tmp_path: Path) -> None:
    from treadmill.supervisor.journal import StateFiles

    held = StateFiles(str(tmp_path / "state"))
    held.open()
    try:
        with pytest.raises(ConfigError, match="in use"):
            tap.makeService(options("--switchboard-url", "ws://h", "--switchboard-token", "t",
                                    "--state-dir", str(tmp_path / "state")))
    finally:
        held.close()


def test_the_unit_runs_the_plugin() -> None:
    text = UNIT.read_text()
    assert "treadmill-supervisor --config /etc/treadmill/supervisor-%i.toml" in text
    assert "StateDirectory=treadmill-supervisor/%i" in text and "Restart=on-failure" in text


def test_config_error_exits_non_zero(tmp_path: Path) -> None:
    output = refused_config("treadmill-supervisor", tmp_path / "supervisor.toml",
                            'state_dir = "/tmp/x"\n[switchboard]\nurl = "ws://h"\n'
                            'token = "t"\nbogus = 1\n')
    assert "switchboard.bogus" in output


@pytest_twisted.ensureDeferred
async def test_the_daemon_runs_a_job_and_stops_gracefully(tmp_path: Path) -> None:
    peer = FakeSwitchboard().listen()
    metrics = free_port()
    token = tmp_path / "token"
    token.write_text("host-token\n")
    config = tmp_path / "supervisor.toml"
    config.write_text(EXAMPLE.read_text())
    daemon = Daemon("treadmill-supervisor", [
        "--config", str(config), "--switchboard-url", peer.url,
        "--switchboard-token-file", str(token), "--state-dir", str(tmp_path / "state"),
        "--mock-run-time", "inf", "--reconnect-initial", "0.1",
        "--metrics-listen", f"tcp:{metrics}:interface=127.0.0.1"],
        env={"TREADMILL_LOG_LEVEL": "info"})
    daemon.start()
    try:
        conn = await quick_job_ready(peer)
        # metrics.listen serves this supervisor's registry.
        scrape = await (await treq.get(f"http://127.0.0.1:{metrics}/metrics")).text()
        assert "treadmill_supervisor_link_up 1.0" in scrape
        assert 'treadmill_supervisor_job_stage_seconds_count{driver="mock",stage="booting"} 1.0' \
            in scrape
        # twistd re-raises the signal once shut down: no exit code, but a clean stop.
        assert await daemon.signal(signal.SIGTERM) in (0, None)
        assert "Server Shut Down" in daemon.output, daemon.output
        _, code, _ = await within(conn.closed)
        assert code == CloseCode.GOING_AWAY
        assert (tmp_path / "state" / "current-job.json").exists()  # left for the restart
        assert "s3cret-value" not in daemon.output and "host-token" not in daemon.output
    finally:
        await daemon.stop()
        await peer.shutdown()
    assert not peer.errors
