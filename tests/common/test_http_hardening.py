"""HTTP hardening shared by every role (treadmill.common.http): bad bytes in a request
head answer 400 in the role's error shape with nothing logged, 405 names the allowed
methods, and a client must send its request head in bounded time.

The attacks go over loopback, as raw bytes, to real servers of every role: switchboard,
image store, image cache, log server, proxy and a metrics listener.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.imagestore.support import Keys as StoreKeys
from tests.imagestore.support import start_cache, start_store
from tests.logserver.support import Keys as LogKeys
from tests.logserver.support import start_logserver
from tests.proxy.support import Keys as ProxyKeys
from tests.proxy.support import start_proxy
from tests.support import start_switchboard
from tests.util.ports import free_port
from tests.util.raw import raw_connect
from treadmill.common.http import HardenedSite, head_problem, limited_site
from treadmill.common.metrics import metrics_service

# -- the rule ----------------------------------------------------------------------------


def _basic(raw: bytes) -> bytes:
    return b"Basic " + base64.b64encode(raw)


@pytest.mark.parametrize("headers, uri, problem", [
    ({}, b"/v1/jobs/a%00b", "path: contains a control character"),
    ({}, b"/a/%ff", "path: not valid UTF-8"),
    ({}, b"/a/%ed%a0%80", "path: not valid UTF-8"),           # a lone surrogate
    ({}, b"/a?x=%00", "query parameter x: contains a control character"),
    ({}, b"/a?x=%c3", "query parameter x: not valid UTF-8"),
    ({}, b"/a?%ff=1", "query parameter name: not valid UTF-8"),
    ({}, b"/a?x=\xed\xa0\x80", "query parameter x: not valid UTF-8"),
    ({b"authorization": b"Bearer \xff"}, b"/", "header Authorization: not valid UTF-8"),
    ({b"x-thing": b"a\x01b"}, b"/", "header X-Thing: contains a control character"),
    ({b"authorization": _basic(b"a\x00b:pw")}, b"/",
     "Basic credentials: contains a control character"),
    ({b"authorization": _basic(b"\xffuser:pw")}, b"/", "Basic credentials: not valid UTF-8"),
    ({b"authorization": _basic(b"user:pw\x00")}, b"/",
     "Basic credentials: contains a control character"),
])
def test_head_problem_refuses(headers: dict[bytes, bytes], uri: bytes, problem: str) -> None:
    raw = Headers({k: [v] for k, v in headers.items()})
    assert head_problem(raw, uri) == problem


@pytest.mark.parametrize("headers, uri", [
    ({}, b"/v1/jobs/caf%C3%A9/streams?after=3&x=%E2%9C%93&flag"),
    ({b"user-agent": "tml/1 (café)\t".encode()}, b"/a+b?q=a+b%20c"),
    ({b"authorization": _basic("alice:pä:ss".encode())}, b"/"),
    ({b"authorization": b"Basic not-base64!"}, b"/"),  # the handler answers that one
    ({b"authorization": b"Bearer tmt_abc.def"}, b"/"),
])
def test_head_problem_accepts(headers: dict[bytes, bytes], uri: bytes) -> None:
    assert head_problem(Headers({k: [v] for k, v in headers.items()}), uri) is None


# -- real servers, raw requests ----------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def parse(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return Reply(int(lines[0].split(" ")[1]), headers, body)


async def send(port: int, method: bytes, target: bytes, headers: dict[bytes, bytes]) -> Reply:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [k + b": " + v for k, v in headers.items()]
    lines += [b"Connection: close", b"", b""]
    proto = await raw_connect(port)
    proto.transport.write(b"\r\n".join(lines))
    return parse(await proto.closed)


@dataclass
class Target:
    """One role's listener: its port, a route with a ``{}`` slot, its error check."""

    port: int
    route: str
    error_code: Callable[[Any], str]
    wrong_method: tuple[bytes, str, set[str]]


def treadmill_code(body: Any) -> str:
    return body["error"]["code"]


def oci_code(body: Any) -> str:
    assert set(body["errors"][0]) == {"code", "message", "detail"}
    return body["errors"][0]["code"]


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    """Events at warn level and above, or carrying a failure, logged meanwhile."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if event.get("log_failure") is not None or event.get("isError") or (
                level is not None and level >= LogLevel.warn):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest_twisted.async_yield_fixture(params=["switchboard", "imagestore", "imagecache",
                                            "logserver", "proxy", "metrics"])
async def target(request: Any, tmp_path: Path) -> AsyncIterator[Target]:
    role = request.param
    stop: Callable[[], Any]
    if role == "switchboard":
        sb = await start_switchboard(request.getfixturevalue("database"), tmp_path)
        stop = sb.stop
        t = Target(_port(sb.url), "/api/v1/users/{}", treadmill_code,
                   (b"DELETE", "/healthz", {"GET", "HEAD"}))
    elif role in ("imagestore", "imagecache"):
        keys = StoreKeys(tmp_path)
        if role == "imagestore":
            running = await start_store(tmp_path / "store", keys)
        else:
            running = await start_cache(tmp_path / "cache", keys, ["http://127.0.0.1:9"])
        stop = running.stop
        t = Target(running.port, "/v2/lab/{}/tags/list", oci_code,
                   (b"POST", "/v2/lab/fw/tags/list", {"GET", "HEAD"}))
    elif role == "logserver":
        running = await start_logserver(tmp_path / "logs", LogKeys(tmp_path))
        stop = running.stop
        t = Target(_port(running.url), "/v1/jobs/{}/streams", treadmill_code,
                   (b"PUT", "/healthz", {"GET", "HEAD"}))
    elif role == "proxy":
        running = await start_proxy(ProxyKeys(tmp_path))
        stop = running.stop
        t = Target(_port(running.url), "/v1/tunnels/{}", treadmill_code,
                   (b"POST", "/v1/control", {"GET", "HEAD"}))
    else:
        port = free_port()
        service = metrics_service(reactor, [f"tcp:{port}:interface=127.0.0.1"])
        service.startService()
        stop = service.stopService
        t = Target(port, "/metrics/{}", treadmill_code, (b"POST", "/metrics", {"GET", "HEAD"}))
    try:
        yield t
    finally:
        await stop()


ATTACKS: dict[str, tuple[bytes, dict[bytes, bytes]]] = {
    "NUL in a path segment": (b"a%00b", {}),
    "invalid UTF-8 in a path segment": (b"a%ffb", {}),
    "a lone surrogate in a path segment": (b"a%ed%a0%80b", {}),
    "raw invalid UTF-8 in the request line": (b"a\xffb", {}),
    "NUL in a query value": (b"x?q=%00", {}),
    "invalid UTF-8 in a query value": (b"x?q=%ff", {}),
    "a lone surrogate in a query value": (b"x?q=%ed%b0%80", {}),
    "invalid UTF-8 in a header": (b"x", {b"Authorization": b"Bearer \xff\xfe"}),
    "a lone surrogate in a header": (b"x", {b"X-Request-Id": b"\xed\xa0\x80"}),
    "NUL in a header": (b"x", {b"Authorization": b"Bearer a\x00b"}),
    "a control character in a header": (b"x", {b"Idempotency-Key": b"a\x07b"}),
    "invalid UTF-8 in another header": (b"x", {b"X-Forwarded-Host": b"\xff"}),
    "NUL in a Basic user name": (b"x", {b"Authorization": _basic(b"ad\x00min:secret")}),
    "invalid UTF-8 in a Basic user name": (b"x", {b"Authorization": _basic(b"\xc3:secret")}),
}


@pytest_twisted.ensureDeferred
async def test_bad_bytes_answer_400_in_the_role_shape(target: Target,
                                                      logged: list[Any]) -> None:
    for attack, (segment, headers) in ATTACKS.items():
        path = target.route.encode().replace(b"{}", segment)
        for method in (b"GET", b"POST", b"HEAD"):
            reply = await send(target.port, method, path, headers)
            assert reply.status == 400, (attack, method, path, reply)
            if method != b"HEAD":
                assert reply.headers["content-type"] == "application/json"
                code = target.error_code(reply.json)
                assert code in ("bad_request", "REQUEST_INVALID"), (attack, reply)
    assert logged == [], "nothing is logged at warn level or above, no traceback"


HEADS_TOO_LARGE: dict[str, tuple[bytes, dict[bytes, bytes]]] = {
    "a header line over 16 KiB": (b"x", {b"X-Big": b"a" * 17000}),
    "a request line over 16 KiB": (b"x?q=" + b"a" * 17000, {}),
    "headers over 16 KiB in all": (b"x", {b"X-%d" % i: b"a" * 6000 for i in range(3)}),
    "more than 500 header fields": (b"x", {b"X-%d" % i: b"a" for i in range(600)}),
}


@pytest_twisted.ensureDeferred
async def test_a_request_head_too_large_answers_431_in_the_role_shape(
        target: Target, logged: list[Any]) -> None:
    """Not an empty reply (twisted.web closes at once on a line over 16 KiB), nor a 400
    that hides which limit was met."""
    for attack, (segment, headers) in HEADS_TOO_LARGE.items():
        path = target.route.encode().replace(b"{}", segment)
        reply = await send(target.port, b"GET", path, headers)
        assert reply.status == 431, (attack, reply.status, reply.body[:200])
        assert reply.headers["content-type"] == "application/json"
        assert target.error_code(reply.json) in ("head_too_large", "REQUEST_INVALID"), attack
        assert "request head too large" in reply.body.decode(), attack
    assert logged == [], "nothing is logged at warn level or above, no traceback"


@pytest_twisted.ensureDeferred
async def test_405_names_the_allowed_methods(target: Target) -> None:
    method, path, allowed = target.wrong_method
    reply = await send(target.port, method, path.encode(), {})
    assert reply.status == 405
    if not path.startswith("/metrics"):  # twisted.web's own page there
        assert target.error_code(reply.json) in ("method_not_allowed", "UNSUPPORTED")
    assert {m.strip() for m in reply.headers["allow"].split(",")} == allowed


@pytest_twisted.ensureDeferred
async def test_a_json_body_with_nul_or_a_lone_surrogate_is_400(switchboard: Any) -> None:
    admin = switchboard.admin
    for raw in (b'{"name": "a\\u0000b", "admin": false}',
                b'{"name": "x", "password": "\\ud800\\ud800"}',
                b'{"name": "x", "password": "p\\u0000w"}',
                b'{"label": "\\udfff", "expires_in": 60}'):
        for path in ("/api/v1/users", "/api/v1/tokens"):
            answer = await admin.post(path, raw=raw)
            assert answer.status == 400, (path, raw, answer)
            assert answer.error == "bad_request"


# -- the request-head deadline -------------------------------------------------------------


class _Slow(Resource):
    """Answers a GET at once, or at ``release`` (a long-lived response)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/hold":
            self.held.append(request)
            request.write(b"first")
            return NOT_DONE_YET
        return b"ok"

    def render_POST(self, request: Any) -> bytes:
        return b"got " + request.content.read()


def _channel(head: float = 10.0, idle: float = 60.0) -> tuple[Any, StringTransport,
                                                              MemoryReactorClock, _Slow]:
    clock = MemoryReactorClock()
    resource = _Slow()
    site = limited_site(resource, 1 << 20, reactor=clock)
    site.head_timeout, site.idle_timeout = head, idle
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, clock, resource


def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout() -> None:
    _, transport, clock, _ = _channel()
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
    assert transport.value() == b""


def test_a_dripping_request_head_is_cut_at_the_deadline() -> None:
    channel, transport, clock, _ = _channel()
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    for _ in range(9):  # A byte a second would keep an idle timeout alive for ever.
        clock.advance(1.0)
        channel.dataReceived(b"X")
    clock.advance(1.0)
    assert transport.disconnecting
    reply = parse(transport.value())
    assert reply.status == 408
    assert reply.json["error"]["code"] == "request_timeout"


def test_bodies_and_long_responses_are_not_cut() -> None:
    channel, transport, clock, resource = _channel()
    channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
    clock.advance(30.0)  # A slow body: only twisted.web's own idle timeout applies.
    assert not transport.disconnecting
    channel.dataReceived(b"cd")
    assert parse(transport.value()).body == b"got abcd"
    transport.clear()
    channel.dataReceived(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(3600.0)  # A follow or an event stream may last hours.
    assert not transport.disconnecting
    resource.held[0].finish()
    assert b"first" in transport.value()


def test_a_kept_alive_connection_is_closed_when_idle() -> None:
    channel, transport, clock, _ = _channel(head=10.0, idle=30.0)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse(transport.value()).body == b"ok"
    clock.advance(29.0)
    assert not transport.disconnecting
    channel.dataReceived(b"GET / HTTP/1.1\r\n")  # The next head starts: 10 s from now.
    clock.advance(9.0)
    assert not transport.disconnecting
    channel.dataReceived(b"Host: x\r\n\r\n")
    clock.advance(29.0)
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.disconnecting


def test_zero_disables_the_limits() -> None:
    _, transport, clock, _ = _channel(head=0, idle=0)
    clock.advance(50.0)  # twisted.web's own idle timeout (60 s, reset by any byte) remains
    assert not transport.disconnecting


def test_every_site_of_the_roles_is_hardened() -> None:
    from treadmill.common import metrics
    from treadmill.imagestore.site import RegistrySite

    assert issubclass(RegistrySite, HardenedSite)
    assert isinstance(limited_site(Resource(), 10), HardenedSite)
    assert issubclass(metrics._QuietSite, HardenedSite)


@pytest_twisted.ensureDeferred
async def test_slowloris_connections_are_dropped_by_a_real_server(tmp_path: Path) -> None:
    """Many connections dripping a head byte by byte: all closed at the deadline,
    while a WebSocket follow opened meanwhile stays up and a normal request is served."""
    from tests.logserver.support import LogClient, new_job

    keys = LogKeys(tmp_path)
    running = await start_logserver(tmp_path / "logs", keys)
    try:
        site = running.service.site
        site.head_timeout = 1.0
        port = _port(running.url)
        slow = [await raw_connect(port) for _ in range(50)]
        started = reactor.seconds()
        for _ in range(3):
            for proto in slow:
                if proto.transport.connected:
                    proto.transport.write(b"G")
            await deferLater(reactor, 0.4, lambda: None)
        for proto in slow:
            await proto.closed
        assert reactor.seconds() - started < 3.0
        assert all(parse(p.data).status == 408 for p in slow)
        client = LogClient(running.url)
        job = new_job()
        assert (await client.append(job, "console", 0, b"hi",
                                    keys.token(job, "append"))).code == 200
        follower = await raw_connect(port)
        follower.transport.write(
            f"GET /v1/jobs/{job}/streams/console/follow HTTP/1.1\r\nHost: x\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {keys.token(job, 'read')}\r\n\r\n".encode())
        await deferLater(reactor, 1.5, lambda: None)
        assert follower.data.startswith(b"HTTP/1.1 101"), follower.data[:200]
        assert not follower.closed.called, "the WebSocket outlives the head deadline"
        follower.transport.abortConnection()
        await follower.closed
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_daemon_applies_its_head_timeout_setting(tmp_path: Path) -> None:
    """twistd treadmill-logserver --http-head-timeout: the setting reaches every listener,
    the metrics one included; a well-behaved client is served meanwhile."""
    from tests.util.daemons import Daemon

    keys = LogKeys(tmp_path)
    port, metrics = free_port(), free_port()
    daemon = Daemon("treadmill-logserver", [
        "--root", str(tmp_path / "logs"), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--auth-keys-file", str(keys.keys_file), "--http-head-timeout", "0.5",
        "--metrics-listen", f"tcp:{metrics}:interface=127.0.0.1"])
    daemon.start()
    try:
        await daemon.wait_http(f"http://127.0.0.1:{port}/healthz")
        for listener in (port, metrics):
            slow = await raw_connect(listener)
            slow.transport.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            started = reactor.seconds()
            answer = parse(await slow.closed)
            assert answer.status == 408 and answer.json["error"]["code"] == "request_timeout"
            assert 0.4 < reactor.seconds() - started < 3.0
            reply = await send(listener, b"GET", b"/metrics" if listener == metrics
                               else b"/healthz", {})
            assert reply.status == 200
    finally:
        await daemon.stop()
    assert "Traceback" not in daemon.output
