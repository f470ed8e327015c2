"""A host's console as a local TCP service, for users to interact with through a proxy.

A :class:`ConsoleBridge` listens on a loopback port (which the driver reports
as the job's ``console`` service, so the exposure manager publishes it on the
job's proxies: ``tml job connect JOB console``). Every client receives the
console output from the moment it connected; what any client sends is
written to the console's input. A host's console cannot be paused, so a
client that falls more than ``client_buffer`` bytes behind is disconnected
rather than allowed to grow the supervisor's memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

__all__ = ["ConsoleBridge"]


class _Client(Protocol):
    def __init__(self, bridge: ConsoleBridge):
        self.bridge = bridge
        self.queued = 0
        self.paused = False

    def connectionMade(self) -> None:
        self.bridge.clients.add(self)
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason: Any = None) -> None:
        self.bridge.clients.discard(self)

    def dataReceived(self, data: bytes) -> None:
        self.bridge.write_input(data)

    # The transport tells us when its buffer is full (we are its producer).
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.queued = 0

    def stopProducing(self) -> None:
        pass

    def output(self, data: bytes) -> None:
        if self.paused:
            self.queued += len(data)
            if self.queued > self.bridge.client_buffer:
                self.bridge.log.warn("{name}: a console client fell {count} bytes behind; "
                                     "disconnecting it", name=self.bridge.name,
                                     count=self.queued)
                self.transport.abortConnection()
                return
        self.transport.write(data)


@dataclass(eq=False)
class ConsoleBridge:
    """Fan a console's output out to TCP clients and their input back in."""

    log = Logger()

    reactor: Any
    write_input: Callable[[bytes], None]
    _: KW_ONLY
    interface: str = "127.0.0.1"
    client_buffer: int = 1024 * 1024
    name: str = "console"
    clients: set[_Client] = field(default_factory=set, init=False)
    port: IListeningPort | None = field(default=None, init=False)

    async def listen(self, port: int = 0) -> tuple[str, int]:
        """Start listening; returns the ``(host, port)`` to report as a service."""
        factory = Factory.forProtocol(lambda: _Client(self))
        factory.noisy = False
        endpoint = TCP4ServerEndpoint(self.reactor, port, interface=self.interface)
        self.port = await endpoint.listen(factory)
        address = self.port.getHost()
        return address.host, address.port

    def output(self, data: bytes) -> None:
        """Console output: to every client."""
        for client in list(self.clients):
            client.output(data)

    async def close(self) -> None:
        """Stop listening and disconnect every client."""
        port, self.port = self.port, None
        for client in list(self.clients):
            client.transport.loseConnection()
        if port is not None:
            await port.stopListening()
