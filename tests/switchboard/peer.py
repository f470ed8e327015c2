"""A scripted supervisor: a real WebSocket peer that speaks protocol v1 as told.

Tests of the switchboard's link use it to put the switchboard in exactly the
situation a reconciliation case describes, which a real supervisor reaches
only by accident. It records everything it receives.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater

from treadmill.protocol import supervisor as protocol


@dataclass
class Script:
    """How the peer answers."""

    job: dict[str, Any] | None = None  # What status reports.
    start_error: tuple[str, str] | None = None  # ack error for start_job.
    run_started: bool = True  # A successful start makes the job the peer's current job.
    snapshot_error: tuple[str, str] | None = None  # ack error for snapshot_job.
    answer_status: bool = True  # False: status requests go unanswered.
    kinds: list[str] | None = None  # status.kinds (minor 5); None: not sent.
    held: str | None = None  # status.held (minor 6): the ended job whose host it keeps.
    held_for: float | None = None  # status.held_for (minor 9), with held
    held_timeout: float | None = None  # status.held_timeout (minor 9), with held


class PeerProtocol(WebSocketClientProtocol):
    factory: PeerFactory

    def onOpen(self) -> None:
        self.factory.peer._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.peer._received(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.peer._closed(code, reason)


class PeerFactory(WebSocketClientFactory):
    protocol = PeerProtocol


@dataclass
class Peer:
    url: str
    token: str
    script: Script = field(default_factory=Script)
    received: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    connection: PeerProtocol | None = None
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _opened_d: Deferred | None = None
    _closed_d: Deferred | None = None
    _acks: dict[int, Deferred] = field(default_factory=dict)
    minor: int = protocol.MINOR
    reconnections: int = 0  # by deliver()
    # Like a real supervisor, status waits while a report is not yet stored.
    _delivering: int = 0
    _held_status: list[int] = field(default_factory=list)

    async def connect(self, subprotocol: str = protocol.SUBPROTOCOL) -> PeerProtocol:
        host, port = self.url.removeprefix("http://").split(":")
        factory = PeerFactory(f"ws://{host}:{port}{protocol.PATH}", protocols=[subprotocol],
                              headers={"Authorization": f"Bearer {self.token}",
                                       protocol.MINOR_HEADER: str(self.minor)})
        factory.peer = self
        self._opened_d, self._closed_d = Deferred(), Deferred()
        self.close_code = None
        endpoint = TCP4ClientEndpoint(reactor, host, int(port))
        await endpoint.connect(factory)
        first = await _first(self._opened_d, self._closed_d)
        if first == "closed":
            raise ConnectionRefusedError(f"handshake failed: {self.close_code}")
        assert self.connection is not None
        return self.connection

    def _opened(self, conn: PeerProtocol) -> None:
        self.connection = conn
        if self._opened_d and not self._opened_d.called:
            self._opened_d.callback("opened")

    def _closed(self, code: int | None, reason: str | None) -> None:
        self.close_code = code
        self.connection = None
        self._held_status = []  # requests of this connection: nobody waits for them now
        acks, self._acks = self._acks, {}
        for waiter in acks.values():
            if not waiter.called:
                waiter.errback(ConnectionError(f"closed ({code})"))
        if self._opened_d and not self._opened_d.called:
            self._opened_d.callback("closed")
        if self._closed_d and not self._closed_d.called:
            self._closed_d.callback(code)

    def send(self, message: dict[str, Any] | bytes) -> None:
        assert self.connection is not None
        payload = message if isinstance(message, bytes) else protocol.encode(message)
        self.connection.sendMessage(payload, isBinary=False)

    def _received(self, message: dict[str, Any]) -> None:
        self.received.append(message)
        kind = message["type"]
        if kind == "status_request":
            if not self.script.answer_status:
                return
            if self._delivering:
                self._held_status.append(message["request_id"])
            else:
                self.send(self._status(message["request_id"]))
        elif kind == "start_job":
            error = self.script.start_error
            if error is None and self.script.run_started:
                job = self.script.job
                if job is not None and job["id"] != message["job"]["id"]:
                    error = ("already_running", "another job runs")
                else:
                    self.script.job = {"id": message["job"]["id"], "state": "initializing",
                                       "stage": "starting"}
            self.send(protocol.ack(message["request_id"], error))
        elif kind == "stop_job":
            if self.script.job and self.script.job["id"] == message["job_id"]:
                self.script.job = None
            if self.script.held == message["job_id"]:
                self.script.held = None  # the hold is over
            self.send(protocol.ack(message["request_id"]))
        elif kind == "snapshot_job":
            self.send(protocol.ack(message["request_id"], self.script.snapshot_error))
        elif kind == "renew_tokens":
            self.send(protocol.ack(message["request_id"]))
        elif kind == "ack":
            waiter = self._acks.pop(message["request_id"], None)
            if waiter is not None:
                waiter.callback(message)

    def _status(self, request_id: int) -> dict[str, Any]:
        script = self.script
        return protocol.status(request_id, script.job, script.kinds, script.held,
                               held_for=script.held_for, held_timeout=script.held_timeout)

    async def event(self, job_id: str, state: str, **fields: Any) -> dict[str, Any]:
        """Send a job event and wait for its ack."""
        return await self.report(protocol.job_event(0, job_id, state, **fields))

    async def report(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a report (its request id is set here) and wait for its ack."""
        request_id = next(self._ids)
        waiter: Deferred = Deferred()
        self._acks[request_id] = waiter
        self.send({**message, "request_id": request_id})
        waiter.addTimeout(10, reactor)
        return await waiter

    async def deliver(self, message: dict[str, Any], every: float = 0.25,
                      timeout: float = 30.0) -> list[dict[str, Any]]:
        """Send a report until it is acked other than ``unavailable`` (as a supervisor of
        minor 4 does), reconnecting if the switchboard closes the link; status requests
        wait meanwhile. Returns every ack received."""
        acks: list[dict[str, Any]] = []
        deadline = reactor.seconds() + timeout
        self._delivering += 1
        try:
            while True:
                while self.connection is None:
                    assert reactor.seconds() < deadline, "could not reconnect"
                    try:
                        await self.connect()
                        self.reconnections += 1
                    except ConnectionRefusedError:
                        await deferLater(reactor, 0.1, lambda: None)
                try:
                    ack = await self.report(message)
                except ConnectionError:
                    continue
                acks.append(ack)
                if not protocol.is_retryable(ack):
                    return acks
                assert reactor.seconds() < deadline, f"never stored: {acks[-3:]}"
                await deferLater(reactor, every, lambda: None)
        finally:
            self._delivering -= 1
            if not self._delivering and self.connection is not None:
                held, self._held_status = self._held_status, []
                for request_id in held:
                    self.send(self._status(request_id))

    async def closed(self) -> int | None:
        assert self._closed_d is not None
        self._closed_d.addTimeout(15, reactor)
        return await self._closed_d

    def disconnect(self) -> None:
        if self.connection is not None:
            self.connection.transport.abortConnection()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m["type"] == kind]

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 10.0,
                       **match: Any) -> list[dict[str, Any]]:
        """Wait until ``count`` messages of ``kind`` (matching fields) arrived."""
        deadline = reactor.seconds() + timeout
        while True:
            found = [m for m in self.of_type(kind)
                     if all(_get(m, k) == v for k, v in match.items())]
            if len(found) >= count:
                return found
            if reactor.seconds() > deadline:
                raise AssertionError(f"no {count} {kind} {match} in {self.received}")
            await deferLater(reactor, 0.02, lambda: None)


def _get(message: dict[str, Any], key: str) -> Any:
    if key == "job_id" and message["type"] == "start_job":
        return message["job"]["id"]
    return message.get(key)


async def _first(*ds: Deferred) -> Any:
    done: Deferred = Deferred()
    for d in ds:
        d.addBoth(lambda r: (done.callback(r) if not done.called else None, r)[1])
    done.addTimeout(15, reactor)
    return await done


