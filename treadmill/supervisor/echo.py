"""An echo service on a local TCP port: what the mock host publishes through proxies
(``drivers/mock.py``), and what proxy tests and benchmarks splice to."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from treadmill.common.splice import no_delay

__all__ = ["Echo", "listen_echo"]


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """Writes back what it reads; closes once the client has sent everything (half-close)."""

    def connectionMade(self) -> None:
        no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()


def listen_echo(reactor: Any, port: int = 0, interface: str = "127.0.0.1") -> IListeningPort:
    """An echo service on ``interface:port`` (0: any free port; see ``getHost().port``)."""
    factory = Factory.forProtocol(Echo)
    factory.noisy = False
    return reactor.listenTCP(port, factory, backlog=1024,  # type: ignore[no-any-return]
                             interface=interface)
