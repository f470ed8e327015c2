"""Tunnels end to end in one process: a proxy, a supervisor's ExposureManager, local services.

Integrity (large random transfers both ways, through the public port and the
WebSocket path), many concurrent connections, and the limits: connections per
tunnel, the pending-connect timeout, the idle timeout, unreachable services.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from tests.proxy.support import (
    Keys,
    Running,
    Transfer,
    TransferService,
    console,
    echo_client,
    echo_once,
    expected_digest,
    new_job,
    opened_control,
    start_proxy,
    start_tls_proxy,
    tcp_transfer,
    ws_transfer,
)
from tests.proxy.support import echo as echo  # the fixture
from tests.util.waiting import eventually, sleep
from treadmill.common.splice import UNSUPPORTED_DATA
from treadmill.protocol import proxy as messages
from treadmill.supervisor.echo import listen_echo
from treadmill.supervisor.exposure import ExposureManager

MiB = 1024 * 1024


class Job:
    """A job whose supervisor publishes ``services`` on ``proxy``."""

    def __init__(self, proxy: Running, keys: Keys, services: dict[str, tuple[str, int]],
                 job: str | None = None, pool: int | None = None):
        self.id = job or new_job()
        self.manager = ExposureManager(reactor, self.id, [{"url": proxy.ws,
                                                           "token": keys.token(self.id)}],
                                       services, reconnect_initial=0.05, reconnect_max=0.5,
                                       pool=pool)

    async def start(self) -> dict[str, dict[str, Any]]:
        self.manager.start()
        endpoints = await self.manager.published()
        return {e["service"]: e for e in endpoints}


@pytest_twisted.ensureDeferred
async def test_tcp_transfer_both_ways_is_intact(proxy: Running, keys: Keys) -> None:
    size = 64 * MiB
    service = TransferService(lambda: Transfer(size, seed=2))
    job = Job(proxy, keys, {"data": ("127.0.0.1", service.listen(), True)})
    endpoints = await job.start()
    try:
        client = await tcp_transfer(endpoints["data"]["port"], Transfer(size, seed=1))
        served = await service.outcomes[0]
        assert client.received_bytes == size and served.received_bytes == size
        assert client.received == served.sent == expected_digest(size, 2)
        assert served.received == client.sent == expected_digest(size, 1)
    finally:
        await job.manager.close()
        await service.stop()


@pytest_twisted.ensureDeferred
async def test_websocket_transfer_both_ways_is_intact(proxy: Running, keys: Keys) -> None:
    size = 64 * MiB
    # A WebSocket has no half-close: the service closes once it has sent and received all.
    service = TransferService(lambda: Transfer(size, seed=4, expect=size, half_close=False))
    job = Job(proxy, keys, {"data": ("127.0.0.1", service.listen(), True)})
    endpoints = await job.start()
    try:
        url = endpoints["data"]["url"]
        assert url.startswith(proxy.ws + "/v1/tunnels/")
        client = await ws_transfer(url, size, seed=3, expect=size)
        served = await service.outcomes[0]
        assert client.received_bytes == size and served.received_bytes == size
        assert client.received == served.sent == expected_digest(size, 4)
        assert served.received == client.sent == expected_digest(size, 3)
    finally:
        await job.manager.close()
        await service.stop()


@pytest_twisted.ensureDeferred
async def test_many_concurrent_connections_through_one_tunnel(keys: Keys, echo: int) -> None:
    proxy = await start_proxy(keys, max_connections_per_tunnel=400)
    job = Job(proxy, keys, {"echo": ("127.0.0.1", echo, True)})
    try:
        port = (await job.start())["echo"]["port"]
        clients = await gatherResults([echo_client(port) for _ in range(300)])
        payloads = [f"client {i} ".encode() * 100 for i in range(len(clients))]
        for client, payload in zip(clients, payloads, strict=True):
            client.transport.write(payload)
        echoed = await gatherResults([c.wait_for(len(p), timeout=20)
                                      for c, p in zip(clients, payloads, strict=True)])
        assert echoed == payloads
        assert len(proxy.registry.splices) == 300 and job.manager.connections == 300
        for client in clients:
            client.transport.loseConnection()
        await eventually(lambda: not proxy.registry.splices and not job.manager.connections)
        assert proxy.registry.counts["spliced"] == 300
    finally:
        await job.manager.close()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_sees_the_end_of_file_of_the_service(proxy: Running, keys: Keys,
                                                            echo: int) -> None:
    job = Job(proxy, keys, {"echo": ("127.0.0.1", echo, True)})
    port = (await job.start())["echo"]["port"]
    try:
        client = await echo_client(port)
        client.transport.write(b"last words")
        client.transport.loseWriteConnection()  # the echo service closes after our EOF
        await client.lost
        assert client.data == b"last words"
    finally:
        await job.manager.close()


@pytest_twisted.ensureDeferred
async def test_connections_per_tunnel_are_limited(keys: Keys, echo: int) -> None:
    proxy = await start_proxy(keys, max_connections_per_tunnel=2)
    job = Job(proxy, keys, {"echo": ("127.0.0.1", echo, True)})
    try:
        port = (await job.start())["echo"]["port"]
        first, second = await echo_client(port), await echo_client(port)
        third = await echo_client(port)
        await third.lost  # refused at once
        for client in (first, second):
            client.transport.write(b"ok")
            assert await client.wait_for(2) == b"ok"
        assert proxy.registry.counts["refused_limit"] == 1
        first.transport.loseConnection()
        await eventually(lambda: len(proxy.registry.splices) == 1)
        assert await echo_once(port, b"again") == b"again"  # room again
        second.transport.loseConnection()
    finally:
        await job.manager.close()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_whose_data_connection_never_comes_is_closed(keys: Keys) -> None:
    proxy = await start_proxy(keys, connect_timeout=0.3)
    job = new_job()
    control = await opened_control(proxy, keys.token(job))  # answers nothing
    try:
        control.send(messages.publish(1, "ssh", authenticates=True))
        port = (await control.next())["tcp_port"]
        client = await echo_client(port)
        started = reactor.seconds()
        connect = await control.next()
        assert connect["type"] == "connect" and connect["service"] == "ssh"
        await client.lost
        assert 0.25 <= reactor.seconds() - started < 2
        assert proxy.registry.counts["connect_timeout"] == 1 and not proxy.registry.pending
    finally:
        control.sendClose(1000)
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_idle_connections_are_closed(keys: Keys, echo: int) -> None:
    proxy = await start_proxy(keys, idle_timeout=0.3)
    job = Job(proxy, keys, {"echo": ("127.0.0.1", echo, True)})
    try:
        port = (await job.start())["echo"]["port"]
        busy, idle = await echo_client(port), await echo_client(port)
        for client in (busy, idle):
            client.transport.write(b"x")
            await client.wait_for(1)
        for i in range(8):  # 0.8 s of traffic on one connection only
            busy.transport.write(b"y")
            await busy.wait_for(2 + i)
            await sleep(0.1)
        assert idle.lost.called and not busy.lost.called
        assert proxy.registry.counts["idle_timeout"] == 1
        busy.transport.loseConnection()
    finally:
        await job.manager.close()
        await proxy.stop()


@pytest.mark.parametrize("pool", [0, 2])
@pytest_twisted.ensureDeferred
async def test_an_unreachable_service_closes_the_client_at_once(proxy: Running, keys: Keys,
                                                                pool: int) -> None:
    """Through a ``connect`` (``connect_failed``) or a pooled data connection (the
    supervisor closes it, and with it the client)."""
    nothing = listen_echo(reactor)
    dead = nothing.getHost().port
    await nothing.stopListening()
    job = Job(proxy, keys, {"echo": ("127.0.0.1", dead, True)}, pool=pool)
    try:
        port = (await job.start())["echo"]["port"]
        await eventually(lambda: proxy.registry.pool.waiting(job.id) == pool)
        client = await echo_client(port)
        started = reactor.seconds()
        await client.lost
        assert reactor.seconds() - started < 2  # not the 5 s connect timeout
        assert client.data == b""
        if pool:
            assert proxy.registry.counts["pool_joined"] == 1
        else:
            await eventually(lambda: proxy.registry.counts["connect_failed"] == 1)
            # The data connection of an unreachable service never presents its header:
            # the client is not joined to it (and it is not refused as unknown either).
            assert proxy.registry.counts["spliced"] == 0
            assert proxy.registry.counts["data_unknown"] == 0
        await eventually(lambda: job.manager.counts["local_failed"] == 1)
    finally:
        await job.manager.close()


@pytest_twisted.ensureDeferred
async def test_unpublish_and_the_end_of_the_job_close_tunnels(proxy: Running, keys: Keys,
                                                              echo: int) -> None:
    job = new_job()
    control = await opened_control(proxy, keys.token(job))
    control.send(messages.publish(1, "a", authenticates=True))
    control.send(messages.publish(2, "b", tcp=False, authenticates=True))
    a, b = await control.next(), await control.next()
    assert "tcp_port" in a and "ws_path" in a and "tcp_port" not in b and "ws_path" in b
    control.send(messages.unpublish(3, "a"))
    assert await control.next() == messages.unpublished(3, "a")
    control.send(messages.unpublish(4, "a"))
    assert (await control.next())["code"] == "not_published"
    with pytest.raises(Exception):  # noqa: B017 - connection refused
        await echo_client(a["tcp_port"])
    ws = proxy.url + b["ws_path"]
    assert (await treq.get(ws)).code == 400  # there, but a WebSocket endpoint
    control.sendClose(1000)  # the job ended: no grace
    await control.closed
    await eventually(lambda: not proxy.registry.sessions)
    response = await treq.get(ws)
    assert response.code == 404
    assert (await response.json())["error"]["code"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_publish_is_idempotent_and_checked(proxy: Running, keys: Keys) -> None:
    job = new_job()
    control = await opened_control(proxy, keys.token(job))
    try:
        control.send(messages.publish(1, "ssh", authenticates=True))
        first = await control.next()
        control.send(messages.publish(2, "ssh", authenticates=True))
        again = await control.next()
        assert {**first, "request_id": 2} == again
        control.send(messages.publish(3, "ssh", tcp=False, websocket=False))
        refused = await control.next()
        assert refused["type"] == "error" and refused["code"] == "bad_request"
        assert refused["request_id"] == 3 and refused["service"] == "ssh"
    finally:
        control.sendClose(1000)


@pytest_twisted.ensureDeferred
async def test_healthz(proxy: Running) -> None:
    response = await treq.get(proxy.url + "/healthz")
    assert response.code == 200
    assert (await response.json())["status"] == "ok"


@pytest_twisted.ensureDeferred
async def test_a_plain_websocket_client_is_closed_at_the_services_end_of_file(
        proxy: Running, keys: Keys) -> None:
    # Without the treadmill.tunnel.v1 subprotocol there is no half-close: the service's
    # end of file (after its bytes) closes the WebSocket, and then the data leg.
    service = TransferService(lambda: Transfer(100_000, seed=8))
    job = Job(proxy, keys, {"data": ("127.0.0.1", service.listen(), True)})
    endpoints = await job.start()
    try:
        outcome = await ws_transfer(endpoints["data"]["url"], 0, seed=0, expect=10**9)
        assert outcome.received == expected_digest(100_000, 8)
        await service.outcomes[0]
        await eventually(lambda: not proxy.registry.splices and not job.manager.connections)
    finally:
        await job.manager.close()
        await service.stop()


@pytest_twisted.ensureDeferred
async def test_a_text_message_other_than_eof_closes_the_websocket_with_4003(
        proxy: Running, keys: Keys, echo: int) -> None:
    job = Job(proxy, keys, {"echo": ("127.0.0.1", echo, True)})
    try:
        url = (await job.start())["echo"]["url"]
        client = await console(url)
        await client.opened
        client.sendMessage(b"hello", isBinary=False)
        code, reason = await client.closed
        assert (code, reason) == (UNSUPPORTED_DATA, "binary messages only")
        await eventually(lambda: not proxy.registry.splices)
    finally:
        await job.manager.close()


@pytest_twisted.ensureDeferred
async def test_tls_on_the_control_and_data_connections(keys: Keys, tmp_path: Any) -> None:
    proxy, ca = await start_tls_proxy(keys, tmp_path)
    size = 8 * MiB
    # TLS has no half-close (an end of file closes the data connection), so each side
    # closes only once it has sent and received everything.
    service = TransferService(lambda: Transfer(size, seed=10, expect=size, half_close=False))
    job = new_job()
    url = proxy.url.replace("https://", "wss://")
    manager = ExposureManager(reactor, job, [{"url": url, "token": keys.token(job)}],
                              {"data": ("127.0.0.1", service.listen(), True)}, ca_file=str(ca),
                              reconnect_initial=0.05)
    try:
        manager.start()
        [endpoint] = await manager.published()
        assert endpoint["url"].startswith(url + "/v1/tunnels/")
        assert proxy.registry.data_tls
        client = await tcp_transfer(endpoint["port"], Transfer(size, seed=9, expect=size,
                                                              half_close=False))
        served = await service.outcomes[0]
        assert client.received_bytes == served.received_bytes == size
        assert client.received == served.sent and served.received == client.sent
    finally:
        await manager.close()
        await service.stop()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_supervisor_refuses_a_proxy_it_cannot_verify(keys: Keys, tmp_path: Any) -> None:
    proxy, _ = await start_tls_proxy(keys, tmp_path)
    job = new_job()
    url = proxy.url.replace("https://", "wss://")
    manager = ExposureManager(reactor, job, [{"url": url, "token": keys.token(job)}],
                              {"data": ("127.0.0.1", 1)}, reconnect_initial=0.05)
    try:
        manager.start()  # the platform's CAs do not know the test CA
        await sleep(0.5)
        assert not manager.endpoints and not proxy.registry.sessions
    finally:
        await manager.close()
        await proxy.stop()
