"""The serial driver's logic under a fake clock: settings, templates, DTR/RTS pulses, tools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from tests.supervisor.serial.support import FakeFetcher, Recorder, job
from treadmill.common.config import ConfigError
from treadmill.supervisor.drivers import IHostDriver
from treadmill.supervisor.drivers.serial import SerialDriver, SerialSettings
from treadmill.supervisor.drivers.serial.tools import CommandResult, TemplateError, expand

BASE = {"serial.device": "/dev/ttyFAKE", "serial.flash.command": ["flash", "{firmware}"]}


class FakePort:
    """Stands in for a SerialPort: records modem line changes and writes."""

    def __init__(self, protocol: Any, clock: MemoryReactorClock):
        self.protocol = protocol
        self.clock = clock
        self.lines: list[tuple[float, str, bool]] = []
        self.written = b""
        protocol.makeConnection(self)

    def setDTR(self, on: bool) -> None:
        self.lines.append((self.clock.seconds(), "dtr", on))

    def setRTS(self, on: bool) -> None:
        self.lines.append((self.clock.seconds(), "rts", on))

    def write(self, data: bytes) -> None:
        self.written += data

    def loseConnection(self) -> None:
        self.protocol.connectionLost(None)


HARNESSES: list[Harness] = []


@pytest.fixture(autouse=True)
def _shut_down() -> Any:
    """Shut every driver down after its test (jobs left running leave no files)."""
    yield
    while HARNESSES:
        HARNESSES.pop().driver.shutdown()


class Harness:
    def __init__(self, tmp_path: Path, **values: Any):
        self.clock = MemoryReactorClock()
        self.ports: list[FakePort] = []
        self.commands: list[list[str]] = []
        self.fail: dict[str, CommandResult] = {}
        self.fetcher = FakeFetcher(tmp_path / "blobs")
        settings = SerialSettings.from_values({**BASE, "serial.console.bridge": False,
                                               **values})
        self.driver = SerialDriver(self.clock, settings, fetcher=self.fetcher,  # type: ignore
                                   open_port=self.open_port, commands=self.run_command)
        self.clock.advance(0)
        HARNESSES.append(self)

    def open_port(self, protocol: Any, device: str, reactor: Any, **options: Any) -> FakePort:
        port = FakePort(protocol, self.clock)
        self.ports.append(port)
        return port

    def run_command(self, reactor: Any, argv: list[str], timeout: float,
                    output: Any) -> Deferred[CommandResult]:
        self.commands.append(argv)
        output(b"tool output\n")
        return succeed(self.fail.get(argv[0], CommandResult(tuple(argv), 0)))

    def pump(self, seconds: float = 1.0, step: float = 0.01) -> None:
        self.clock.pump([step] * int(seconds / step))

    def console(self, data: bytes) -> None:
        self.ports[-1].protocol.dataReceived(data)


def test_the_driver_provides_the_interface(tmp_path: Path) -> None:
    verifyObject(IHostDriver, Harness(tmp_path).driver)


@pytest.mark.parametrize("values, problem", [
    ({"serial.device": None}, "required"),
    ({"serial.flash.command": []}, "program its board"),
    ({"serial.clean.after": "erase"}, "serial.erase.command"),
    ({"serial.boot.ready": "pattern"}, "serial.boot.pattern"),
    ({"serial.agent.transport": "device"}, "serial.agent.device"),
    ({"serial.power.on": ["on"]}, "both"),
    ({"serial.flash.command": ["x", "{nope}"]}, "unknown placeholder"),
    ({"serial.flash.tools": {"dfu": ["dfu-util"]}}, "unknown flash tool"),
    ({"serial.health.pattern": "("}, "regular expression"),
    ({"serial.bytesize": 9}, "data bits"),
])
def test_inconsistent_settings_are_refused(values: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        SerialSettings.from_values({**BASE, **values})


def test_commands_from_strings_are_split_like_a_shell() -> None:
    s = SerialSettings.from_values({**BASE, "serial.reset.command": "ctl 'my board' reset"})
    assert s.reset_command == ["ctl", "my board", "reset"]


def test_templates() -> None:
    argv = ["-p", "{port}", "{firmware:a.bin}@{target:a.bin}", "{param:speed}", "{{x}}", "{job}"]
    assert expand(argv, port="/dev/ttyX", job="j1", firmware={"a.bin": "/f/a.bin"},
                  targets={"a.bin": "0x0"}, params={"speed": "fast"}) == [
        "-p", "/dev/ttyX", "/f/a.bin@0x0", "fast", "{x}", "j1"]
    with pytest.raises(TemplateError) as e:
        expand(["{firmware:b.bin}"], port="p", firmware={"a.bin": "/f"})
    assert e.value.kind == "image"
    with pytest.raises(TemplateError) as e:
        expand(["{firmware}"], port="p", firmware={"a": "1", "b": "2"})
    assert e.value.kind == "image"


def test_dtr_pulse_resets_the_board_and_agent_ends_the_job(tmp_path: Path) -> None:
    h = Harness(tmp_path, **{"serial.reset.line": "dtr", "serial.reset.pulse": 0.25,
                             "serial.boot.ready": "agent", "serial.clean.after": "none"})
    assert h.driver.present
    reporter = Recorder()
    image = h.fetcher.add({"app.bin": b"app"})
    h.driver.start(job("job-1", image, level="3"), reporter)
    h.pump(0.2)
    # Flashed (the port closed and reopened around the tool), then reset by a DTR pulse.
    assert [cmd[0] for cmd in h.commands] == ["flash"]
    port = h.ports[-1]
    assert [(line, on) for _, line, on in port.lines] == [("dtr", True)]
    h.pump(0.3)
    assert [(line, on) for _, line, on in port.lines] == [("dtr", True), ("dtr", False)]
    assert port.lines[1][0] - port.lines[0][0] == pytest.approx(0.25)
    assert "ready" not in [what for what, _ in reporter.reports]
    h.console(b'boot\r\n@@treadmill {"type":"get_parameters"}\r\n')
    assert b'"level":"3"' in port.written
    h.console(b'@@treadmill {"type":"ready"}\r\n@@treadmill {"type":"exit","status":7}\r\n')
    h.pump(0.1)
    assert [what for what, _ in reporter.reports if what != "stage"] == [
        "ready", "terminating", "exited"]
    assert reporter.reports[-1] == ("exited", (7, ""))
    assert b"tool output" in reporter.console_bytes


def test_inverted_rts_pulse(tmp_path: Path) -> None:
    h = Harness(tmp_path, **{"serial.reset.line": "rts", "serial.reset.invert": True,
                             "serial.clean.after": "reset"})
    reporter = Recorder()
    h.driver.start(job("job-1", h.fetcher.add({"app.bin": b"app"})), reporter)
    h.pump(1.0)
    assert [(line, on) for _, line, on in h.ports[-1].lines][:2] == [("rts", False),
                                                                     ("rts", True)]
    assert ("ready", ()) in reporter.reports  # boot.ready = reset: ready after the reset


def test_the_image_names_an_operator_tool(tmp_path: Path) -> None:
    h = Harness(tmp_path, **{"serial.flash.tools": {"openocd": ["openocd", "-f", "b.cfg"]}})
    flash = {"tool": "openocd", "args": ["-c", "program {firmware:z.bin} {target:z.bin}"]}
    image = h.fetcher.add({"z.bin": b"zephyr"}, flash=None)
    # Rebuild with targets: the fake fetcher's add() takes no targets, so patch the manifest.
    from treadmill.images import format as fmt

    manifest = fmt.build_board_manifest(
        [fmt.FirmwareFile("z.bin", fmt.Blob(fmt.digest_of(b"zephyr"), 6), "0x8000000")],
        flash=flash)
    data = fmt.manifest_bytes(manifest)
    paths = h.fetcher.images[image["digest"]][2]
    h.fetcher.images[fmt.digest_of(data)] = (manifest, data, paths)
    reporter = Recorder()
    h.driver.start(job("job-1", {"digest": fmt.digest_of(data)}), reporter)
    h.pump(0.5)
    flash_argv = h.commands[0]
    assert flash_argv[:3] == ["openocd", "-f", "b.cfg"]
    assert flash_argv[3] == "-c" and flash_argv[4].endswith("z.bin 0x8000000")
    # A tool the host does not offer is the image's problem.
    flash2 = {"tool": "probe-rs", "args": []}
    manifest2 = fmt.build_board_manifest(
        [fmt.FirmwareFile("z.bin", fmt.Blob(fmt.digest_of(b"zephyr"), 6))], flash=flash2)
    data2 = fmt.manifest_bytes(manifest2)
    h.fetcher.images[fmt.digest_of(data2)] = (manifest2, data2, paths)
    h.console(b'@@treadmill {"type":"exit","status":0}\n')
    h.pump(0.5)
    other = Recorder()
    h.driver.start(job("job-2", {"digest": fmt.digest_of(data2)}), other)
    h.pump(0.5)
    assert other.reports[-1][0] == "failed"
    assert other.reports[-1][1][0] == "image_error" and "probe-rs" in other.reports[-1][1][1]


def test_flash_failure_and_missing_parameter(tmp_path: Path) -> None:
    h = Harness(tmp_path, **{"serial.flash.command": ["flash", "{firmware}", "{param:speed}"]})
    refused = h.driver.start(job("job-0", h.fetcher.add({"a": b"a"})), Recorder())
    assert "speed" in str(refused.result.value)
    refused.addErrback(lambda _: None)
    h.fail["flash"] = CommandResult(("flash",), 2, tail=b"line 1\nno probe found\n")
    reporter = Recorder()
    h.driver.start(job("job-1", h.fetcher.add({"a": b"a"}), speed="9"), reporter)
    h.pump(0.5)
    what, (reason, message) = reporter.reports[-1]
    assert (what, reason) == ("failed", "host_start_failure")
    assert message == "flash (flash) exited with status 2: line 1\nno probe found"


def test_device_loss_fails_the_job_and_polls(tmp_path: Path) -> None:
    h = Harness(tmp_path, **{"serial.reopen_interval": 0.5})
    reporter = Recorder()
    h.driver.start(job("job-1", h.fetcher.add({"a": b"a"})), reporter)
    h.pump(0.5)
    assert ("ready", ()) in reporter.reports
    opened = len(h.ports)
    h.ports[-1].protocol.connectionLost(None)
    assert reporter.reports[-1][0] == "failed"
    assert reporter.reports[-1][1][0] == "host_dropped_job"
    assert not h.driver.present
    h.pump(0.6)
    assert h.driver.present and len(h.ports) == opened + 1


def test_the_example_configuration_is_valid(tmp_path: Path) -> None:
    from treadmill.supervisor.tap import Options, config_from

    token = tmp_path / "token"
    token.write_text("tmh_test\n")
    options = Options()
    options.parseOptions(["--config", "etc/treadmill/supervisor-serial.toml",
                          "--switchboard-token-file", str(token),
                          "--state-dir", str(tmp_path / "state")])
    config = config_from(options.values)
    settings = SerialSettings.from_values(config.driver_values)
    assert config.driver == "serial" and settings.clean_after == "erase"
    assert "tockloader" in settings.flash_tools
