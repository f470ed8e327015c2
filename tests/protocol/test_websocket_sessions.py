"""The shared WebSocket session kit (``treadmill.common.wsjson``) and its use everywhere:
every Autobahn protocol in ``treadmill/`` logs through a :class:`QuietLogger`, and every
Autobahn factory has precise timers (``treadmill.common.wsfactory``)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Any

import pytest
from autobahn.twisted import websocket as autobahn_twisted
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import WebSocketProtocol
from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

import treadmill
from treadmill.common.wsfactory import PreciseTimers
from treadmill.common.wsjson import MAX_CLOSE_REASON, JsonSession, QuietLogger, close_reason

# Protocol classes not yet on the kit, by "module:Class". Each entry is removed when its
# owner adopts QuietLogger; the test fails if an entry is no longer needed.
NOT_YET_QUIET: set[str] = set()


def _websocket_protocols() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(treadmill.__path__, "treadmill."):
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, WebSocketProtocol):
                found[f"{module.__name__}:{name}"] = cls
    return found


def test_every_websocket_protocol_logs_through_a_quiet_logger() -> None:
    protocols = _websocket_protocols()
    assert len(protocols) >= 7  # the walk found them
    loud = {name for name, cls in protocols.items() if not isinstance(cls.log, QuietLogger)}
    assert loud == NOT_YET_QUIET, (
        "Autobahn logs the handshake (bearer tokens) at debug level: give these protocol "
        "classes log = QuietLogger(namespace=...) from treadmill.common.wsjson")


def _autobahn_factory_uses(path: Path) -> list[str]:
    """Where ``path`` names Autobahn's own WebSocket factories (an import or an
    attribute): each a ``line: name``."""
    names = {"WebSocketClientFactory", "WebSocketServerFactory"}
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("autobahn"):
            found += [f"{node.lineno}: {a.name}" for a in node.names if a.name in names]
        elif isinstance(node, ast.Attribute) and node.attr in names:
            found.append(f"{node.lineno}: {node.attr}")
    return found


def test_every_websocket_factory_has_precise_timers() -> None:
    """Autobahn's factories time pings and handshakes on txaio's batched timer, which
    rounds deadlines down to the second: every factory in ``treadmill/`` is built from
    ``treadmill.common.wsfactory`` (its subclasses too)."""
    root = Path(treadmill.__file__).parent
    kit = root / "common" / "wsfactory.py"
    direct = {f"{path.relative_to(root.parent)}:{use}" for path in sorted(root.rglob("*.py"))
              if path != kit for use in _autobahn_factory_uses(path)}
    assert direct == set(), "build WebSocket factories from treadmill.common.wsfactory"
    classes = set()
    for info in pkgutil.walk_packages(treadmill.__path__, "treadmill."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(
                    cls, (WebSocketClientFactory, WebSocketServerFactory)):
                classes.add(cls)
    assert len(classes) >= 6  # the kit's two and the roles' four server factories
    assert all(issubclass(cls, PreciseTimers) for cls in classes), classes


@pytest.mark.parametrize("reason", ["short", "x" * 200, "é" * 100, "€" * 50 + "x", "😀" * 40])
def test_close_reasons_are_cut_between_characters(reason: str) -> None:
    cut = close_reason(reason)
    assert len(cut.encode("utf-8")) <= MAX_CLOSE_REASON
    assert reason.startswith(cut)
    assert len(cut.encode("utf-8")) > MAX_CLOSE_REASON - 4 or cut == reason


class _Session(JsonSession):
    STATE_OPEN = 1

    def __init__(self) -> None:
        self.state = self.STATE_OPEN
        self.sent: list[Any] = []
        self.closed: list[tuple[int, str]] = []
        self.handling = True
        self.reported: list[str] = []

    def sendMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sent.append((payload, isBinary))

    def sendClose(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))
        self.state = 2

    def violation_message(self, text: str) -> dict[str, Any]:
        return {"type": "protocol_error", "message": text}

    def log_violation(self, text: str) -> None:
        self.reported.append(text)


def test_a_violation_is_reported_sent_and_closes_with_4000() -> None:
    session = _Session()
    session.violation("bad")
    assert session.reported == ["bad"]
    assert session.sent == [(b'{"type":"protocol_error","message":"bad"}', False)]
    assert session.closed == [(4000, "protocol violation")] and not session.handling
    assert session.send({"type": "x"}) is False  # closed: nothing more is sent
    session.close(4000, "again")
    assert len(session.closed) == 1


def _allowed(code: int) -> bool:
    return code == 1000 or 3000 <= code <= 4999


def test_every_literal_close_code_is_one_autobahn_accepts() -> None:
    """Autobahn's ``sendClose`` raises for any code but 1000 and 3000-4999 (1001-1015 are
    the implementation's): a literal code in a ``sendClose`` call, a member of a
    ``*CloseCode`` enum or a value of a ``*CLOSE_CODES`` table must be one of those."""
    root = Path(treadmill.__file__).parent
    wrong = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            codes: list[ast.AST] = []
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "sendClose" and node.args:
                codes = list(ast.walk(node.args[0]))
            elif isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id.endswith("CLOSE_CODES") for t in node.targets):
                codes = list(ast.walk(node.value))
            elif isinstance(node, ast.ClassDef) and node.name.endswith("CloseCode"):
                codes = [stmt.value for stmt in node.body if isinstance(stmt, ast.Assign)]
            for code in codes:
                if isinstance(code, ast.Constant) and type(code.value) is int \
                        and not _allowed(code.value):
                    wrong.append(f"{path.relative_to(root.parent)}:{code.lineno}: {code.value}")
    assert not wrong, wrong


class _Server(JsonSession, WebSocketServerProtocol):
    log = QuietLogger(namespace="tests.wsjson")


class _Client(JsonSession, WebSocketClientProtocol):
    log = QuietLogger(namespace="tests.wsjson")


@pytest.mark.parametrize(("protocol", "factory", "options"), [
    (_Server, WebSocketServerFactory, autobahn_protocol.WebSocketServerProtocol.CONFIG_ATTRS),
    (_Client, lambda: WebSocketClientFactory("ws://h/"),
     autobahn_protocol.WebSocketClientProtocol.CONFIG_ATTRS)])
def test_a_session_takes_its_factorys_options_without_autobahn_printing_them(
        protocol: type, factory: Any, options: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    made = factory()
    made.protocol = protocol
    made.setProtocolOptions(autoPingInterval=7.0, maxMessagePayloadSize=1234)
    printed: list[Any] = []
    monkeypatch.setattr(autobahn_protocol, "pformat", lambda value: printed.append(value))
    session = made.buildProtocol(None)
    session.maxFramePayloadSize = 99  # set on the protocol: kept, as Autobahn would
    session.makeConnection(StringTransport())
    assert (session.autoPingInterval, session.maxMessagePayloadSize) == (7.0, 1234)
    assert session.maxFramePayloadSize == 99
    assert len(options) > 20
    assert all(name in vars(session) for name in options)
    # Autobahn's list of the options it copied: empty (a client's handshake also
    # prints its transport, a dict).
    assert [value for value in printed if isinstance(value, list)] in ([], [[]])


def test_a_session_binds_its_logger_once() -> None:
    factory = WebSocketServerFactory()
    factory.protocol = _Server
    session = factory.buildProtocol(None)
    assert session.log is session.log  # not a new Logger at each read
    assert session.log.source is session
    assert isinstance(session.log, QuietLogger)


def test_a_session_builds_no_debug_line_for_a_read_or_its_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Autobahn formats the arguments of a debug line (``hltype``) for every read and at
    the end of every connection; a session skips those lines (the quiet logger drops them).
    (Its one line when the connection is made is still built.)"""
    def formatted(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("a debug line's arguments were built")

    factory = WebSocketServerFactory()
    factory.protocol = _Server
    session = factory.buildProtocol(None)
    session.makeConnection(StringTransport())
    monkeypatch.setattr(autobahn_twisted, "hltype", formatted)
    monkeypatch.setattr(autobahn_twisted, "hlval", formatted)
    session.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n")  # half an upgrade: buffered
    session.connectionLost(Failure(ConnectionDone()))
    assert session.state == session.STATE_CLOSED


def test_a_session_still_logs_a_tls_failure_as_an_error() -> None:
    factory = WebSocketServerFactory()
    factory.protocol = _Server
    session = factory.buildProtocol(None)
    session.makeConnection(StringTransport())
    with capturedLogs() as events:
        session.connectionLost(Failure(SSL.Error([("SSL routines", "", "bad record mac")])))
    assert [e["log_level"] for e in events] == [LogLevel.error]
    assert session.state == session.STATE_CLOSED
