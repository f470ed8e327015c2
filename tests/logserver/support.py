"""Helpers for log server tests: keys and tokens, in-process servers, a small client."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Protocol

from tests.util.captokens import SigningKey
from tests.util.ports import free_port
from treadmill.common.captoken import Access
from treadmill.logserver.service import LogServerConfig, LogServerService

AUDIENCE = "treadmill-logserver"


class Keys(SigningKey):
    """The switchboard's key, and tokens for a job's log streams."""

    def token(self, job: str, *actions: str, ttl: float = 300.0, audience: str = AUDIENCE,
              issued_at: float | None = None) -> str:
        return self.sign("tester", audience, [Access("job", job, actions or ("read",))], ttl,
                         issued_at)

    def new_job(self) -> tuple[str, str, str]:
        """A new job id, with a token to append to its streams and one to read them."""
        job = new_job()
        return job, self.token(job, "append"), self.token(job, "read")

    def expired(self, job: str, *actions: str) -> str:
        return self.token(job, *actions, ttl=60, issued_at=reactor.seconds() - 3600)


def new_job() -> str:
    return str(uuid.uuid4())


@dataclass
class Running:
    service: LogServerService
    url: str
    root: Path

    async def stop(self) -> None:
        if self.service.running:
            await self.service.stopService()


async def start_logserver(root: Path, keys: Keys | Path, **overrides: Any) -> Running:
    """A log server in this process on a loopback port, trusting ``keys`` (or the keys in
    that file: a PEM signing key, its public half, a JWKS)."""
    keys_file = keys if isinstance(keys, Path) else keys.keys_file
    values: dict[str, Any] = {"root": str(root), "listen": ["tcp:0:interface=127.0.0.1"],
                              "auth": {"auth.keys_file": str(keys_file)},
                              "fsync": "never", "access_log": False}
    values.update(overrides)
    service = LogServerService(reactor, LogServerConfig(**values))
    service.startService()
    await service.ready()
    port = service.ports()[0].getHost().port
    return Running(service, f"http://127.0.0.1:{port}", root)


@dataclass
class LaterLogServer:
    """A log server's loopback URL now, the server itself later (:meth:`start`, again after
    a stop): for clients that must cope with it being down."""

    root: Path
    keys: Keys
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Running:
        return await start_logserver(self.root, self.keys,
                                     listen=[f"tcp:{self.port}:interface=127.0.0.1"])


@dataclass
class Answer:
    code: int
    body: Any
    headers: Any

    @property
    def error(self) -> str | None:
        if isinstance(self.body, dict) and "error" in self.body:
            return self.body["error"]["code"]
        return None

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[-1].decode() if values else None


class LogClient:
    """Raw HTTP calls to one log server."""

    def __init__(self, url: str):
        self.url = url

    async def call(self, method: str, path: str, token: str | None = None, *,
                   data: bytes | None = None, headers: dict[str, str] | None = None,
                   raw: bool = False) -> Answer:
        sent = dict(headers or {})
        if token is not None:
            sent["authorization"] = f"Bearer {token}"
        response = await treq.request(method, self.url + path, data=data, headers=sent)
        content = await response.content()
        body: Any = content
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if (not raw or response.code >= 400) and content and ctype.startswith(
                b"application/json"):
            body = json.loads(content)
        return Answer(response.code, body, response.headers)

    async def append(self, job: str, stream: str, offset: int, data: bytes, token: str,
                     close: bool = False) -> Answer:
        query = f"?offset={offset}" + ("&close=1" if close else "")
        return await self.call("POST", f"/v1/jobs/{job}/streams/{stream}{query}", token,
                               data=data)

    async def read(self, job: str, stream: str, token: str, query: str = "",
                   headers: dict[str, str] | None = None) -> Answer:
        return await self.call("GET", f"/v1/jobs/{job}/streams/{stream}{query}", token,
                               headers=headers, raw=True)

    async def close(self, job: str, stream: str, token: str, length: int | None = None
                    ) -> Answer:
        query = "" if length is None else f"?length={length}"
        return await self.call("POST", f"/v1/jobs/{job}/streams/{stream}/close{query}", token)

    async def list(self, job: str, token: str) -> Answer:
        return await self.call("GET", f"/v1/jobs/{job}/streams", token)


# -- followers -----------------------------------------------------------------------------


class Received:
    """What a follower got: the bytes, when each piece arrived, and how it ended."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.times: list[tuple[float, int]] = []  # (arrival, total length then)
        self.ended: Deferred[Any] = Deferred()
        self.transport: Any = None  # an HTTP follower's body transport (to hang up)
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def add(self, data: bytes) -> None:
        self.data += data
        self.times.append((time.monotonic(), len(self.data)))
        still = []
        for size, waiter in self._waiters:
            if len(self.data) >= size:
                waiter.callback(None)
            else:
                still.append((size, waiter))
        self._waiters = still

    def end(self, how: Any) -> None:
        if not self.ended.called:
            self.ended.callback(how)
        for _, waiter in self._waiters:
            waiter.errback(AssertionError(f"ended ({how}) with {len(self.data)} bytes"))
        self._waiters = []

    def wait_for(self, size: int, timeout: float = 5.0) -> Deferred[None]:
        """Fires once ``size`` bytes arrived."""
        if len(self.data) >= size:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append((size, waiter))
        waiter.addTimeout(timeout, reactor)
        return waiter


class _FollowClient(WebSocketClientProtocol):
    received: Received

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.add(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.received.end((code, reason))


async def follow_ws(url: str, path: str, token: str | None) -> tuple[Received, Any]:
    """Open a WebSocket follower; returns what it receives and its protocol."""
    received = Received()
    ws_url = url.replace("http://", "ws://") + path
    headers = {"authorization": f"Bearer {token}"} if token else {}
    factory = WebSocketClientFactory(ws_url, headers=headers)

    class Proto(_FollowClient):
        pass

    Proto.received = received
    factory.protocol = Proto
    host, port = ws_url.split("//")[1].split("/")[0].split(":")
    proto = await TCP4ClientEndpoint(reactor, host, int(port)).connect(factory)
    return received, proto


class _Collect(Protocol):
    def __init__(self, received: Received):
        self.received = received

    def connectionMade(self) -> None:
        self.received.transport = self.transport

    def dataReceived(self, data: bytes) -> None:
        self.received.add(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.received.end(reason.value if reason is not None else None)


async def follow_http(url: str, path: str, token: str) -> tuple[Received, Any]:
    """A curl-style follower: GET ...?follow=1, the body read as it arrives."""
    received = Received()
    response = await treq.get(url + path, headers={"authorization": f"Bearer {token}"},
                              unbuffered=True)
    response.deliverBody(_Collect(received))
    return received, response
