"""The agent channel between a host's in-host agent and its supervisor (``docs/agent.md``).

Newline-delimited JSON objects, one per line, each with a ``type``; simple
enough for a shell script in a busybox image. The transport is whatever the
host driver offers: a virtio-serial port (QEMU, ``org.treadmill.agent.0``), a
second serial line, a TCP socket, or the board's console itself, where agent
lines are marked with :data:`CONSOLE_PREFIX` so that they coexist with
ordinary output (:class:`ConsoleAgentFilter`).

The agent says::

    {"type": "hello", "agent": "busybox-init/1"}      optional; answered with "welcome"
    {"type": "ready"}                                  the workload runs
    {"type": "exit", "status": 0, "message": "ok"}     the workload finished
    {"type": "service", "name": "ssh", "port": 22}     a TCP service listens on this port
    {"type": "get_parameters"}                         answered with "parameters"
    {"type": "test_case", "name": "boot", "result": "pass", "duration": 0.5}
                                                       one test's outcome (docs/results.md)
    {"type": "summary", "result": "pass"}              the run's verdict (before ``exit``)

The supervisor says ``welcome`` (``job``, ``protocol``), ``parameters``
(``job``, ``parameters``: the job's parameters, secret values included, as
strings) and ``error`` (``message``: a line it could not use; the channel
stays open).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from jsonschema.exceptions import best_match
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from treadmill.common.http import loads
from treadmill.common.schema import validator
from treadmill.protocol.results import MAX_MESSAGE, TEST_CASE_FIELDS

__all__ = ["CONSOLE_PREFIX", "MAX_LINE", "PROTOCOL", "VIRTIO_PORT", "AgentError",
           "AgentHandler", "AgentProtocol", "ConsoleAgentFilter", "encode", "parse"]

PROTOCOL = 1
VIRTIO_PORT = "org.treadmill.agent.0"
"""The virtio-serial port name; in a Linux guest ``/dev/virtio-ports/org.treadmill.agent.0``."""
CONSOLE_PREFIX = b"@@treadmill "
"""Marks an agent line on a shared console: ``@@treadmill {"type":"ready"}``."""
MAX_LINE = 16 * 1024

_NAME = {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,31}$"}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"enum": ["hello", "ready", "exit", "service", "get_parameters",
                                     "test_case", "summary"]}},
    "allOf": [
        {"if": {"properties": {"type": {"const": "hello"}}},
         "then": {"additionalProperties": False,
                  "properties": {"type": True,
                                 "agent": {"type": "string", "maxLength": 128}}}},
        {"if": {"properties": {"type": {"enum": ["ready", "get_parameters"]}}},
         "then": {"additionalProperties": False, "properties": {"type": True}}},
        {"if": {"properties": {"type": {"const": "exit"}}},
         "then": {"additionalProperties": False, "required": ["status"],
                  "properties": {"type": True,
                                 "status": {"type": "integer", "minimum": 0, "maximum": 255},
                                 "message": {"type": "string", "maxLength": 4096}}}},
        {"if": {"properties": {"type": {"const": "service"}}},
         "then": {"additionalProperties": False, "required": ["name", "port"],
                  "properties": {"type": True, "name": _NAME,
                                 "port": {"type": "integer", "minimum": 1,
                                          "maximum": 65535}}}},
        {"if": {"properties": {"type": {"const": "test_case"}}},
         "then": {"additionalProperties": False, "required": ["name", "result"],
                  "properties": {"type": True, **TEST_CASE_FIELDS}}},
        {"if": {"properties": {"type": {"const": "summary"}}},
         "then": {"additionalProperties": False, "required": ["result"],
                  "properties": {"type": True, "result": {"enum": ["pass", "fail"]},
                                 "message": {"type": "string", "maxLength": MAX_MESSAGE}}}},
    ],
}


class AgentError(ValueError):
    """A line from the agent that is not a valid message."""


def parse(line: bytes) -> dict[str, Any]:
    """Decode and validate one line (without its newline) from an agent."""
    if len(line) > MAX_LINE:
        raise AgentError(f"line of {len(line)} bytes exceeds {MAX_LINE}")
    try:
        message = loads(line.strip())
    except (UnicodeDecodeError, ValueError) as e:
        raise AgentError(f"malformed JSON: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise AgentError("a message is a JSON object with a string 'type'")
    error = best_match(validator(SCHEMA).iter_errors(message))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "type"
        raise AgentError(f"invalid {message['type'][:32]} message: {where}: "
                         f"{error.validator} check failed")
    return message


def encode(message: dict[str, Any]) -> bytes:
    """One line for the agent."""
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode("utf-8") + b"\n"


def welcome(job_id: str) -> dict[str, Any]:
    return {"type": "welcome", "job": job_id, "protocol": PROTOCOL}


def parameters(job_id: str, values: dict[str, Any]) -> dict[str, Any]:
    return {"type": "parameters", "job": job_id,
            "parameters": {k: v if isinstance(v, str) else json.dumps(v)
                           for k, v in values.items()}}


def error(message: str) -> dict[str, Any]:
    return {"type": "error", "message": message}


class AgentHandler:
    """What a driver does with the agent's messages; override what it needs.

    ``job_id`` and ``job_parameters`` answer ``hello`` and ``get_parameters``.
    """

    job_id: str = ""
    job_parameters: dict[str, Any] = {}

    def agent_ready(self) -> None:
        """The agent said ``ready``."""

    def agent_exit(self, status: int, message: str) -> None:
        """The agent said ``exit``."""

    def agent_service(self, name: str, port: int) -> None:
        """The agent announced a service on ``port`` inside the host."""

    def agent_invalid(self, problem: str) -> None:
        """The agent sent a line that is not a valid message."""

    def agent_result(self, message: dict[str, Any]) -> None:
        """The agent reported a ``test_case`` or its ``summary`` (a validated message);
        drivers pass it to their reporter's ``result``."""


def dispatch(handler: AgentHandler, message: dict[str, Any],
             reply: Callable[[dict[str, Any]], None]) -> None:
    """Act on one parsed message: call ``handler``, answer through ``reply``."""
    kind = message["type"]
    if kind == "hello":
        reply(welcome(handler.job_id))
    elif kind == "ready":
        handler.agent_ready()
    elif kind == "exit":
        handler.agent_exit(message["status"], message.get("message", ""))
    elif kind == "service":
        handler.agent_service(message["name"], message["port"])
    elif kind == "get_parameters":
        reply(parameters(handler.job_id, handler.job_parameters))
    elif kind in ("test_case", "summary"):
        handler.agent_result(message)


class _Lines:
    """Split a byte stream into lines, bounding a line's length."""

    def __init__(self, on_line: Callable[[bytes], None], on_overlong: Callable[[], None]):
        self.buffer = b""
        self.discarding = False
        self.on_line = on_line
        self.on_overlong = on_overlong

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    if not self.discarding:
                        self.on_overlong()
                    self.discarding = True
                    self.buffer = b""
                return
            line, self.buffer = self.buffer[:end], self.buffer[end + 1:]
            if self.discarding:
                self.discarding = False
                continue
            self.on_line(line.rstrip(b"\r"))


class AgentProtocol(Protocol):
    """The supervisor's end of a dedicated agent channel (virtio-serial, TCP)."""

    log = Logger()

    def __init__(self, handler: AgentHandler):
        self.handler = handler
        self._lines = _Lines(self._line, self._overlong)

    def dataReceived(self, data: bytes) -> None:
        self._lines.feed(data)

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(encode(message))

    def _overlong(self) -> None:
        self._invalid(f"line longer than {MAX_LINE} bytes")

    def _invalid(self, problem: str) -> None:
        self.handler.agent_invalid(problem)
        self.send(error(problem))

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = parse(line)
        except AgentError as e:
            self._invalid(str(e))
            return
        dispatch(self.handler, message, self.send)


class ConsoleAgentFilter:
    """Finds agent lines (``@@treadmill {...}``) in a console byte stream.

    ``feed(data)`` passes every byte on to ``console`` unchanged (agent lines
    stay visible in the console log) and dispatches each complete agent line
    to ``handler``; answers go through ``reply`` (the console's input).
    """

    def __init__(self, handler: AgentHandler, console: Callable[[bytes], None],
                 reply: Callable[[bytes], None]):
        self.handler = handler
        self.console = console
        self.reply = reply
        self._lines = _Lines(self._line, lambda: None)

    def feed(self, data: bytes) -> None:
        self.console(data)
        self._lines.feed(data)

    def _send(self, message: dict[str, Any]) -> None:
        self.reply(CONSOLE_PREFIX + encode(message))

    def _line(self, line: bytes) -> None:
        start = line.find(CONSOLE_PREFIX)
        if start < 0:
            return
        try:
            message = parse(line[start + len(CONSOLE_PREFIX):])
        except AgentError as e:
            self.handler.agent_invalid(str(e))
            self._send(error(str(e)))
            return
        dispatch(self.handler, message, self._send)
