"""The serial driver's ``serial.*`` settings (``etc/treadmill/supervisor-serial.toml``)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field, fields
from typing import Any

from treadmill.common.config import (
    BOOL,
    FLOAT,
    INT,
    STR,
    ConfigError,
    Setting,
    non_negative,
    one_of,
    positive,
)
from treadmill.images.format import FLASH_TOOLS
from treadmill.supervisor.drivers.serial.tools import check_template

__all__ = ["CLEAN_POLICIES", "SETTINGS", "SerialSettings"]

CLEAN_POLICIES = ("none", "reset", "erase", "command")


def _argv(value: Any) -> list[str]:
    """A command: a list of strings, or a string split like a shell would (no shell runs)."""
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as e:
            raise ValueError(f"cannot split {value!r}: {e}") from None
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        argv = list(value)
    else:
        raise ValueError("expected a command: a list of strings")
    check_template(argv)
    return argv


def _tools(value: Any) -> dict[str, list[str]]:
    """``{tool: command}`` for the tools of ``org.treadmill.flash``; JSON on the command line."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"expected a JSON object of commands: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("expected a table of tool = command")
    tools = {}
    for name, command in value.items():
        if name not in FLASH_TOOLS:
            raise ValueError(f"unknown flash tool {name!r} (expected {', '.join(FLASH_TOOLS)})")
        tools[name] = _argv(command)
    return tools


def _regex(value: Any) -> str | None:
    text = STR(value)
    if not text:
        return None
    try:
        re.compile(text.encode("utf-8"))
    except re.error as e:
        raise ValueError(f"invalid regular expression {text!r}: {e}") from None
    return text


def _bytesize(value: Any) -> int:
    size = INT(value)
    if size not in (5, 6, 7, 8):
        raise ValueError(f"expected 5, 6, 7 or 8 data bits, got {size}")
    return size


def _stopbits(value: Any) -> float:
    bits = FLOAT(value)
    if bits not in (1, 1.5, 2):
        raise ValueError(f"expected 1, 1.5 or 2 stop bits, got {value!r}")
    return bits


SETTINGS: tuple[Setting, ...] = (
    Setting("serial.device", STR, None,
            "Serial driver: the board's console device (a stable name such as "
            "/dev/serial/by-id/usb-…); required with driver = serial."),
    Setting("serial.baud_rate", positive(INT), 115200, "Serial driver: the console's baud rate."),
    Setting("serial.bytesize", _bytesize, 8, "Serial driver: data bits (5-8)."),
    Setting("serial.parity", one_of("none", "even", "odd", "mark", "space"), "none",
            "Serial driver: parity."),
    Setting("serial.stopbits", _stopbits, 1.0, "Serial driver: stop bits (1, 1.5, 2)."),
    Setting("serial.rtscts", BOOL, False, "Serial driver: RTS/CTS hardware flow control."),
    Setting("serial.xonxoff", BOOL, False, "Serial driver: XON/XOFF software flow control."),
    Setting("serial.reopen_interval", positive(FLOAT), 1.0,
            "Serial driver: seconds between attempts to reopen a vanished device."),
    Setting("serial.flash.command", _argv, [],
            "Serial driver: the flash command for images without org.treadmill.flash "
            "(and their 'custom' tool); placeholders {port}, {job}, {firmware}, "
            "{firmware:NAME}, {target:NAME}, {param:NAME}."),
    Setting("serial.flash.tools", _tools, {},
            "Serial driver: a table tool = command for the tools images may name in "
            "org.treadmill.flash (tockloader, openocd, probe-rs, custom); the image's "
            "arguments are appended.", table=True),
    Setting("serial.flash.timeout", positive(FLOAT), 300.0,
            "Serial driver: seconds flashing may take (an image's flash timeout overrides it)."),
    Setting("serial.flash.release_port", BOOL, True,
            "Serial driver: close the console device while flash, erase and clean commands "
            "run (tools that flash over the serial port need it to themselves)."),
    Setting("serial.erase.command", _argv, [],
            "Serial driver: the command that erases the board's flash."),
    Setting("serial.power.on", _argv, [], "Serial driver: the command that powers the board on."),
    Setting("serial.power.off", _argv, [],
            "Serial driver: the command that powers the board off."),
    Setting("serial.power.off_time", non_negative(FLOAT, finite=True), 1.0,
            "Serial driver: seconds the board stays off in a power cycle."),
    Setting("serial.reset.command", _argv, [], "Serial driver: the command that resets the board."),
    Setting("serial.reset.line", one_of("none", "dtr", "rts"), "none",
            "Serial driver: reset by pulsing this modem line (when no reset command is set)."),
    Setting("serial.reset.pulse", positive(FLOAT), 0.1,
            "Serial driver: seconds the reset line is held active."),
    Setting("serial.reset.invert", BOOL, False,
            "Serial driver: the reset line is active when deasserted (low)."),
    Setting("serial.command_timeout", positive(FLOAT), 60.0,
            "Serial driver: seconds a power, reset, erase, clean or health command may take."),
    Setting("serial.clean.before", one_of(*CLEAN_POLICIES), "none",
            "Serial driver: clean state before flashing a job: none, reset, erase "
            "(serial.erase.command, then reset) or command (serial.clean.command, then reset)."),
    Setting("serial.clean.after", one_of(*CLEAN_POLICIES), "reset",
            "Serial driver: clean state after each job (as serial.clean.before)."),
    Setting("serial.clean.command", _argv, [],
            "Serial driver: the clean command (e.g. flash a known image)."),
    Setting("serial.health.command", _argv, [],
            "Serial driver: a board health check command (exit status 0: healthy)."),
    Setting("serial.health.pattern", _regex, None,
            "Serial driver: a regular expression the console must show within "
            "serial.health.timeout after a reset for the board to be healthy."),
    Setting("serial.health.timeout", positive(FLOAT), 30.0,
            "Serial driver: seconds to wait for serial.health.pattern."),
    Setting("serial.health.before_job", BOOL, False,
            "Serial driver: run the health check before every job, not only after a job "
            "or a problem (finds a board that broke while idle before its job is lost)."),
    Setting("serial.boot.ready", one_of("reset", "pattern", "agent"), "reset",
            "Serial driver: when the job is ready: right after the reset, when the console "
            "shows serial.boot.pattern, or when the agent says ready."),
    Setting("serial.boot.pattern", _regex, None,
            "Serial driver: the console pattern of serial.boot.ready = pattern."),
    Setting("serial.boot.timeout", positive(FLOAT), 60.0,
            "Serial driver: seconds from the reset to ready (pattern and agent modes)."),
    Setting("serial.agent.transport", one_of("console", "device", "none"), "console",
            "Serial driver: the agent channel: @@treadmill lines on the console, a second "
            "serial device (serial.agent.device), or none."),
    Setting("serial.agent.device", STR, None, "Serial driver: the agent's own serial device."),
    Setting("serial.agent.baud_rate", positive(INT), 115200,
            "Serial driver: the agent device's baud rate."),
    Setting("serial.console.bridge", BOOL, True,
            "Serial driver: offer the console to users as the job's 'console' service."),
    Setting("serial.console.interface", STR, "127.0.0.1",
            "Serial driver: the local interface the console bridge listens on."),
)
_BY_KEY = {setting.key: setting for setting in SETTINGS}


@dataclass(frozen=True)
class SerialSettings:
    """The checked ``serial.*`` settings, one attribute per key (dots as underscores)."""

    device: str = ""
    baud_rate: int = 115200
    bytesize: int = 8
    parity: str = "none"
    stopbits: float = 1.0
    rtscts: bool = False
    xonxoff: bool = False
    reopen_interval: float = 1.0
    flash_command: list[str] = field(default_factory=list)
    flash_tools: dict[str, list[str]] = field(default_factory=dict)
    flash_timeout: float = 300.0
    flash_release_port: bool = True
    erase_command: list[str] = field(default_factory=list)
    power_on: list[str] = field(default_factory=list)
    power_off: list[str] = field(default_factory=list)
    power_off_time: float = 1.0
    reset_command: list[str] = field(default_factory=list)
    reset_line: str = "none"
    reset_pulse: float = 0.1
    reset_invert: bool = False
    command_timeout: float = 60.0
    clean_before: str = "none"
    clean_after: str = "reset"
    clean_command: list[str] = field(default_factory=list)
    health_command: list[str] = field(default_factory=list)
    health_pattern: str | None = None
    health_timeout: float = 30.0
    health_before_job: bool = False
    boot_ready: str = "reset"
    boot_pattern: str | None = None
    boot_timeout: float = 60.0
    agent_transport: str = "console"
    agent_device: str | None = None
    agent_baud_rate: int = 115200
    console_bridge: bool = True
    console_interface: str = "127.0.0.1"

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> SerialSettings:
        """From ``serial.*`` values (missing keys take their defaults, given ones are
        checked again); raises :class:`ConfigError` for an inconsistent set."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = "serial." + f.name.replace("_", ".", 1)
            if key not in _BY_KEY:
                key = "serial." + f.name
            setting = _BY_KEY[key]
            if key in values and values[key] is not None:
                try:
                    kwargs[f.name] = setting.kind(values[key])
                except ValueError as e:
                    raise ConfigError(str(e), key=key) from None
            elif setting.default is not None:
                default = setting.default
                kwargs[f.name] = (list(default) if isinstance(default, list) else
                                  dict(default) if isinstance(default, dict) else default)
        settings = cls(**kwargs)
        settings.check()
        return settings

    def check(self) -> None:
        """Rules between settings (``ConfigError``)."""
        def need(condition: Any, key: str, problem: str) -> None:
            if not condition:
                raise ConfigError(problem, key=key)

        need(self.device, "serial.device", "required with driver = serial")
        need(self.flash_command or self.flash_tools, "serial.flash.command",
             "set serial.flash.command or serial.flash.tools: a board host must be able to "
             "program its board")
        for key, policy in (("serial.clean.before", self.clean_before),
                            ("serial.clean.after", self.clean_after)):
            need(policy != "erase" or self.erase_command, key,
                 "the erase policy needs serial.erase.command")
            need(policy != "command" or self.clean_command, key,
                 "the command policy needs serial.clean.command")
        need(self.boot_ready != "pattern" or self.boot_pattern, "serial.boot.pattern",
             "serial.boot.ready = pattern needs serial.boot.pattern")
        need(self.agent_transport != "device" or self.agent_device, "serial.agent.device",
             "serial.agent.transport = device needs serial.agent.device")
        need(bool(self.power_on) == bool(self.power_off), "serial.power.on",
             "set both serial.power.on and serial.power.off, or neither")
