"""The link's reconnection timing on a ``MemoryReactorClock``: no real time passes.

The real-time end-to-end checks (a switchboard going away, a dead peer found by
heartbeats, close codes) are in ``test_link.py``.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
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


# HostnameEndpoint reports a refused attempt once its attempt delay has passed.
REPORTED_AFTER = HostnameEndpoint._DEFAULT_ATTEMPT_DELAY


def gaps(times: list[float]) -> list[float]:
    """The reconnection delays between attempts made at ``times``."""
    return [round(b - a - REPORTED_AFTER, 6) for a, b in itertools.pairwise(times)]


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


def refuse_handshake(reactor: MemoryReactorClock, status: bytes) -> float:
    """Accept the next TCP connection and answer its WebSocket upgrade with ``status``;
    the time of the attempt."""
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
    proto.dataReceived(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
    proto.connectionLost(Failure(ConnectionDone()))
    return at


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
