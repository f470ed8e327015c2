"""A console stays open only while it holds a valid token, on a Clock: closed with 4401 at
its token's ``exp`` plus ``console_grace`` unless the client sent a renewal (a new console
token, a text message) for the same user and job; a renewal may lower the access, never
raise it (docs/proxy.md, "Consoles")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from tests.proxy.support import AUDIENCE, Keys, new_job
from tests.util.captokens import ISSUER
from treadmill.common.captoken import CapabilityVerifier, parse_jwks
from treadmill.common.splice import EOF
from treadmill.protocol.proxy import ConsoleCloseCode
from treadmill.proxy.legs import TunnelSocket
from treadmill.proxy.tunnels import Tunnel, TunnelConfig, TunnelTable

GRACE = 30.0
TTL = 300.0
START = 1_800_000_000.0  # the clock's epoch seconds (tokens carry real-looking times)


class Control:
    """The job's control connection: console notices are recorded."""

    job = ""
    minor = 2

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> bool:
        self.sent.append(message)
        return True

    def close(self, code: int, reason: str) -> None:
        pass


class Sink:
    """The service's side of the splice: what the console typed."""

    def __init__(self) -> None:
        self.typed = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        self.typed += data

    def send_eof(self) -> None:
        self.eof = True


class Console(TunnelSocket):
    """An open console socket whose close frames are recorded; joined to a :class:`Sink`
    as soon as its token is accepted."""

    def __init__(self, registry: TunnelTable, tunnel: Tunnel) -> None:
        super().__init__()
        self.factory = type("Factory", (), {"registry": registry})()  # type: ignore[assignment]
        self.tunnel = tunnel
        self.state = self.STATE_OPEN
        self.half_close = True
        self.frames: list[tuple[int | None, bytes | None]] = []
        self.sink = Sink()

    def _arrive(self) -> None:
        self.other = self.sink  # type: ignore[assignment]

    def sendCloseFrame(self, code: Any = None, reasonUtf8: Any = None,
                       isReply: bool = False) -> None:
        self.frames.append((code, reasonUtf8))
        self.state = self.STATE_CLOSING

    def text(self, token: str) -> None:
        self.onMessage(token.encode(), False)


class Bed:
    """A registry on a Clock with one job's console tunnel, and the switchboard's key."""

    def __init__(self, directory: Path) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.keys = Keys(directory)
        verifier = CapabilityVerifier(parse_jwks(json.loads(self.keys.keys_file.read_text())),
                                      ISSUER, AUDIENCE, self.clock)
        self.registry = TunnelTable(self.clock, TunnelConfig(ports=None, console_grace=GRACE),
                                    verifier, public_factory=lambda tunnel: None,
                                    data_port=lambda: 8091)
        self.job = new_job()
        self.control = Control()
        self.control.job = self.job
        session = self.registry.attach(self.control, "host-1", "token")
        self.tunnel = session.tunnels["console"] = Tunnel(session, "console")

    def token(self, *actions: str, subject: str = "alice", job: str | None = None) -> str:
        return self.keys.token(job or self.job, actions=actions, subject=subject, ttl=TTL,
                               issued_at=self.clock.seconds())

    def opened(self, *actions: str) -> Console:
        socket = Console(self.registry, self.tunnel)
        socket.onOpen()  # no token in the request: the first text message
        socket.text(self.token(*actions))
        assert socket.frames == [] and socket.access is not None
        return socket


@pytest.fixture
def bed(tmp_path: Path) -> Bed:
    return Bed(tmp_path)


def test_a_console_without_a_renewal_closes_at_its_tokens_expiry_plus_the_grace(
        bed: Bed) -> None:
    socket = bed.opened("read", "manage")
    bed.clock.advance(TTL + GRACE - 1)
    socket.onMessage(b"still here", True)
    assert socket.frames == [] and socket.sink.typed == b"still here"
    bed.clock.advance(1)
    assert socket.frames == [(ConsoleCloseCode.UNAUTHORIZED, b"console token expired")]
    assert bed.registry.counts["console_expired"] == 1


def test_renewals_keep_a_console_open_across_token_lifetimes(bed: Bed) -> None:
    socket = bed.opened("read", "manage")
    for _ in range(3):
        bed.clock.advance(TTL - 60)
        socket.text(bed.token("read", "manage"))
    bed.clock.advance(TTL + GRACE - 1)  # the last renewal's exp + grace, less a second
    socket.onMessage(b"typed", True)
    assert socket.frames == [] and socket.sink.typed == b"typed"
    assert socket.access == "manage" and bed.registry.counts["console_renewed"] == 3
    bed.clock.advance(1)
    assert socket.frames == [(ConsoleCloseCode.UNAUTHORIZED, b"console token expired")]


def test_eof_is_still_a_half_close_not_a_renewal(bed: Bed) -> None:
    socket = bed.opened("read", "manage")
    socket.onMessage(EOF, False)
    assert socket.sink.eof and socket.frames == []
    assert bed.registry.counts["console_renewed"] == 0
    socket.text(bed.token("read", "manage"))  # a renewal after its own eof still counts
    assert socket.frames == [] and bed.registry.counts["console_renewed"] == 1


@pytest.mark.parametrize(("case", "code"), [
    ("another job's", ConsoleCloseCode.FORBIDDEN),
    ("another user's", ConsoleCloseCode.FORBIDDEN),
    ("a publish token", ConsoleCloseCode.FORBIDDEN),
    ("expired", ConsoleCloseCode.UNAUTHORIZED),
    ("not a token", ConsoleCloseCode.UNAUTHORIZED),
])
def test_a_bad_renewal_closes_the_console(bed: Bed, case: str, code: int) -> None:
    socket = bed.opened("read", "manage")
    bed.clock.advance(60)
    token = {
        "another job's": lambda: bed.token("read", "manage", job=new_job()),
        "another user's": lambda: bed.token("read", "manage", subject="mallory"),
        "a publish token": lambda: bed.token("publish"),
        "expired": lambda: bed.keys.token(bed.job, actions=("read", "manage"),
                                          subject="alice", ttl=10,
                                          issued_at=bed.clock.seconds() - 60),
        "not a token": lambda: "let me stay",
    }[case]()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        socket.text(token)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [frame[0] for frame in socket.frames] == [code]
    refused = [e for e in events if e.get("audit_event") == "console_refused"]
    assert len(refused) == 1 and refused[0]["reason"].startswith("renewal_"), refused
    assert bed.registry.counts["console_renewed"] == 0
    assert bed.registry.counts["console_refused"] == 1


def test_a_read_renewal_stops_typing_at_once_and_never_raises_again(bed: Bed) -> None:
    socket = bed.opened("read", "manage")
    socket.onMessage(b"ls\n", True)
    socket.text(bed.token("read"))
    assert socket.access == "read" and socket.frames == []
    socket.onMessage(b"rm -rf /\n", True)
    socket.text(bed.token("read", "manage"))  # kept open, but read: no raising
    socket.onMessage(b"reboot\n", True)
    assert socket.access == "read" and socket.frames == []
    assert socket.sink.typed == b"ls\n"
    assert bed.registry.counts["console_input_dropped"] == 2
    assert bed.registry.counts["console_renewed"] == 2


def test_a_read_console_renews_too(bed: Bed) -> None:
    socket = bed.opened("read")
    bed.clock.advance(TTL)
    socket.text(bed.token("read"))
    bed.clock.advance(TTL)
    assert socket.frames == [] and socket.access == "read"


def test_renewals_and_expiries_are_recorded(bed: Bed) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        socket = bed.opened("read", "manage")
        renewal = bed.token("read")
        socket.text(renewal)
        bed.clock.advance(TTL + GRACE)
    finally:
        globalLogPublisher.removeObserver(events.append)
    audit = [e for e in events if e.get("audit_event")]
    assert [(e["audit_event"], e["subject"], e["access"]) for e in audit] == [
        ("console_opened", "alice", "manage"), ("console_renewed", "alice", "read"),
        ("console_expired", "alice", "read")]
    assert {e["log_namespace"] for e in audit} == {"treadmill.proxy.consoles"}
    assert audit[1]["jti"] != audit[0]["jti"] and audit[1]["job"] == bed.job
    assert not [e for e in events if renewal in repr(e)]  # no token in any log event
    assert socket.frames == [(ConsoleCloseCode.UNAUTHORIZED, b"console token expired")]
