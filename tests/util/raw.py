"""Raw HTTP over loopback TCP, for the requests a well-behaved client would not send."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater


class RawConnection(Protocol):
    """A TCP connection that keeps what it receives; ``closed`` fires with all of it."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(self.data)


async def raw_connect(port: int) -> RawConnection:
    """A connection to ``127.0.0.1:port``."""
    proto = RawConnection()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    return proto


async def abandoned(port: int, data: bytes, after: float = 0.1) -> None:
    """Send ``data`` (a request, often cut short) and abort the connection ``after``
    seconds later, as a client that dies does."""
    proto = await raw_connect(port)
    proto.transport.write(data)
    await deferLater(reactor, after, lambda: None)
    proto.transport.abortConnection()
    await proto.closed


async def raw_request(port: int, data: bytes) -> tuple[int, bytes]:
    """Send raw bytes (one request, ``Connection: close``); return status and response."""
    proto = await raw_connect(port)
    proto.transport.write(data)
    response = await proto.closed
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0
    return status, response
