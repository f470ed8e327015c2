"""The control protocol: who may publish what, data connection authentication, bad input."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from tests.proxy.support import (
    EchoClient,
    Keys,
    Running,
    echo_client,
    echo_once,
    new_job,
    opened_control,
    raw_control,
    start_proxy,
)
from tests.util.waiting import eventually
from treadmill.common.schema import validator
from treadmill.protocol import proxy as messages
from treadmill.supervisor.echo import listen_echo
from treadmill.supervisor.exposure import ExposureManager


def test_every_message_the_code_builds_matches_the_schema() -> None:
    built = [
        messages.welcome("job-1", 8091, False, "proxy.example", 30.0, ["ssh"]),
        messages.publish(1, "ssh", authenticates=True), messages.publish(2, "console", tcp=False),
        messages.published(1, "ssh", "proxy.example", tcp_port=40000,
                           ws_path="/v1/tunnels/" + "a" * 32, ws_url="wss://p/v1/tunnels/x"),
        messages.published(2, "ssh", "proxy.example", ws_path="/v1/tunnels/" + "b" * 24,
                           auth="token"),
        messages.unpublish(3, "ssh"), messages.unpublished(3, "ssh"),
        messages.connect("c" * 24, "ssh"), messages.connect_failed("c" * 24, "refused"),
        messages.error(4, "ports_exhausted", "no port", "ssh"),
        messages.error(5, "bad_request", "no"), messages.protocol_error("bad"),
        messages.console("opened", "c" * 24, "console", "alice", "read", "::1", 1.5, "j"),
    ]
    whole = validator(messages.schema())
    for message in built:
        messages.validate(message)  # against the part of the schema for its type
        assert whole.is_valid(message)  # and the whole schema agrees
    assert {m["type"] for m in built} == set(messages.TO_PROXY) | set(messages.TO_SUPERVISOR)


def test_data_headers_round_trip_and_refuse_junk() -> None:
    line = messages.data_header("c" * 24, "a.b.c")
    assert line.endswith(b"\n")
    assert messages.parse_data_header(line[:-1]) == ("c" * 24, "a.b.c")
    for junk in (b"", b"GET / HTTP/1.1", b"TREADMILL-DATA/1 short a.b.c",
                 b"TREADMILL-DATA/2 " + b"c" * 24 + b" a.b.c", b"TREADMILL-DATA/1 " + b"c" * 24,
                 b"TREADMILL-DATA/1 " + b"c" * 24 + b" a b"):
        with pytest.raises(messages.ProtocolError):
            messages.parse_data_header(junk)


@pytest.mark.parametrize(("case", "status"), [
    ("no token", 401),
    ("another audience", 401),
    ("expired", 401),
    ("a token for another job", 403),
    ("a log token for the job", 403),
    ("no subprotocol", 400),
])
@pytest_twisted.ensureDeferred
async def test_control_connections_are_authenticated(proxy: Running, keys: Keys, case: str,
                                                     status: int) -> None:
    job, other = new_job(), new_job()
    token, ask, protocols = {
        "no token": (None, job, None),
        "another audience": (keys.token(job, audience="treadmill-logserver"), job, None),
        "expired": (keys.token(job, ttl=60, issued_at=reactor.seconds() - 3600), job, None),
        "a token for another job": (keys.token(other), job, None),
        "a log token for the job": (keys.token(job, kind="job", actions=("append",)), None,
                                    None),
        "no subprotocol": (keys.token(job), job, []),
    }[case]
    control = await raw_control(proxy, token, ask, protocols)
    with pytest.raises(AssertionError):
        await control.opened
    assert control.http_status == status
    assert not proxy.registry.sessions


@pytest_twisted.ensureDeferred
async def test_the_job_comes_from_the_token(proxy: Running, keys: Keys) -> None:
    job = new_job()
    control = await opened_control(proxy, keys.token(job))  # no ?job=
    assert list(proxy.registry.sessions) == [job]
    control.sendClose(1000)


@pytest_twisted.ensureDeferred
async def test_a_job_cannot_use_another_jobs_conn_id(proxy: Running, keys: Keys) -> None:
    echo = listen_echo(reactor)
    job_a, job_b = new_job(), new_job()
    token_a, token_b = keys.token(job_a), keys.token(job_b)
    control_a = await opened_control(proxy, token_a)
    control_b = await opened_control(proxy, token_b)
    try:
        control_b.send(messages.publish(1, "ssh", authenticates=True))
        port_b = (await control_b.next())["tcp_port"]
        client = await echo_client(port_b)
        conn_id = (await control_b.next())["conn_id"]

        async def dial(token: str) -> EchoClient:
            data = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                            proxy.data_port), EchoClient())
            data.transport.write(messages.data_header(conn_id, token) + b"from the service")
            return data

        stolen = await dial(token_a)  # job A's valid token, job B's conn_id
        await stolen.lost
        assert proxy.registry.counts["data_refused"] == 1
        assert not client.lost.called and client.data == b""
        # B's own data connection still gets the client (the conn_id was not spent).
        data = await dial(token_b)
        assert await client.wait_for(16) == b"from the service"
        client.transport.write(b"from the client")
        assert await data.wait_for(15) == b"from the client"
        # Once used, a conn_id is gone.
        again = await dial(token_b)
        await again.lost
        assert proxy.registry.counts["data_unknown"] == 1
        client.transport.loseConnection()
        await data.lost
    finally:
        control_a.sendClose(1000)
        control_b.sendClose(1000)
        await echo.stopListening()


@pytest_twisted.ensureDeferred
async def test_data_connections_must_start_with_a_header(keys: Keys) -> None:
    proxy = await start_proxy(keys, connect_timeout=0.3)
    try:
        junk = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.data_port),
                                     EchoClient())
        junk.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        await junk.lost
        silent = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                          proxy.data_port), EchoClient())
        await silent.lost  # after the connect timeout
        assert proxy.registry.counts["data_malformed"] == 1
        assert proxy.registry.counts["data_no_header"] == 1
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_running_out_of_ports_is_a_clear_error(keys: Keys) -> None:
    proxy = await start_proxy(keys, ports=None)
    first, last = proxy.registry.settings.ports
    size = last - first + 1
    job = new_job()
    control = await opened_control(proxy, keys.token(job))
    try:
        ports = []
        for i in range(size):
            control.send(messages.publish(i, f"s{i}", websocket=False, authenticates=True))
            reply = await control.next()
            assert reply["type"] == "published"
            ports.append(reply["tcp_port"])
        assert sorted(ports) == list(range(first, last + 1))
        control.send(messages.publish(99, "one-too-many", authenticates=True))
        error = await control.next()
        assert error["type"] == "error" and error["request_id"] == 99
        assert error["code"] == "ports_exhausted" and error["service"] == "one-too-many"
        assert f"{first}-{last}" in error["message"]
        # The tunnels that have ports still work, and a released port is handed out again.
        control.send(messages.unpublish(100, "s0"))
        assert (await control.next())["type"] == "unpublished"
        control.send(messages.publish(101, "one-too-many", authenticates=True))
        assert (await control.next())["tcp_port"] == ports[0]
    finally:
        control.sendClose(1000)
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_tunnels_per_job_are_limited(keys: Keys) -> None:
    proxy = await start_proxy(keys, max_tunnels_per_job=2)
    control = await opened_control(proxy, keys.token(new_job()))
    try:
        for i in range(3):
            control.send(messages.publish(i, f"s{i}", tcp=False))
        replies = [await control.next() for _ in range(3)]
        assert [r["type"] for r in replies] == ["published", "published", "error"]
        assert replies[2]["code"] == "too_many_tunnels"
    finally:
        control.sendClose(1000)
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_static_ports_by_job_and_by_host(keys: Keys) -> None:
    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    job, other = new_job(), new_job()
    by_job, by_host = free(), free()
    proxy = await start_proxy(keys, static={f"{job}/ssh": by_job, "board-7/console": by_host})
    a = await opened_control(proxy, keys.token(job))
    b = await opened_control(proxy, keys.token(other, subject="board-7"))
    try:
        a.send(messages.publish(1, "ssh", authenticates=True))
        b.send(messages.publish(1, "console", authenticates=True))
        assert (await a.next())["tcp_port"] == by_job
        assert (await b.next())["tcp_port"] == by_host
        b.send(messages.publish(2, "ssh", authenticates=True))  # not static; no range
        refused = await b.next()
        assert refused["code"] == "ports_exhausted" and "no port range" in refused["message"]
    finally:
        a.sendClose(1000)
        b.sendClose(1000)
        await proxy.stop()


@pytest.mark.parametrize("bad", [
    b"not json",
    b'{"type": "publish"}',
    b'{"type": "publish", "request_id": 1, "service": "ssh", "tcp": true, "websocket": true, '
    b'"extra": 1}',
    b'{"type": "publish", "request_id": 1, "service": "../etc", "tcp": true, '
    b'"websocket": true}',
    b'{"type": "connect", "conn_id": "cccccccccccccccccccccccc", "service": "ssh"}',
    b'{"type": "nonsense"}',
    b"[1, 2]",
    b"binary",
])
@pytest_twisted.ensureDeferred
async def test_malformed_messages_close_only_that_control_connection(
        proxy: Running, keys: Keys, bad: bytes) -> None:
    echo = listen_echo(reactor)
    good = new_job()
    manager = ExposureManager(reactor, good, [{"url": proxy.ws, "token": keys.token(good)}],
                              {"echo": ("127.0.0.1", echo.getHost().port, True)},
                              reconnect_initial=0.05)
    manager.start()
    port = (await manager.published())[0]["port"]
    client = await echo_client(port)  # a live connection of the other job
    job = new_job()
    control = await opened_control(proxy, keys.token(job))
    try:
        control.send(messages.publish(1, "ssh", authenticates=True))
        await control.next()
        if bad == b"binary":
            control.sendMessage(b"\x00\x01", isBinary=True)
        else:
            control.send(bad)
        error = await control.next()
        assert error["type"] == "protocol_error" and error["code"] == "violation"
        code, _ = await control.closed
        assert code == messages.CloseCode.PROTOCOL_VIOLATION
        assert proxy.registry.counts["control_violation"] == 1
        # The other job is unaffected: its live connection and new ones work.
        client.transport.write(b"still here")
        assert await client.wait_for(10) == b"still here"
        assert await echo_once(port) == b"hello"
        # The offender's tunnels wait out the grace period like after any loss.
        assert job in proxy.registry.sessions
        assert proxy.registry.sessions[good].control is not None
    finally:
        client.transport.loseConnection()
        await manager.close()
        await echo.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_new_control_connection_supersedes_the_old_one(proxy: Running,
                                                               keys: Keys) -> None:
    job = new_job()
    old = await opened_control(proxy, keys.token(job))
    old.send(messages.publish(1, "ssh", authenticates=True))
    port = (await old.next())["tcp_port"]
    new = await raw_control(proxy, keys.token(job))
    await new.opened
    welcome = await new.next()
    assert welcome["published"] == ["ssh"] and welcome["data_port"] == proxy.data_port
    code, _ = await old.closed
    assert code == messages.CloseCode.SUPERSEDED
    # Clients are announced on the new connection.
    client = await echo_client(port)
    assert (await new.next())["type"] == "connect"
    client.transport.loseConnection()
    new.send(messages.publish(2, "ssh", authenticates=True))
    assert (await new.next())["tcp_port"] == port
    new.sendClose(1000)
    await eventually(lambda: not proxy.registry.sessions)
