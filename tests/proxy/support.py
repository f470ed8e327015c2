"""Helpers for proxy tests: keys and tunnel tokens, in-process proxies, traffic with checksums."""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from tests.util.captokens import SigningKey
from tests.util.daemons import Daemon
from tests.util.ports import free_port, free_range
from treadmill.common.captoken import Access
from treadmill.protocol import proxy as messages
from treadmill.proxy.service import ProxyConfig, ProxyService
from treadmill.proxy.tunnels import TunnelConfig
from treadmill.supervisor.echo import listen_echo

AUDIENCE = "treadmill-proxy"
CHUNK = 64 * 1024
EXAMPLE = Path(__file__).parents[2] / "etc" / "treadmill" / "proxy.toml"


class Keys(SigningKey):
    """The switchboard's key, and tunnel tokens."""

    def token(self, job: str, *, actions: tuple[str, ...] = ("publish",), kind: str = "tunnel",
              audience: str = AUDIENCE, subject: str = "host-1", ttl: float = 600.0,
              issued_at: float | None = None) -> str:
        return self.sign(subject, audience, [Access(kind, job, actions)], ttl, issued_at)


def new_job() -> str:
    return str(uuid.uuid4())


@dataclass
class Running:
    service: ProxyService
    url: str  # http://127.0.0.1:PORT
    data_port: int

    @property
    def ws(self) -> str:
        return self.url.replace("http://", "ws://")

    @property
    def registry(self) -> Any:
        return self.service.registry

    async def stop(self) -> None:
        if self.service.running:
            await self.service.stopService()


async def start_proxy(keys: Keys, **tunnels: Any) -> Running:
    """A proxy in this process on loopback ports; ``tunnels`` override TunnelConfig."""
    settings: dict[str, Any] = {"public_host": "127.0.0.1", "interface": "127.0.0.1",
                                "ports": None, "grace": 1.0, "connect_timeout": 5.0}
    settings.update(tunnels)
    if settings["ports"] is None and not settings.get("static"):
        settings["ports"] = free_range(8)
    config = ProxyConfig(listen=["tcp:0:interface=127.0.0.1"],
                         data_listen=["tcp:0:interface=127.0.0.1"],
                         auth={"auth.keys_file": str(keys.keys_file)},
                         tunnels=TunnelConfig(**settings), access_log=False,
                         ping_interval=5.0)
    service = ProxyService(reactor, config)
    service.startService()
    await service.ready()
    port = service.ports()[0].getHost().port
    return Running(service, f"http://127.0.0.1:{port}", service.data_ports()[0].getHost().port)


@dataclass
class ProxyDaemon:
    """A proxy as operators run it (``twistd``, the example configuration), on loopback."""

    daemon: Daemon
    http: int
    data: int
    metrics: int
    ports: tuple[int, int]


def proxy_daemon(keys: Keys, *args: str) -> ProxyDaemon:
    """A ``twistd treadmill-proxy`` (not started) with the example configuration on free
    loopback ports, trusting ``keys``, with metrics; ``args`` add settings."""
    http, data, metrics = free_port(), free_port(), free_port()
    first, last = free_range(4)
    daemon = Daemon("treadmill-proxy", [
        "--config", str(EXAMPLE), "--listen", f"tcp:{http}:interface=127.0.0.1",
        "--data-listen", f"tcp:{data}:interface=127.0.0.1", "--public-host", "127.0.0.1",
        "--public-interface", "127.0.0.1", "--ports", f"{first}-{last}",
        "--auth-keys-file", str(keys.keys_file), "--http-access-log", "false",
        "--metrics-listen", f"tcp:{metrics}:interface=127.0.0.1", *args])
    return ProxyDaemon(daemon, http, data, metrics, (first, last))


# Fixtures ``keys`` and ``proxy``: a conftest or a test module outside tests/proxy imports
# them (as ``keys_fixture`` and ``proxy_fixture``).


@pytest.fixture(name="keys")
def keys_fixture(tmp_path: Path) -> Keys:
    """The switchboard's signing key (the proxy trusts it)."""
    return Keys(tmp_path)


@pytest_twisted.async_yield_fixture(name="proxy")
async def proxy_fixture(keys: Keys) -> AsyncIterator[Running]:
    """A proxy in this process, stopped at the end."""
    running = await start_proxy(keys)
    try:
        yield running
    finally:
        await running.stop()


@pytest_twisted.async_yield_fixture
async def echo() -> AsyncIterator[int]:
    """The port of an echo service (the mock host's), for the test."""
    port = listen_echo(reactor)
    yield port.getHost().port
    await port.stopListening()


# -- a raw control connection (for protocol tests) --------------------------------------


class RawControl(WebSocketClientProtocol):
    """A control connection that records what it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.inbox: deque[dict[str, Any]] = deque()
        self.waiters: deque[Deferred[dict[str, Any]]] = deque()
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self.http_status: int | None = None

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = json.loads(payload)
        if self.waiters:
            self.waiters.popleft().callback(message)
        else:
            self.inbox.append(message)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        line = getattr(self, "http_status_line", None)
        if line and len(line.split()) > 1:
            self.http_status = int(line.split()[1])
        if not self.opened.called:
            self.opened.errback(AssertionError(f"refused: HTTP {self.http_status}"))
        if not self.closed.called:
            self.closed.callback((self.remoteCloseCode, self.remoteCloseReason))
        for waiter in self.waiters:
            waiter.errback(AssertionError(f"closed ({self.remoteCloseCode})"))
        self.waiters.clear()

    def next(self, timeout: float = 5.0) -> Deferred[dict[str, Any]]:
        if self.inbox:
            return succeed(self.inbox.popleft())
        waiter: Deferred[dict[str, Any]] = Deferred()
        waiter.addTimeout(timeout, reactor)
        self.waiters.append(waiter)
        return waiter

    def send(self, message: dict[str, Any] | bytes) -> None:
        payload = message if isinstance(message, bytes) else messages.encode(message)
        self.sendMessage(payload, isBinary=False)


async def raw_control(proxy: Running, token: str | None, job: str | None = None,
                      protocols: list[str] | None = None,
                      minor: int | None = None) -> RawControl:
    """Open a control connection (not waiting for it to open); ``minor``: announce it."""
    url = proxy.ws + messages.CONTROL_PATH + (f"?job={job}" if job else "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if minor is not None:
        headers[messages.MINOR_HEADER] = str(minor)
    factory = WebSocketClientFactory(url, headers=headers,
                                     protocols=[messages.SUBPROTOCOL] if protocols is None
                                     else protocols)
    factory.protocol = RawControl
    port = int(proxy.url.rsplit(":", 1)[1])
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                 factory.buildProtocol(None))


async def opened_control(proxy: Running, token: str, job: str | None = None,
                         minor: int | None = None) -> RawControl:
    control = await raw_control(proxy, token, job, minor=minor)
    await control.opened
    welcome = await control.next()
    assert welcome["type"] == "welcome", welcome
    return control


# -- traffic --------------------------------------------------------------------------


@implementer(IPushProducer)
class Sender:
    """Writes ``total`` pseudo-random bytes (``seed``) to ``write``, obeying backpressure."""

    def __init__(self, consumer: Any, write: Any, total: int, seed: int,
                 done: Any = None):
        self.consumer = consumer
        self.write = write
        self.total = total
        self.blocks = _blocks(seed)
        self.sha = hashlib.sha256()
        self.sent = 0
        self.paused = False
        self.stopped = False
        self.done = done
        consumer.registerProducer(self, True)
        reactor.callLater(0, self.resumeProducing)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped and self.sent < self.total:
            data = next(self.blocks)[:self.total - self.sent]
            self.sha.update(data)
            self.sent += len(data)
            self.write(data)
        if self.sent >= self.total and not self.stopped:
            self.stopped = True
            self.consumer.unregisterProducer()
            if self.done is not None:
                self.done()

    def stopProducing(self) -> None:
        self.stopped = True


_POOL = random.Random(0).randbytes(4 * 1024 * 1024 + CHUNK)


def _blocks(seed: int) -> Any:
    """Pseudo-random CHUNK-sized blocks (cheap: slices of one random pool)."""
    rng = random.Random(seed)
    view = memoryview(_POOL)
    while True:
        start = rng.randrange(0, len(_POOL) - CHUNK)
        yield bytes(view[start:start + CHUNK])


def expected_digest(total: int, seed: int) -> str:
    blocks = _blocks(seed)
    sha = hashlib.sha256()
    left = total
    while left:
        data = next(blocks)[:left]
        sha.update(data)
        left -= len(data)
    return sha.hexdigest()


@dataclass
class Outcome:
    sent: str
    received: str
    received_bytes: int


@implementer(IHalfCloseableProtocol)
class Transfer(Protocol):
    """Sends ``total`` bytes and reads until end of file (or ``expect`` bytes), hashing both.

    ``half_close``: shut the write side once everything was sent. ``pause_every``:
    a slow reader that stops reading for ``pause_for`` seconds every so many bytes.
    """

    def __init__(self, total: int, seed: int, *, expect: int | None = None,
                 half_close: bool = True, pause_every: int = 0, pause_for: float = 0.0):
        self.total = total
        self.seed = seed
        self.expect = expect
        self.half_close = half_close
        self.pause_every = pause_every
        self.pause_for = pause_for
        self.sha = hashlib.sha256()
        self.count = 0
        self._next_pause = pause_every
        self.sender: Sender | None = None
        self.sent_all = False
        self.read_done = False
        self.result: Deferred[Outcome] = Deferred()

    def connectionMade(self) -> None:
        self.sender = Sender(self.transport, self.transport.write, self.total, self.seed,
                             self._sent)

    def _sent(self) -> None:
        self.sent_all = True
        if self.half_close:
            self.transport.loseWriteConnection()
        self._maybe_done()

    def dataReceived(self, data: bytes) -> None:
        self.sha.update(data)
        self.count += len(data)
        if self.pause_every and self.count >= self._next_pause:
            self._next_pause += self.pause_every
            self.transport.pauseProducing()
            reactor.callLater(self.pause_for, self.transport.resumeProducing)
        if self.expect is not None and self.count >= self.expect:
            self.read_done = True
            self._maybe_done()

    def _maybe_done(self) -> None:
        if self.sent_all and self.read_done:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        self.read_done = True
        self._maybe_done()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if not self.result.called:
            sent = self.sender.sha.hexdigest() if self.sender else ""
            self.result.callback(Outcome(sent, self.sha.hexdigest(), self.count))


class TransferService:
    """A local service: each connection is a :class:`Transfer` made by ``make()``."""

    def __init__(self, make: Any):
        self.make = make
        self.outcomes: list[Deferred[Outcome]] = []
        self.port: Any = None

    def listen(self) -> int:
        service = self

        class _Factory(Factory):
            noisy = False

            def buildProtocol(self, addr: Any) -> Protocol:
                protocol = service.make()
                service.outcomes.append(protocol.result)
                return protocol

        self.port = reactor.listenTCP(0, _Factory(), interface="127.0.0.1", backlog=1024)
        return int(self.port.getHost().port)

    async def stop(self) -> None:
        if self.port is not None:
            await self.port.stopListening()


async def tcp_transfer(port: int, protocol: Transfer) -> Outcome:
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    return await protocol.result


class WsTransfer(WebSocketClientProtocol):
    """A :class:`Transfer` over a tunnel's WebSocket path (binary messages)."""

    total = 0
    seed = 0
    expect = 0

    def __init__(self) -> None:
        super().__init__()
        self.sha = hashlib.sha256()
        self.count = 0
        self.sender: Sender | None = None
        self.sent_all = False
        self.result: Deferred[Outcome] = Deferred()

    def onOpen(self) -> None:
        self.sender = Sender(self.transport, lambda d: self.sendMessage(d, isBinary=True),
                             self.total, self.seed, self._sent)

    def _sent(self) -> None:
        self.sent_all = True
        self._maybe_done()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sha.update(payload)
        self.count += len(payload)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.sent_all and self.count >= self.expect and self.state == self.STATE_OPEN:
            self.sendClose(1000)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.result.called:
            sent = self.sender.sha.hexdigest() if self.sender else ""
            self.result.callback(Outcome(sent, self.sha.hexdigest(), self.count))


async def ws_transfer(url: str, total: int, seed: int, expect: int) -> Outcome:
    factory = WebSocketClientFactory(url)  # a plain client: binary frames, no subprotocol
    factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)

    class Proto(WsTransfer):
        pass

    Proto.total, Proto.seed, Proto.expect = total, seed, expect
    factory.protocol = Proto
    host, port = url.split("//")[1].split("/")[0].split(":")
    protocol = await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)),
                                     factory.buildProtocol(None))
    return await protocol.result


# -- small echo clients ---------------------------------------------------------------


class EchoClient(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.waiters: list[tuple[int, Deferred[bytes]]] = []
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        keep = []
        for size, waiter in self.waiters:
            if len(self.data) >= size:
                waiter.callback(self.data)
            else:
                keep.append((size, waiter))
        self.waiters = keep

    def connectionLost(self, reason: Any = None) -> None:
        for _, waiter in self.waiters:
            waiter.errback(AssertionError(f"lost with {self.data!r}"))
        self.waiters = []
        self.lost.callback(None)

    def wait_for(self, size: int, timeout: float = 5.0) -> Deferred[bytes]:
        if len(self.data) >= size:
            return succeed(self.data)
        waiter: Deferred[bytes] = Deferred()
        waiter.addTimeout(timeout, reactor)
        self.waiters.append((size, waiter))
        return waiter


def echo_client(port: int) -> Deferred[EchoClient]:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), EchoClient())


async def echo_once(port: int, payload: bytes = b"hello", timeout: float = 5.0) -> bytes:
    client = await echo_client(port)
    client.transport.write(payload)
    try:
        data = await client.wait_for(len(payload), timeout)
    finally:
        client.transport.loseConnection()
    return data


def make_certificates(directory: Path) -> tuple[Path, Path]:
    """A private CA (``ca.pem``) and a key+certificate PEM for 127.0.0.1 it signed."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "proxy test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server = directory / "server.pem"
    server.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
                       + cert.public_bytes(serialization.Encoding.PEM))
    return ca_path, server


async def start_tls_proxy(keys: Keys, directory: Path, **tunnels: Any) -> tuple[Running, Path]:
    """A proxy whose HTTP and data listeners serve TLS; returns it and the CA file."""
    ca, server = make_certificates(directory)
    settings: dict[str, Any] = {"public_host": "127.0.0.1", "interface": "127.0.0.1",
                                "ports": free_range(4), "grace": 1.0}
    settings.update(tunnels)
    tls = f"ssl:0:interface=127.0.0.1:privateKey={server}"
    config = ProxyConfig(listen=[tls], data_listen=[tls],
                         auth={"auth.keys_file": str(keys.keys_file)},
                         tunnels=TunnelConfig(**settings), access_log=False)
    service = ProxyService(reactor, config)
    service.startService()
    await service.ready()
    port = service.ports()[0].getHost().port
    return Running(service, f"https://127.0.0.1:{port}",
                   service.data_ports()[0].getHost().port), ca


# -- console clients (tunnels that need a console token) --------------------------------


class ConsoleClient(WebSocketClientProtocol):
    """A client of a tunnel's WebSocket path that records bytes and how it closed.

    ``token_frame``: send it as the first text message once open (what a browser does).
    """

    token_frame: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.output = b""
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self.waiters: list[tuple[int, Deferred[bytes]]] = []

    def onOpen(self) -> None:
        if self.token_frame is not None:
            self.sendMessage(self.token_frame.encode(), isBinary=False)
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.output += payload
        keep = []
        for size, waiter in self.waiters:
            if len(self.output) >= size:
                waiter.callback(self.output)
            else:
                keep.append((size, waiter))
        self.waiters = keep

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(AssertionError(f"not opened: {reason}"))
        if not self.closed.called:
            self.closed.callback((self.remoteCloseCode, self.remoteCloseReason))
        for _, waiter in self.waiters:
            waiter.errback(AssertionError(f"closed ({self.remoteCloseCode}) with {self.output!r}"))
        self.waiters = []

    def type(self, data: bytes) -> None:
        self.sendMessage(data, isBinary=True)

    def wait_for(self, size: int, timeout: float = 5.0) -> Deferred[bytes]:
        if len(self.output) >= size:
            return succeed(self.output)
        waiter: Deferred[bytes] = Deferred()
        waiter.addTimeout(timeout, reactor)
        self.waiters.append((size, waiter))
        return waiter


async def console(url: str, token: str | None = None, via: str = "frame") -> ConsoleClient:
    """Connect to a tunnel URL, presenting ``token`` ``via`` ``frame``, ``query`` or
    ``header`` (not waiting for it to open)."""
    headers = {}
    if token is not None and via == "query":
        url += "?token=" + token
    elif token is not None and via == "header":
        headers["Authorization"] = f"Bearer {token}"
    factory = WebSocketClientFactory(url, headers=headers)

    class Proto(ConsoleClient):
        token_frame = token if via == "frame" else None

    factory.protocol = Proto
    host, port = url.split("//")[1].split("/")[0].split(":")
    return await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)),
                                 factory.buildProtocol(None))


async def console_echo(url: str, token: str, payload: bytes = b"hello",
                       via: str = "frame") -> bytes:
    """Type ``payload`` into a console (an echo service) and read it back."""
    client = await console(url, token, via)
    await client.opened
    client.type(payload)
    try:
        return await client.wait_for(len(payload))
    finally:
        client.sendClose(1000)
