"""Eager writes (``treadmill.common.eager``) on real loopback TCP connections: bytes and
half-closes leave at once when nothing is buffered, never ahead of buffered bytes, and
what a full socket does not take stays with the transport (and its backpressure)."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from tests.util.waiting import eventually
from treadmill.common.eager import buffered, plain, shut_write_now, write_now

MiB = 1024 * 1024


@implementer(IHalfCloseableProtocol)
class Held(Protocol):
    """The server's side: what it read, and when its write side was shut."""

    def __init__(self) -> None:
        self.data = b""
        self.write_lost = False
        self.read_lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.read_lost = True

    def writeConnectionLost(self) -> None:
        self.write_lost = True


class Pair:
    """A Twisted server connection and a plain socket as its peer."""

    def __init__(self, server: Held, peer: socket.socket):
        self.server = server
        self.peer = peer
        self.read = b""
        self.eof = False

    @property
    def transport(self) -> Any:
        return self.server.transport

    def drain(self) -> bool:
        """Read what the peer has (without blocking); whether it saw an end of file."""
        while True:
            try:
                chunk = self.peer.recv(4 * MiB, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return self.eof
            if not chunk:
                self.eof = True
                return True
            self.read += chunk


@pytest_twisted.async_yield_fixture
async def pair() -> AsyncIterator[Pair]:
    accepted: list[Held] = []

    def build() -> Held:
        held = Held()
        accepted.append(held)
        return held

    listener = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
    peer = socket.create_connection(("127.0.0.1", listener.getHost().port))
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        await eventually(lambda: accepted and accepted[0].transport is not None)
        yield Pair(accepted[0], peer)
    finally:
        peer.close()
        for held in accepted:
            held.transport.abortConnection()
        await listener.stopListening()


def writing(transport: Any) -> bool:
    return transport in reactor.getWriters()


@pytest_twisted.ensureDeferred
async def test_bytes_leave_at_once_without_waiting_for_the_reactor(pair: Pair) -> None:
    assert plain(pair.transport)
    write_now(pair.transport, b"hello")
    # Already on the wire: nothing buffered, no turn of the reactor asked for.
    assert buffered(pair.transport) == 0 and not writing(pair.transport)
    pair.drain()
    assert pair.read == b"hello"


@pytest_twisted.ensureDeferred
async def test_bytes_never_overtake_buffered_ones(pair: Pair) -> None:
    pair.transport.write(b"first ")  # buffered until the reactor writes it
    write_now(pair.transport, b"second")
    assert buffered(pair.transport) == len(b"first second")
    await eventually(lambda: pair.drain() or pair.read == b"first second")
    assert pair.read == b"first second"


@pytest_twisted.ensureDeferred
async def test_what_a_full_socket_does_not_take_stays_buffered_in_order(pair: Pair) -> None:
    """A peer that reads nothing: the socket takes what fits, the transport keeps the
    rest (its producer would be paused), and the peer gets every byte in order."""
    block = bytes(range(256)) * (32 * 1024)  # 8 MiB
    write_now(pair.transport, block)
    assert 0 < buffered(pair.transport) < len(block)
    assert writing(pair.transport)
    digest = hashlib.sha256()
    got = 0

    def all_read() -> bool:
        nonlocal got
        pair.drain()
        digest.update(pair.read)
        got += len(pair.read)
        pair.read = b""
        return got == len(block)

    await eventually(all_read, timeout=20)
    assert digest.digest() == hashlib.sha256(block).digest()
    await eventually(lambda: not writing(pair.transport))


@pytest_twisted.ensureDeferred
async def test_a_half_close_leaves_at_once_and_reading_goes_on(pair: Pair) -> None:
    write_now(pair.transport, b"bye")
    shut_write_now(pair.transport)
    # The protocol heard of it before the call returned, as the transport would tell it.
    assert pair.server.write_lost
    assert pair.drain() and pair.read == b"bye"
    # Only the write side: the peer's bytes still arrive.
    pair.peer.sendall(b"still listening")
    await eventually(lambda: pair.server.data == b"still listening")
    assert pair.transport.connected
    # Closing it then is an orderly close, not a reset (without a second shutdown).
    pair.peer.shutdown(socket.SHUT_WR)
    await eventually(lambda: pair.server.read_lost)
    pair.transport.loseConnection()
    await eventually(lambda: not pair.transport.connected)
    assert pair.peer.recv(16) == b""  # no ConnectionResetError


@pytest_twisted.ensureDeferred
async def test_a_half_close_waits_for_buffered_bytes(pair: Pair) -> None:
    pair.transport.write(b"x" * 1000)  # not written yet
    shut_write_now(pair.transport)
    assert not pair.server.write_lost  # after the buffered bytes, from the reactor
    await eventually(lambda: pair.drain())
    assert pair.read == b"x" * 1000 and pair.server.write_lost


@pytest.mark.parametrize("state", ["disconnecting", "write_shut"])
def test_a_closing_transport_is_left_to_twisted(state: str) -> None:
    """Nothing is sent on a transport that is closing or half-closed."""
    from twisted.internet import tcp

    class Closing(tcp.Connection):
        def __init__(self) -> None:  # no socket: nothing may touch one
            self.connected = 1
            self.disconnecting = state == "disconnecting"
            self._writeDisconnecting = self._writeDisconnected = state == "write_shut"
            self.dataBuffer, self.offset, self._tempDataLen = b"", 0, 0
            self.written: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.written.append(data)

    transport = Closing()
    write_now(transport, b"late")
    assert transport.written == [b"late"]
