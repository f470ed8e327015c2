"""A small QMP client (QEMU Machine Protocol: JSON lines over a UNIX socket)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["QMPClient", "QMPError"]

MAX_LINE = 1024 * 1024


class QMPError(Exception):
    """QEMU answered a command with an error (``klass``, ``desc``), or the
    connection ended before the answer."""

    def __init__(self, klass: str, desc: str):
        super().__init__(f"{klass}: {desc}")
        self.klass = klass
        self.desc = desc


class QMPClient(Protocol):
    """``ready`` fires once the greeting is read and capabilities negotiated;
    :meth:`execute` sends a command and fires with its ``return``; events go
    to ``on_event(name, data)``."""

    log = Logger()

    def __init__(self, on_event: Callable[[str, dict[str, Any]], None] | None = None):
        self.on_event = on_event
        self.ready: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self._buffer = b""
        self._next = 0
        self._pending: dict[str, Deferred[Any]] = {}
        self._greeted = False
        self.connected_ = False

    def connectionMade(self) -> None:
        self.connected_ = True

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                self._line(line)
        if len(self._buffer) > MAX_LINE:
            self.log.warn("QMP: line longer than {max} bytes; closing", max=MAX_LINE)
            self.transport.loseConnection()

    def _line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self.log.warn("QMP: not JSON: {line!r}", line=line[:200])
            return
        if not isinstance(message, dict):
            return
        if not self._greeted and "QMP" in message:
            self._greeted = True
            self.execute("qmp_capabilities").addCallbacks(
                lambda _: self.ready.callback(None), self.ready.errback)
        elif "event" in message:
            if self.on_event is not None:
                self.on_event(str(message["event"]), message.get("data") or {})
        elif "id" in message:
            d = self._pending.pop(str(message["id"]), None)
            if d is None:
                return
            if "error" in message:
                error = message["error"] or {}
                d.errback(QMPError(str(error.get("class", "GenericError")),
                                   str(error.get("desc", ""))))
            else:
                d.callback(message.get("return"))

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Deferred[Any]:
        """Send ``command``; the Deferred fires with QEMU's ``return`` value."""
        if self.transport is None or not self.connected_:
            return fail(QMPError("Disconnected", "QMP is not connected"))
        self._next += 1
        ident = str(self._next)
        message: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            message["arguments"] = arguments
        d: Deferred[Any] = Deferred()
        self._pending[ident] = d
        self.transport.write(json.dumps(message).encode() + b"\n")
        return d

    async def hmp(self, command_line: str) -> str:
        """A human monitor command; its output (empty on success for most)."""
        return str(await self.execute("human-monitor-command",
                                      {"command-line": command_line}) or "")

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.connected_ = False
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(QMPError("Disconnected", "the QMP connection closed"))
        if not self.ready.called:
            self.ready.errback(QMPError("Disconnected", "the QMP connection closed"))
        self.closed.callback(None)
