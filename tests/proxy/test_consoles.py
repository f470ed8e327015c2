"""Consoles: services that do not authenticate their users get no public port, and their
WebSocket path needs a console token for the job (read watches, manage types).

A real proxy, a real ExposureManager dialling back, and local services, over loopback;
tokens are real capability tokens signed as the switchboard signs them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher

from tests.proxy.support import (
    Keys,
    Running,
    console,
    console_echo,
    echo_client,
    new_job,
    opened_control,
    start_proxy,
)
from tests.util.waiting import eventually, sleep
from treadmill.protocol import proxy as messages
from treadmill.protocol.proxy import ConsoleCloseCode
from treadmill.proxy.service import redacting_log_formatter
from treadmill.supervisor.echo import listen_echo
from treadmill.supervisor.exposure import ExposureManager

VIAS = ("frame", "query", "header")


class Recorder(Protocol):
    """A console service: greets every client, records what each one sent."""

    def __init__(self, inputs: list[bytearray]) -> None:
        self.received = bytearray()
        inputs.append(self.received)

    def connectionMade(self) -> None:
        self.transport.write(b"login: ")

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.write(b"<" + data + b">")


@dataclass
class Bed:
    """A proxy with one job's console published by a real exposure manager."""

    proxy: Running
    keys: Keys
    job: str
    manager: ExposureManager
    endpoints: dict[str, dict[str, Any]]
    inputs: list[bytearray]

    def token(self, *actions: str, job: str | None = None, **kw: Any) -> str:
        kw.setdefault("subject", "alice")
        return self.keys.token(job or self.job, actions=actions, **kw)


@pytest_twisted.async_yield_fixture(params=[0, None], ids=["connect", "pool"])
async def bed(keys: Keys, request: pytest.FixtureRequest) -> AsyncIterator[Bed]:
    """Each test twice: every client through a ``connect`` round trip (no pool), and every
    client through a pooled data connection (control minor 2): the console rules, the
    read-only filtering and the audit notices must not tell them apart."""
    pool: int | None = request.param
    # connect_timeout bounds both the wait for a token and the supervisor's dial-back: at
    # 0.5 s a connect round trip on a loaded 4-worker CI run missed it once.
    proxy = await start_proxy(keys, connect_timeout=2.0)
    echo = listen_echo(reactor)
    inputs: list[bytearray] = []
    recorder = reactor.listenTCP(0, Factory.forProtocol(lambda: Recorder(inputs)),
                                 interface="127.0.0.1")
    job = new_job()
    manager = ExposureManager(
        reactor, job, [{"url": proxy.ws, "token": keys.token(job)}],
        {"echo": ("127.0.0.1", echo.getHost().port),
         "console": ("127.0.0.1", recorder.getHost().port),
         "ssh": ("127.0.0.1", echo.getHost().port, True)}, reconnect_initial=0.05,
        pool=pool)
    manager.start()
    endpoints = {e["service"]: e for e in await manager.published()}
    registry = proxy.registry
    try:
        if pool is None:
            await eventually(lambda: registry.pool.waiting(job) == registry.settings.pool_per_job)
        yield Bed(proxy, keys, job, manager, endpoints, inputs)
        if pool is None:  # every client of the test came through the pool
            assert registry.counts["pool_empty"] == 0
            assert registry.counts["pool_joined"] == registry.counts["spliced"]
        else:
            assert registry.counts["pool_joined"] == 0
    finally:
        await manager.close()
        await echo.stopListening()
        await recorder.stopListening()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_only_self_authenticating_services_get_a_public_port(bed: Bed) -> None:
    ssh, echo, cons = bed.endpoints["ssh"], bed.endpoints["echo"], bed.endpoints["console"]
    assert ssh["auth"] == "service" and isinstance(ssh["port"], int)
    for endpoint in (echo, cons):
        assert endpoint["auth"] == "token" and "port" not in endpoint
        assert endpoint["url"].startswith(bed.proxy.ws + "/v1/tunnels/")
    tunnels = bed.proxy.registry.sessions[bed.job].tunnels
    assert tunnels["echo"].listener is None and tunnels["console"].tcp_port is None
    assert bed.proxy.registry.ports.in_use == {ssh["port"]}
    # The SSH path stays open to anyone (sshd authenticates): no token needed.
    client = await console(ssh["url"])
    await client.opened
    client.type(b"ping")
    assert await client.wait_for(4) == b"ping"
    client.sendClose(1000)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("via", VIAS)
async def test_manage_types_through_every_way_of_presenting_the_token(bed: Bed,
                                                                     via: str) -> None:
    url = bed.endpoints["echo"]["url"]
    assert await console_echo(url, bed.token("read", "manage"), b"typed", via) == b"typed"
    assert bed.proxy.registry.counts["console_manage"] == 1


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("via", VIAS)
async def test_read_watches_but_its_bytes_never_reach_the_service(bed: Bed, via: str) -> None:
    url = bed.endpoints["console"]["url"]
    watcher = await console(url, bed.token("read"), via)
    await watcher.opened
    assert await watcher.wait_for(7) == b"login: "
    watcher.type(b"rm -rf /\n")
    watcher.sendMessage(messages_eof(), isBinary=False)  # not even an end of file
    typist = await console(url, bed.token("read", "manage"), via)
    await typist.opened
    assert await typist.wait_for(7) == b"login: "
    typist.type(b"root")
    assert await typist.wait_for(13) == b"login: <root>"
    watcher.type(b"more")
    await sleep(0.2)
    watcher.sendClose(1000)
    typist.sendClose(1000)
    await watcher.closed
    await typist.closed
    await sleep(0.1)
    assert sorted(bytes(b) for b in bed.inputs) == [b"", b"root"]
    assert watcher.output == b"login: "
    assert bed.proxy.registry.counts["console_input_dropped"] == 2


def messages_eof() -> bytes:
    return b"eof"


async def refusal(url: str, token: str | None, via: str = "frame") -> tuple[Any, Any]:
    client = await console(url, token, via)
    await client.opened
    client.type(b"let me in")
    code, reason = await client.closed
    assert client.output == b""
    return code, reason


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("via", VIAS)
async def test_a_console_is_refused_without_a_good_token(bed: Bed, keys: Keys,
                                                         via: str) -> None:
    url = bed.endpoints["echo"]["url"]
    unauthorized = [
        bed.token("read", "manage", ttl=1.0, issued_at=reactor.seconds() - 60),  # expired
        bed.token("read", "manage", audience="treadmill-logserver"),  # wrong audience
        "not-a-token",
    ]
    for token in unauthorized:
        code, reason = await refusal(url, token, via)
        assert code == ConsoleCloseCode.UNAUTHORIZED, reason
    forbidden = [
        bed.token("read", "manage", job=new_job()),  # another job's
        bed.token("publish"),  # the supervisor's own token
        keys.token(bed.job, kind="job", actions=("read",)),  # a log-read token
    ]
    for token in forbidden:
        code, reason = await refusal(url, token, via)
        assert code == ConsoleCloseCode.FORBIDDEN, reason
        assert "neither read nor manage" in reason
    registry = bed.proxy.registry
    assert registry.counts["spliced"] == 0 and registry.counts["console_refused"] == 6
    assert bed.manager.counts["spliced"] == 0  # the supervisor was never even asked


@pytest_twisted.ensureDeferred
async def test_no_token_in_time_or_bytes_first_is_refused(bed: Bed) -> None:
    url = bed.endpoints["echo"]["url"]
    silent = await console(url)
    await silent.opened
    code, reason = await silent.closed
    assert code == ConsoleCloseCode.UNAUTHORIZED and "no console token" in reason
    assert await refusal(url, None) == (ConsoleCloseCode.UNAUTHORIZED,
                                        "send the console token first (a text message)")
    assert bed.proxy.registry.counts["spliced"] == 0


@pytest_twisted.ensureDeferred
async def test_console_connections_are_logged_with_subject_job_and_access(bed: Bed) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        url = bed.endpoints["echo"]["url"]
        secret = bed.token("read", subject="bob")
        await console_echo(url, bed.token("read", "manage", subject="alice"), b"x")
        client = await console(url, secret, "query")
        await client.opened
        client.sendClose(1000)
        await refusal(url, bed.token("read", job=new_job(), subject="mallory"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    audit = [e for e in events if e.get("audit_event")]
    assert [(e["audit_event"], e["subject"], e.get("access")) for e in audit] == [
        ("console_opened", "alice", "manage"), ("console_opened", "bob", "read"),
        ("console_refused", "mallory", None)]
    for event in audit:
        assert event["job"] == bed.job and event["service"] == "echo"
        assert event["log_level"].name == "info"
        # The namespace docs/proxy.md names for filtering them (a Logger that is a class
        # attribute would be renamed after its class, treadmill.proxy.legs.TunnelSocket).
        assert event["log_namespace"] == "treadmill.proxy.consoles", event
    assert not [e for e in events if secret in repr(e)]  # no token in any log event


def test_the_access_log_hides_a_console_token() -> None:
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b"v1", b"tunnels", b"abc"])
    request.uri = b"/v1/tunnels/abc?x=1&token=eyJSECRET.eyJ.sig&y=2"
    request.method = b"GET"
    request.code = 101
    request.sentLength = 0
    request.clientproto = b"HTTP/1.1"
    line = redacting_log_formatter("[01/Dec/2026:00:00:00 +0000]", request)
    assert "SECRET" not in line and "token=REDACTED&y=2" in line


@pytest_twisted.ensureDeferred
async def test_a_service_that_stops_authenticating_loses_its_port(keys: Keys) -> None:
    proxy = await start_proxy(keys)
    job = new_job()
    control = await opened_control(proxy, keys.token(job))
    try:
        control.send(messages.publish(1, "svc", authenticates=True))
        first = await control.next()
        assert first["auth"] == "service" and "tcp_port" in first
        client = await echo_client(first["tcp_port"])  # a client of the open port
        assert (await control.next())["type"] == "connect"  # (no supervisor answers)
        control.send(messages.publish(2, "svc"))
        second = await control.next()
        assert second["auth"] == "token" and "tcp_port" not in second
        assert second["ws_path"] == first["ws_path"]
        await client.lost  # the client that came in without a token is gone
        assert proxy.registry.ports.in_use == set()
    finally:
        control.sendClose(1000)
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_clients_waiting_to_present_a_token_are_limited(keys: Keys) -> None:
    proxy = await start_proxy(keys, connect_timeout=0.5, max_connections_per_tunnel=2)
    echo = listen_echo(reactor)
    job = new_job()
    manager = ExposureManager(reactor, job, [{"url": proxy.ws, "token": keys.token(job)}],
                              {"echo": ("127.0.0.1", echo.getHost().port)},
                              reconnect_initial=0.05)
    manager.start()
    try:
        url = (await manager.published())[0]["url"]
        silent = [await console(url) for _ in range(2)]
        for client in silent:
            await client.opened
        third = await console(url)
        await third.opened
        assert (await third.closed)[0] == ConsoleCloseCode.BUSY  # try again later
        for client in silent:  # they never sent a token: closed after connect_timeout
            assert (await client.closed)[0] == ConsoleCloseCode.UNAUTHORIZED
        assert proxy.registry.sessions[job].tunnels["echo"].unauthenticated == 0
        token = keys.token(job, actions=("read", "manage"), subject="alice")
        assert await console_echo(url, token, b"room again") == b"room again"
    finally:
        await manager.close()
        await echo.stopListening()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_console_clients_are_reported_to_the_supervisor_for_the_audit_log(
        bed: Bed, keys: Keys) -> None:
    """Control minor 1: each console client that opened (its token verified) and closed
    reaches the supervisor with the token's user, jti and access and the client's address;
    refused clients and SSH clients are not console connections."""
    notices: list[dict[str, Any]] = []
    bed.manager.on_console(notices.append)
    url = bed.endpoints["echo"]["url"]
    assert await refusal(url, bed.token("read", job=new_job()))
    ssh = await console(bed.endpoints["ssh"]["url"])
    await ssh.opened
    ssh.sendClose(1000)
    token = bed.token("read", "manage", subject="carol")
    assert await console_echo(url, token, b"hi", "header") == b"hi"
    watcher = await console(bed.endpoints["console"]["url"], bed.token("read", subject="dave"))
    await watcher.opened
    await watcher.wait_for(7)
    watcher.sendClose(1000)
    await watcher.closed
    for _ in range(50):
        if len(notices) == 4:
            break
        await sleep(0.05)
    by_user = sorted(notices, key=lambda n: (n["subject"], n["at"]))
    assert [(n["subject"], n["event"], n["service"], n["access"]) for n in by_user] == [
        ("carol", "opened", "echo", "manage"), ("carol", "closed", "echo", "manage"),
        ("dave", "opened", "console", "read"), ("dave", "closed", "console", "read")]
    assert by_user[0]["conn_id"] == by_user[1]["conn_id"] != by_user[2]["conn_id"]
    assert {n["peer"] for n in notices} == {"127.0.0.1"}
    assert {n["proxy"] for n in notices} == {bed.proxy.ws}
    assert all(len(n["jti"]) >= 16 for n in notices)
    assert token not in repr(notices)
    assert by_user[0]["at"] <= by_user[1]["at"]


@pytest_twisted.ensureDeferred
async def test_an_older_supervisor_gets_no_console_notices(keys: Keys) -> None:
    """A control connection that announced no minor (an older supervisor) never sees
    ``console`` (it would be a violation there); one of minor 1 sees it before ``connect``."""
    proxy = await start_proxy(keys, connect_timeout=0.5)
    try:
        for minor, expected in ((None, ["connect"]), (1, ["console", "connect"])):
            job = new_job()
            control = await opened_control(proxy, keys.token(job), job, minor=minor)
            control.send(messages.publish(1, "echo", tcp=False))
            published = await control.next()
            assert published["type"] == "published", published
            client = await console(proxy.ws + published["ws_path"],
                                   keys.token(job, actions=("read",), subject="erin"))
            await client.opened
            kinds = [(await control.next())["type"] for _ in expected]
            assert kinds == expected
            control.sendClose(1000)
            await client.closed
        assert proxy.registry.counts["console_notice_unsupported"] == 1
    finally:
        await proxy.stop()
