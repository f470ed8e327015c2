"""``splice.DirectTCPEndpoint`` on the real reactor and loopback TCP: a loopback connect
is finished before ``connect`` returns; one still under way (a listener whose accept
queue is full drops the SYN) waits for the socket, times out or is cancelled with its
socket closed; refusals fail as the reactor's connector fails."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import error, reactor
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from tests.util.waiting import eventually
from treadmill.common.eager import plain
from treadmill.common.splice import DirectTCPEndpoint, direct_endpoint


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class OneShot(Factory):
    def __init__(self, protocol: Protocol):
        self.protocol_instance = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self.protocol_instance


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


@pytest.fixture
def full() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A listener with an accept queue of one, already holding one connection: a new
    connect to it stays under way until that one is accepted."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    first = socket.create_connection(sock.getsockname(), timeout=5)
    yield sock, first
    first.close()
    sock.close()


@pytest_twisted.ensureDeferred
async def test_a_loopback_connect_is_done_before_connect_returns(listener):
    host, port = listener.getsockname()
    protocol = Recorder()
    connecting = DirectTCPEndpoint(reactor, host, port, 5).connect(OneShot(protocol))
    assert connecting.called and protocol.made  # no reactor turn in between
    assert await connecting is protocol
    assert plain(protocol.transport)  # the reactor's own TCP transport: eager writes apply
    server, _ = listener.accept()
    server.setblocking(False)
    got = []

    def received() -> bool:
        try:
            got.append(server.recv(4))
        except BlockingIOError:
            return False
        return True

    try:
        protocol.transport.write(b"ping")
        await eventually(received)
        assert got == [b"ping"]
        server.sendall(b"pong")
        await eventually(lambda: protocol.data == b"pong")
        assert protocol.transport.getPeer().port == port
    finally:
        protocol.transport.abortConnection()
        server.close()


@pytest_twisted.ensureDeferred
async def test_a_refused_connect_fails_as_the_connectors_do():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(error.ConnectionRefusedError):
            await DirectTCPEndpoint(reactor, "127.0.0.1", port, 5).connect(OneShot(Recorder()))


@pytest_twisted.ensureDeferred
async def test_a_connect_under_way_waits_for_the_socket(full):
    sock, _ = full
    protocol = Recorder()
    connecting = DirectTCPEndpoint(reactor, *sock.getsockname(), 10).connect(OneShot(protocol))
    assert not connecting.called and not protocol.made
    sock.accept()[0].close()  # room in the queue: the SYN's retransmission gets in
    assert await connecting is protocol and protocol.made
    protocol.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_a_connect_under_way_times_out_and_closes_its_socket(full):
    sock, _ = full
    endpoint = DirectTCPEndpoint(reactor, *sock.getsockname(), 0.2)
    connecting = endpoint.connect(OneShot(Recorder()))
    waiting = [w for w in reactor.getWriters() if type(w).__name__ == "_Connecting"]
    assert len(waiting) == 1
    with pytest.raises(error.TimeoutError):
        await connecting
    assert waiting[0] not in reactor.getWriters()
    assert waiting[0].sock is None and waiting[0].fileno() == -1


@pytest_twisted.ensureDeferred
async def test_a_cancelled_connect_closes_its_socket(full):
    sock, _ = full
    connecting = DirectTCPEndpoint(reactor, *sock.getsockname(), 10).connect(OneShot(Recorder()))
    [waiting] = [w for w in reactor.getWriters() if type(w).__name__ == "_Connecting"]
    connecting.cancel()
    with pytest.raises(error.ConnectingCancelledError):
        await connecting
    assert waiting not in reactor.getWriters() and waiting.sock is None


def test_direct_endpoint_only_for_ip_literals_on_a_real_reactor():
    assert isinstance(direct_endpoint(reactor, "127.0.0.1", 1, 1), DirectTCPEndpoint)
    six = direct_endpoint(reactor, "::1", 1, 1)
    assert isinstance(six, DirectTCPEndpoint) and six.family == socket.AF_INET6
    assert isinstance(direct_endpoint(reactor, "localhost", 1, 1), HostnameEndpoint)
    assert isinstance(direct_endpoint(MemoryReactorClock(), "127.0.0.1", 1, 1),
                      TCP4ClientEndpoint)
