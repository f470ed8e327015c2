"""A small, real switchboard-side WebSocket peer for supervisor tests.

It listens on 127.0.0.1 (port 0), checks the upgrade as docs/protocol.md
says (path, bearer token, subprotocol, minor header), validates every message
the supervisor sends against the protocol schema, and lets a test script the
switchboard's side: send commands, wait for messages, ack events (or not),
close with any code, or play dead.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import serverFromString

from tests.util.waiting import sleep, within
from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.drivers import STAGES

JOB_A = "0b8d3c1e-0000-4000-8000-00000000000a"
JOB_B = "0b8d3c1e-0000-4000-8000-00000000000b"
DIGEST = "sha256:" + "ab" * 32


def job(job_id: str = JOB_A, **mock: Any) -> dict[str, Any]:
    """A JobStart; keyword arguments become ``mock.<key>`` parameters."""
    parameters = {f"mock.{key}": {"value": str(value), "secret": False}
                  for key, value in mock.items()}
    parameters["TOKEN"] = {"value": "s3cret-value", "secret": True}
    return {"id": job_id, "image": {"digest": DIGEST, "name": "demo", "stores": []},
            "parameters": parameters, "timeout": 60}


class PeerConnection(WebSocketServerProtocol):
    """One supervisor connection, seen from the switchboard's side."""

    def __init__(self) -> None:
        super().__init__()
        self.inbox: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.received: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.closed: Deferred[tuple[bool, int | None, str | None]] = Deferred()
        self.close_code: int | None = None
        self.request_headers: dict[str, str] = {}
        self.host_name: str | None = None
        self._rid = 1000

    def onConnect(self, request: Any) -> Any:
        peer = self.factory.peer
        peer.handshakes += 1
        self.request_headers = dict(request.headers)
        if request.path != protocol.PATH:
            raise ConnectionDeny(404, "not found")
        if peer.deny is not None:
            raise ConnectionDeny(peer.deny, "denied")
        auth = request.headers.get("authorization", "")
        host = peer.tokens.get(auth.removeprefix("Bearer "))
        if not auth.startswith("Bearer ") or host is None:
            raise ConnectionDeny(401, "unauthorized")
        self.host_name = host
        if peer.refuse_subprotocol:
            return (None, {})
        if protocol.SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(400, "unsupported protocol")
        return (protocol.SUBPROTOCOL, {protocol.MINOR_HEADER: str(peer.minor)})

    def onOpen(self) -> None:
        peer = self.factory.peer
        if peer.supersede:
            for old in peer.open_connections(self.host_name):
                old.sendClose(int(protocol.CloseCode.SUPERSEDED), "superseded")
        peer.connections.append(self)
        peer.new_connections.put(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            message = protocol.parse(payload, expect=protocol.TO_SWITCHBOARD)
        except protocol.ProtocolError as e:
            self.errors.append(str(e))
            self.factory.peer.errors.append(str(e))
            return
        self.received.append(message)
        if message["type"] == "job_event" and self.factory.peer.auto_ack:
            self.send(protocol.ack(message["request_id"]))
        self.inbox.put(message)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_code = code
        if not self.closed.called:
            self.closed.callback((wasClean, code, reason))

    # -- the test's side -------------------------------------------------------------

    @property
    def open_now(self) -> bool:
        return self.state == self.STATE_OPEN

    def send(self, message: dict[str, Any]) -> None:
        self.sendMessage(protocol.encode(message), isBinary=False)

    def send_raw(self, payload: bytes, binary: bool = False) -> None:
        self.sendMessage(payload, isBinary=binary)

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    async def next(self, kind: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """The next message (which must be of type ``kind`` if given)."""
        message = await within(self.inbox.get(), timeout)
        if kind is not None:
            assert message["type"] == kind, message
        return message

    async def nothing(self, seconds: float = 0.3) -> None:
        """Assert that no message arrives for ``seconds``."""
        await sleep(seconds)
        assert not self.inbox.pending, self.inbox.pending

    async def wait_for(self, match: Any, timeout: float = 5.0) -> dict[str, Any]:
        """The first message for which ``match(message)`` is true; the others stay in
        the inbox, in order."""
        skipped: list[dict[str, Any]] = []
        try:
            while True:
                message = await self.next(timeout=timeout)
                if match(message):
                    return message
                skipped.append(message)
        finally:
            self.inbox.pending[:] = [*skipped, *self.inbox.pending]

    async def answer(self, request_id: int, timeout: float = 5.0) -> dict[str, Any]:
        """The ``ack`` or ``status`` answering ``request_id``."""
        return await self.wait_for(lambda m: m["type"] in ("ack", "status")
                                   and m["request_id"] == request_id, timeout)

    async def command(self, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send a command and return its answer; job events wait in the inbox."""
        self.send(message)
        return await self.answer(message["request_id"], timeout)

    async def start(self, job_start: dict[str, Any]) -> dict[str, Any]:
        return await self.command(protocol.start_job(self.next_rid(), job_start))

    async def stop(self, job_id: str, reason: str = "user_terminated") -> dict[str, Any]:
        return await self.command(protocol.stop_job(self.next_rid(), job_id, reason))

    async def status(self) -> dict[str, Any]:
        return await self.command(protocol.status_request(self.next_rid()))

    async def event(self, ack: bool = True, timeout: float = 5.0) -> dict[str, Any]:
        """The next job event, acked unless ``ack`` is false (or auto-ack is on)."""
        message = await self.next("job_event", timeout)
        if ack and not self.factory.peer.auto_ack:
            self.send(protocol.ack(message["request_id"]))
        return message

    async def events_until(self, state: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Job events (acked) up to and including the first in ``state`` (or stage)."""
        events = []
        while True:
            events.append(await self.event(timeout=timeout))
            if state in (events[-1]["state"], events[-1].get("stage")):
                return events

    def die(self) -> None:
        """Stop reading and answering (no pongs), as a hung peer would."""
        self.transport.pauseProducing()

    def drop(self) -> None:
        """Drop the TCP connection without a closing handshake."""
        self.transport.abortConnection()


class FakeSwitchboard:
    """The listening side. ``tokens`` maps host tokens to host names."""

    def __init__(self, tokens: dict[str, str] | None = None, *, auto_ack: bool = True,
                 minor: int = 0, supersede: bool = True):
        self.tokens = tokens if tokens is not None else {"host-token": "host-1"}
        self.auto_ack = auto_ack
        self.minor = minor
        self.supersede = supersede
        self.refuse_subprotocol = False
        self.deny: int | None = None  # refuse every upgrade with this HTTP status
        self.scheme = "ws"
        self.handshakes = 0
        self.connections: list[PeerConnection] = []
        self.new_connections: DeferredQueue[PeerConnection] = DeferredQueue()
        self.errors: list[str] = []
        self.port: Any = None
        self._port_number = 0
        self.factory = WebSocketServerFactory()
        self.factory.protocol = PeerConnection
        self.factory.peer = self

    @property
    def url(self) -> str:
        host = "localhost" if self.scheme == "wss" else "127.0.0.1"
        return f"{self.scheme}://{host}:{self._port_number}"

    def listen(self) -> FakeSwitchboard:
        self.port = reactor.listenTCP(self._port_number, self.factory, interface="127.0.0.1")
        self._port_number = self.port.getHost().port
        return self

    async def listen_tls(self, key: str, cert: str) -> FakeSwitchboard:
        endpoint = serverFromString(
            reactor, f"ssl:{self._port_number}:interface=127.0.0.1:privateKey={key}:"
                     f"certKey={cert}")
        self.port = await endpoint.listen(self.factory)
        self._port_number = self.port.getHost().port
        self.scheme = "wss"
        return self

    async def stop_listening(self) -> None:
        if self.port is not None:
            await self.port.stopListening()
            self.port = None

    async def shutdown(self) -> None:
        await self.stop_listening()
        for conn in self.connections:
            if conn.state != conn.STATE_CLOSED:
                conn.drop()
        for conn in self.connections:
            await within(conn.closed, 5)

    def open_connections(self, host: str | None = None) -> list[PeerConnection]:
        return [c for c in self.connections if c.open_now and (host is None or c.host_name == host)]

    async def connection(self, timeout: float = 5.0) -> PeerConnection:
        """The next supervisor connection that opens."""
        return await within(self.new_connections.get(), timeout)


async def quick_job_ready(peer: FakeSwitchboard, timeout: float = 30.0) -> PeerConnection:
    """Wait for a supervisor to connect to ``peer``, start a job whose stages take 0.01 s
    on its mock host, and wait until the job is ready; the connection."""
    conn = await peer.connection(timeout=timeout)
    ack = await conn.start(job(**{f"stages.{stage}": 0.01 for stage in STAGES}))
    assert ack["ok"], ack
    await conn.events_until("ready")
    return conn
