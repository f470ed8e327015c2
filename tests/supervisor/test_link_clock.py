"""The link's reconnection timing on a ``MemoryReactorClock``: no real time passes.

The real-time end-to-end checks (a switchboard going away, a dead peer found by
heartbeats, close codes) are in ``test_link.py``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
from typing import Any

import pytest
from autobahn.websocket import protocol as autobahn_protocol
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.link import SupervisorLink


class Handler:
    """A ``LinkHandler`` that records nothing: no session ever opens here."""

    def link_opened(self, session: Any) -> None:
        raise AssertionError("no session opens on a refused connection")

    def link_closed(self, session: Any) -> None:
        raise AssertionError("no session opens on a refused connection")

    def on_message(self, session: Any, message: Any) -> None:
        raise AssertionError("no session opens on a refused connection")


def refuse_attempts(reactor: MemoryReactorClock, count: int, horizon: float = 600.0
                    ) -> list[float]:
    """Refuse the next ``count`` connection attempts; the times at which they were made."""
    times: list[float] = []
    while len(times) < count:
        reactor.advance(0)
        if not reactor.tcpClients:
            calls = reactor.getDelayedCalls()
            assert calls, "no attempt and no retry scheduled"
            reactor.advance(min(c.getTime() for c in calls) - reactor.seconds())
            assert reactor.seconds() < horizon
            continue
        _, _, factory, _, _ = reactor.tcpClients.pop(0)
        connector = reactor.connectors.pop(0)
        times.append(reactor.seconds())
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
    return times


def gaps(times: list[float]) -> list[float]:
    """The reconnection delays between attempts made at ``times``: an address is dialled
    directly, so a refused attempt is reported at once (HostnameEndpoint, for a name,
    reports it only after its attempt delay)."""
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


@pytest.mark.parametrize("jitter, expected", [
    (0.0, [1.0, 2.0, 4.0, 8.0, 8.0]),      # doubling from reconnect_initial to reconnect_max
    (0.5, [1.5, 2.5, 4.5, 8.5, 8.5]),      # plus jitter in proportion to reconnect_initial
])
def test_refused_connections_back_off_exponentially(jitter: float, expected: list[float]
                                                    ) -> None:
    reactor = MemoryReactorClock()
    link = SupervisorLink(reactor, "ws://127.0.0.1:9/", "host-token", Handler(),
                          reconnect_initial=1.0, reconnect_max=8.0, jitter=lambda: jitter)
    link.startService()
    assert gaps(refuse_attempts(reactor, 6)) == expected
    assert link.session is None and link.failures == 0  # refusals are not handshake failures
    link.stopService()


class Transport(StringTransport):
    """A transport for a connection that Autobahn drops (it unregisters a producer it may
    not have registered)."""

    def unregisterProducer(self) -> None:
        self.producer = None


def next_connection(reactor: MemoryReactorClock) -> tuple[Any, Transport, float]:
    """Wait (on the clock) for the next TCP attempt and accept it: its protocol, its
    transport holding the upgrade request, and the time of the attempt."""
    while not reactor.tcpClients:
        calls = reactor.getDelayedCalls()
        assert calls, "no attempt and no retry scheduled"
        reactor.advance(max(0.0, min(c.getTime() for c in calls) - reactor.seconds()))
    _, _, factory, _, _ = reactor.tcpClients.pop(0)
    reactor.connectors.pop(0)
    at = reactor.seconds()
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9))
    transport = Transport()
    proto.makeConnection(transport)
    reactor.advance(0)
    assert transport.value().startswith(b"GET " + protocol.PATH.encode() + b" HTTP/1.1\r\n")
    return proto, transport, at


def refuse_handshake(reactor: MemoryReactorClock, status: bytes, headers: bytes = b""
                     ) -> float:
    """Accept the next TCP connection and answer its WebSocket upgrade with ``status``
    (and raw ``headers`` lines); the time of the attempt."""
    proto, _, at = next_connection(reactor)
    proto.dataReceived(b"HTTP/1.1 " + status + b"\r\n" + headers
                       + b"Content-Length: 0\r\n\r\n")
    proto.connectionLost(Failure(ConnectionDone()))
    return at


def accept_handshake(reactor: MemoryReactorClock) -> tuple[Any, float]:
    """Accept the next connection's WebSocket upgrade (as a switchboard of this minor
    does); the open protocol and the time of the attempt."""
    proto, transport, at = next_connection(reactor)
    key = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)", transport.value())
    assert key is not None
    accept = base64.b64encode(hashlib.sha1(key.group(1) + WS_GUID).digest())
    proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n"
                       b"Sec-WebSocket-Protocol: " + protocol.SUBPROTOCOL.encode() + b"\r\n"
                       + protocol.MINOR_HEADER.encode() + b": "
                       + str(protocol.MINOR).encode() + b"\r\n\r\n")
    return proto, at


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's accept-key suffix


def delays(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


@pytest.mark.parametrize("retry_after, jitter, expected", [
    # At least Retry-After, doubling with each 503 in a row, up to BUSY_BACKOFF_MAX ...
    (b"Retry-After: 1\r\n", 0.0, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]),
    # ... times one plus the jitter, so a refused fleet does not come back at once.
    (b"Retry-After: 1\r\n", 0.5, [1.5, 3.0, 6.0, 12.0, 12.0, 12.0, 12.0]),
    # A longer Retry-After is obeyed, even beyond BUSY_BACKOFF_MAX.
    (b"Retry-After: 5\r\n", 0.0, [5.0, 5.0, 5.0, 8.0, 8.0, 8.0, 8.0]),
    (b"Retry-After: 20\r\n", 0.0, [20.0] * 7),
    # A 503 without Retry-After (the database is away): the doubling alone.
    (b"", 0.0, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]),
    # Nonsense (an HTTP date, a negative number) is not obeyed.
    (b"Retry-After: -3\r\n", 0.0, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]),
])
def test_busy_switchboards_are_retried_after_retry_after_with_backoff_and_jitter(
        retry_after: bytes, jitter: float, expected: list[float]) -> None:
    reactor = MemoryReactorClock()
    link = SupervisorLink(reactor, "ws://127.0.0.1:9/", "host-token", Handler(),
                          reconnect_initial=1.0, reconnect_max=60.0, jitter=lambda: jitter)
    link.startService()
    times = [refuse_handshake(reactor, b"503 Service Unavailable", retry_after)
             for _ in range(8)]
    assert delays(times) == expected
    assert link.last_close is not None and link.last_close.http_status == 503
    link.stopService()


def test_a_503_is_logged_at_info_and_other_refusals_still_warn() -> None:
    """A fleet refused thousands of times must not write thousands of warnings."""
    reactor = MemoryReactorClock()
    link = SupervisorLink(reactor, "ws://127.0.0.1:9/", "host-token", Handler(),
                          reconnect_initial=1.0, reconnect_max=60.0, jitter=lambda: 0.0)
    link.startService()
    with capturedLogs() as events:
        refuse_handshake(reactor, b"503 Service Unavailable", b"Retry-After: 1\r\n")
    assert [e for e in events if e["log_level"] >= LogLevel.warn] == []
    assert [e for e in events if e["log_level"] == LogLevel.info
            and e.get("log_namespace") == "treadmill.supervisor.link.SupervisorLink"]
    with capturedLogs() as events:
        refuse_handshake(reactor, b"502 Bad Gateway")
    warned = {e.get("log_namespace") for e in events if e["log_level"] == LogLevel.warn}
    assert warned == {"treadmill.supervisor.link.SupervisorProtocol",
                      "treadmill.supervisor.link.SupervisorLink"}, warned
    link.stopService()


class Opened(Handler):
    """A ``LinkHandler`` that lets sessions open and counts them."""

    def __init__(self) -> None:
        self.opened = 0

    def link_opened(self, session: Any) -> None:
        self.opened += 1

    def link_closed(self, session: Any) -> None:
        pass


def test_a_lost_link_is_retried_within_reconnect_initial_even_after_503s() -> None:
    """Failover stays fast: busy refusals before a session do not slow the first retry
    after that session is lost, and a 503 then starts its doubling afresh."""
    reactor = MemoryReactorClock()
    handler = Opened()
    link = SupervisorLink(reactor, "ws://127.0.0.1:9/", "host-token", handler,
                          reconnect_initial=1.0, reconnect_max=60.0, jitter=lambda: 0.25)
    link.startService()
    times = [refuse_handshake(reactor, b"503 Service Unavailable", b"Retry-After: 1\r\n")
             for _ in range(4)]
    proto, opened_at = accept_handshake(reactor)
    assert handler.opened == 1 and link.session is not None
    assert delays([*times, opened_at]) == [1.25, 2.5, 5.0, 10.0]
    reactor.advance(3.0)  # a while connected, then the instance dies (kill -9)
    lost_at = reactor.seconds()
    proto.connectionLost(Failure(ConnectionLost()))
    assert link.session is None and link.last_close is not None
    retried_at = refuse_handshake(reactor, b"503 Service Unavailable", b"Retry-After: 1\r\n")
    assert round(retried_at - lost_at, 6) == 0.25  # the jitter alone, below reconnect_initial
    again = refuse_handshake(reactor, b"503 Service Unavailable", b"Retry-After: 1\r\n")
    assert round(again - retried_at, 6) == 1.25  # Retry-After: the doubling starts afresh
    third = refuse_handshake(reactor, b"503 Service Unavailable", b"Retry-After: 1\r\n")
    assert round(third - again, 6) == 2.5
    link.stopService()


def close_frame(code: int) -> bytes:
    """A switchboard's (unmasked) close frame with ``code`` and no reason."""
    return b"\x88\x02" + code.to_bytes(2, "big")


def end_session(proto: Any, code: int | None) -> None:
    """The switchboard ends an open session: with a close frame of ``code`` and then the
    TCP connection, or (``None``) the connection drops (kill -9, code 1006)."""
    if code is None:
        proto.connectionLost(Failure(ConnectionLost()))
        return
    proto.dataReceived(close_frame(code))
    proto.connectionLost(Failure(ConnectionDone()))


def linked(initial: float, jitter: float) -> tuple[MemoryReactorClock, SupervisorLink, Any]:
    """A started link (``reconnect_initial``, a fixed ``jitter``) with an open session:
    the clock, the link and the session's protocol."""
    reactor = MemoryReactorClock()
    link = SupervisorLink(reactor, "ws://127.0.0.1:9/", "host-token", Opened(),
                          reconnect_initial=initial, reconnect_max=60.0, jitter=lambda: jitter)
    link.startService()
    proto, _ = accept_handshake(reactor)
    return reactor, link, proto


@pytest.mark.parametrize("jitter", [0.0, 0.3, 0.999])
@pytest.mark.parametrize("code", [None, 1000, int(protocol.CloseCode.GOING_AWAY)])
def test_after_a_session_ends_the_first_attempt_is_fully_jittered(
        code: int | None, jitter: float) -> None:
    """After a session that ended normally (dropped, closed, the switchboard going away)
    the first attempt comes after a random delay in [0, reconnect_initial) (full
    jitter); when it fails, the delays grow as after any failed attempt."""
    reactor, link, proto = linked(0.5, jitter)
    reactor.advance(10.0)
    lost_at = reactor.seconds()
    end_session(proto, code)
    assert link.session is None and link.failures == 0
    times = refuse_attempts(reactor, 4)
    assert delays([lost_at, *times]) == [
        round(jitter * 0.5, 6), *(round(d + jitter * 0.5, 6) for d in (1.0, 2.0, 4.0))]
    link.stopService()


@pytest.mark.parametrize("code", [protocol.CloseCode.SUPERSEDED,
                                  protocol.CloseCode.HOST_REMOVED,
                                  protocol.CloseCode.INTERNAL_ERROR])
def test_a_session_closed_for_a_fault_is_not_retried_early(code: int) -> None:
    """A session the switchboard closed as a failure (4002, 4004, 4003) waits a grown
    delay, as any failure does: no full jitter there."""
    reactor, link, proto = linked(0.5, 0.5)
    closed_at = reactor.seconds()
    end_session(proto, int(code))
    assert link.failures == 1
    _, next_at = accept_handshake(reactor)
    assert round(next_at - closed_at, 6) == 1.25  # backoff(1): 2 x initial + jitter
    link.stopService()


def test_a_refused_first_attempt_after_a_lost_session_backs_off() -> None:
    """Only the first attempt after a lost session is early: when the switchboard refuses
    its upgrade (401), the next waits the grown delay."""
    reactor, link, proto = linked(1.0, 0.5)
    lost_at = reactor.seconds()
    end_session(proto, None)
    first = refuse_handshake(reactor, b"401 Unauthorized")
    second = refuse_handshake(reactor, b"401 Unauthorized")
    assert delays([lost_at, first, second]) == [0.5, 2.5]
    link.stopService()


def test_refused_upgrades_back_off_by_their_count() -> None:
    """Each refused WebSocket upgrade (a wrong token: 401) doubles the next delay; a
    refusal that says the switchboard does not speak the protocol (400) slows down at once."""
    reactor = MemoryReactorClock()
    link = SupervisorLink(reactor, "ws://127.0.0.1:9/", "host-token", Handler(),
                          reconnect_initial=1.0, reconnect_max=60.0, jitter=lambda: 0.0)
    link.startService()
    times = [refuse_handshake(reactor, b"401 Unauthorized") for _ in range(4)]
    assert [round(b - a, 6) for a, b in itertools.pairwise(times)] == [2.0, 4.0, 8.0]
    assert link.failures == 4 and link.last_close is not None
    assert link.last_close.http_status == 401
    times = [times[-1], refuse_handshake(reactor, b"400 Bad Request")]
    assert link.last_close.http_status == 400
    times.append(refuse_handshake(reactor, b"401 Unauthorized"))
    assert round(times[2] - times[1], 6) == 60.0  # given up fast: the longest delay
    link.stopService()


def test_an_attempt_sends_the_upgrade_without_printing_or_logging_per_attempt(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each attempt's upgrade carries the token, the subprotocol and our minor; building it
    pretty-prints nothing (Autobahn's debug line of the transport) and the factory logs
    no "Starting factory" / "Stopping factory" lines (thousands in a failover)."""
    printed: list[Any] = []
    monkeypatch.setattr(autobahn_protocol, "pformat", lambda value: printed.append(value))
    reactor = MemoryReactorClock()
    link = SupervisorLink(reactor, "ws://127.0.0.1:9/", "host-token", Opened(),
                          reconnect_initial=1.0, reconnect_max=60.0, jitter=lambda: 0.5)
    with capturedLogs() as events:
        link.startService()
        proto, transport, _ = next_connection(reactor)
        proto.connectionLost(Failure(ConnectionLost()))
        reactor.advance(0)
    request = transport.value()
    assert b"\r\nAuthorization: Bearer host-token\r\n" in request
    assert b"\r\nSec-WebSocket-Protocol: " + protocol.SUBPROTOCOL.encode() + b"\r\n" in request
    assert (b"\r\n" + protocol.MINOR_HEADER.lower().encode() + b": "
            + str(protocol.MINOR).encode() + b"\r\n") in request.lower()
    assert b"\r\nHost: 127.0.0.1:9\r\n" in request
    assert [value for value in printed if isinstance(value, dict)] == []  # no transport
    assert not [e for e in events if "factory" in str(e.get("log_format", "")).lower()]
    link.stopService()


def client_frames(transport: Transport) -> list[tuple[int, bytes]]:
    """The (masked) frames the link wrote since the last call: (opcode, payload) each."""
    data, frames = transport.value(), []
    transport.clear()
    while data:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        assert data[1] & 0x80 and length < 126  # masked, short: pings, pongs, closes
        mask, payload = data[2:6], data[6:6 + length]
        frames.append((opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))))
        data = data[6 + length:]
    return frames


def heartbeat_link(interval: float, timeout: float
                   ) -> tuple[MemoryReactorClock, SupervisorLink, Any, Transport]:
    """A started link with ``heartbeat_interval``/``heartbeat_timeout`` and an open
    session at time 0: the clock, the link, the session and its transport."""
    reactor = MemoryReactorClock()
    link = SupervisorLink(reactor, "ws://127.0.0.1:9/", "host-token", Opened(),
                          heartbeat_interval=interval, heartbeat_timeout=timeout,
                          reconnect_initial=1.0, reconnect_max=60.0, jitter=lambda: 0.0)
    link.startService()
    accept_handshake(reactor)
    session = link.session
    assert session is not None
    session.transport.clear()
    return reactor, link, session, session.transport


def test_a_sub_second_heartbeat_pings_once_per_interval() -> None:
    """``heartbeat.interval = 0.3``: a ping every 0.3 s, each answered at once; txaio's
    batched timer (Autobahn's default) sent the next the moment a pong came back."""
    reactor, link, proto, transport = heartbeat_link(0.3, 2.0)
    pings: list[float] = []
    for step in range(1, 301):  # 3 s in steps of 10 ms
        reactor.advance(step / 100 - reactor.seconds())
        for opcode, payload in client_frames(transport):
            assert opcode == 0x9
            pings.append(reactor.seconds())
            proto.dataReceived(b"\x8a" + bytes([len(payload)]) + payload)  # the pong
    assert pings == pytest.approx([0.3 * n for n in range(1, 11)], abs=0.01)
    assert link.session is proto
    link.stopService()


def test_a_heartbeat_timeout_drops_the_link_at_its_deadline() -> None:
    """``heartbeat.timeout = 2.5``: a switchboard that does not answer the ping (sent at
    1.2 s) is dropped 2.5 s after it, at 3.7 s (txaio: the ping at 1 s, the drop at 3 s)."""
    reactor, link, proto, transport = heartbeat_link(1.2, 2.5)
    reactor.advance(1.19)
    assert client_frames(transport) == []
    reactor.advance(1.2 - reactor.seconds())
    assert [opcode for opcode, _ in client_frames(transport)] == [0x9]
    reactor.advance(3.69 - reactor.seconds())
    assert not transport.disconnecting and link.session is proto
    reactor.advance(3.7 - reactor.seconds())
    assert transport.disconnecting  # aborted: the TCP connection is dropped
    link.stopService()
