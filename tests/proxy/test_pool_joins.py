"""The dial-back pool (control minor 2) over loopback: a real proxy, a real ExposureManager
and raw data connections playing a buggy or malicious supervisor.

A client is joined to a waiting pooled connection, the pool refills, clients fall back
to ``connect`` when it is empty; a pooled connection joins only clients of the job its
token grants ``publish`` on, and is closed without a word otherwise; the bounds per job
and per proxy hold; a job's end, a lost control connection and a proxy stop close the
idle ones; and older peers on either side keep working without a pool.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from tests.proxy.support import (
    EchoClient,
    Keys,
    Running,
    Transfer,
    TransferService,
    echo_client,
    echo_once,
    expected_digest,
    new_job,
    opened_control,
    start_proxy,
    tcp_transfer,
)
from tests.proxy.support import echo as echo  # the fixture
from tests.util.waiting import eventually, sleep
from treadmill.protocol import proxy as messages
from treadmill.supervisor.exposure import ExposureManager

MiB = 1024 * 1024


def manager(proxy: Running, keys: Keys, services: dict[str, Any], job: str | None = None,
            **kwargs: Any) -> ExposureManager:
    job = job or new_job()
    return ExposureManager(reactor, job, [{"url": proxy.ws, "token": keys.token(job)}],
                           services, reconnect_initial=0.05, reconnect_max=0.5, **kwargs)


async def pooled(proxy: Running, job: str, token: str) -> EchoClient:
    """A raw pooled data connection (what a supervisor opens), header sent."""
    conn = await echo_client(proxy.data_port)
    conn.transport.write(messages.pool_header(job, token))
    return conn


async def started(exposure: ExposureManager, proxy: Running, pooled: int) -> dict[str, Any]:
    """Start ``exposure``; its one endpoint once published and ``pooled`` connections wait."""
    exposure.start()
    [endpoint] = await exposure.published()
    await eventually(lambda: proxy.registry.pool.waiting(exposure.job_id) == pooled)
    return endpoint


async def refused(conn: EchoClient) -> bool:
    """Closed by the proxy without a word."""
    await conn.lost.addTimeout(5, reactor)
    return conn.data == b""


@pytest_twisted.async_yield_fixture
async def small() -> AsyncIterator[tuple[Keys, Running]]:
    """A proxy offering 3 pooled connections per job, 4 in all."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as directory:
        keys = Keys(Path(directory))
        proxy = await start_proxy(keys, pool_per_job=3, pool_max=4)
        try:
            yield keys, proxy
        finally:
            await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_is_joined_to_a_waiting_connection_and_the_pool_refills(
        small: tuple[Keys, Running], echo: int) -> None:
    keys, proxy = small
    exposure = manager(proxy, keys, {"echo": ("127.0.0.1", echo, True)})
    job = exposure.job_id
    registry = proxy.registry
    try:
        endpoint = await started(exposure, proxy, 3)
        link = exposure.links[0]
        assert link.pool.size == 3 and len(link.pool.idle) == 3
        # Both ends of every waiting connection probe it (NAT state, dead peers).
        for end in [*link.pool.idle, *registry.pool.jobs[job]]:
            sock = end.transport.getHandle()
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
        began = reactor.seconds()
        assert await echo_once(endpoint["port"], b"pooled") == b"pooled"
        assert reactor.seconds() - began < 1
        assert registry.counts["pool_joined"] == 1 and registry.counts["pool_empty"] == 0
        assert exposure.counts["pool_joined"] == 1 and link.pool.counts["joined"] == 1
        await eventually(lambda: registry.pool.waiting(job) == 3)  # refilled
        # A bulk transfer (kernel relaying) through a pooled connection is intact.
        size = 4 * MiB
        await eventually(lambda: registry.pool.waiting(job) == 3)
        big = await echo_client(endpoint["port"])
        payload = bytes(range(256)) * (size // 256)
        big.transport.write(payload)
        assert await big.wait_for(size, timeout=20) == payload
        big.transport.loseConnection()
        assert registry.counts["pool_joined"] == 2
    finally:
        await exposure.close()


@pytest_twisted.ensureDeferred
async def test_clients_fall_back_to_connect_while_the_pool_is_in_use(
        small: tuple[Keys, Running]) -> None:
    keys, proxy = small
    size = 256 * 1024
    service = TransferService(lambda: Transfer(size, seed=5))
    exposure = manager(proxy, keys, {"data": ("127.0.0.1", service.listen(), True)}, pool=1)
    registry = proxy.registry
    try:
        endpoint = await started(exposure, proxy, 1)  # min(3, 1)
        outcomes = await gatherResults([
            Deferred.fromCoroutine(tcp_transfer(endpoint["port"], Transfer(size, seed=i)))
            for i in range(6)])
        assert all(o.received == expected_digest(size, 5) for o in outcomes)
        assert registry.counts["pool_joined"] >= 1 and registry.counts["pool_empty"] >= 1
        assert registry.counts["pool_joined"] + registry.counts["pool_empty"] == 6
        assert registry.counts["spliced"] == 6 and not registry.pending
    finally:
        await exposure.close()
        await service.stop()


@pytest_twisted.ensureDeferred
async def test_a_pooled_connection_without_the_jobs_publish_token_is_closed_without_a_word(
        small: tuple[Keys, Running], echo: int) -> None:
    """The attacker's view: another job's publish token, a console token of the job, a
    forged one, a valid one that is not the control connection's, a malformed header, a
    job without a control connection, bytes after the header: each closed at once,
    nothing written; the job's clients still reach the job's service only."""
    keys, proxy = small
    exposure = manager(proxy, keys, {"echo": ("127.0.0.1", echo, True)}, pool=1)
    job = exposure.job_id
    registry = proxy.registry
    try:
        endpoint = await started(exposure, proxy, 1)
        other = new_job()
        attempts = [
            await pooled(proxy, job, keys.token(other)),  # publish, but on another job
            await pooled(proxy, job, keys.token(job, actions=("read", "manage"))),
            await pooled(proxy, job, keys.token(job, audience="someone-else")),
            await pooled(proxy, job, keys.token(job)[:-4] + "AAAA"),  # a bad signature
            # A valid publish token for the job, but not the one its control connection
            # presented: no signature is verified for a pooled connection.
            await pooled(proxy, job, keys.token(job, subject="host-2")),
            await pooled(proxy, other, keys.token(other)),  # no control connection
        ]
        garbled = await echo_client(proxy.data_port)
        garbled.transport.write(b"TREADMILL-POOL/1 " + job.encode() + b"\n")
        attempts.append(garbled)
        eager = await echo_client(proxy.data_port)
        eager.transport.write(messages.pool_header(job, exposure.links[0].session_token)
                              + b"early bytes")
        attempts.append(eager)
        for conn in attempts:
            assert await refused(conn)
        assert registry.pool.waiting(job) == 1  # only the supervisor's own
        assert registry.counts["data_refused"] == 5 and registry.counts["pool_unknown"] == 1
        assert registry.counts["data_malformed"] == 2
        for _ in range(3):
            assert await echo_once(endpoint["port"], b"mine") == b"mine"
    finally:
        await exposure.close()


@pytest_twisted.ensureDeferred
async def test_the_bounds_per_job_and_per_proxy_hold(small: tuple[Keys, Running]) -> None:
    """A supervisor that opens more than ``welcome.pool`` (buggy or malicious) gets the
    extra ones closed; all jobs together hold at most ``pool.max``."""
    keys, proxy = small
    registry = proxy.registry
    one, two = new_job(), new_job()
    tokens = {job: keys.token(job) for job in (one, two)}
    controls = [await opened_control(proxy, tokens[job], job, minor=messages.MINOR)
                for job in (one, two)]
    first = [await pooled(proxy, one, tokens[one]) for _ in range(5)]
    await eventually(lambda: sum(c.lost.called for c in first) == 2)
    assert registry.pool.waiting(one) == 3  # pool.per_job
    second = [await pooled(proxy, two, tokens[two]) for _ in range(3)]
    await eventually(lambda: sum(c.lost.called for c in second) == 2)
    assert registry.pool.waiting(two) == 1 and registry.pool.size == 4  # pool.max
    assert registry.counts["pool_full"] == 4
    assert all(c.data == b"" for c in first + second)
    for control in controls:
        control.sendClose(1000)


@pytest_twisted.ensureDeferred
async def test_a_pooled_connection_carries_the_join_line_then_the_clients_bytes_and_must_stay_silent_while_idle(  # noqa: E501
        small: tuple[Keys, Running]) -> None:
    """The wire as a supervisor sees it: ``TREADMILL-JOIN/1 <service>`` and then the
    client's bytes. A pooled connection that speaks while idle is closed and its job's
    next client waits for ``connect`` instead."""
    keys, proxy = small
    job = new_job()
    token = keys.token(job)
    registry = proxy.registry
    control = await opened_control(proxy, token, job, minor=messages.MINOR)
    control.send(messages.publish(1, "svc", authenticates=True))
    port = (await control.next())["tcp_port"]
    chatty = await pooled(proxy, job, token)
    await eventually(lambda: registry.pool.waiting(job) == 1)
    chatty.transport.write(b"x")
    assert await refused(chatty)
    assert registry.pool.waiting(job) == 0
    good = await pooled(proxy, job, token)
    await eventually(lambda: registry.pool.waiting(job) == 1)
    client = await echo_client(port)
    client.transport.write(b"hello")
    line = messages.join_line("svc")
    assert await good.wait_for(len(line) + 5) == line + b"hello"
    good.transport.write(b"world")
    assert await client.wait_for(5) == b"world"
    late = await echo_client(port)  # the pool is empty now: connect
    message = await control.next()
    assert message["type"] == "connect" and message["service"] == "svc"
    for conn in (client, good, late):
        conn.transport.loseConnection()
    control.sendClose(1000)


@pytest.mark.parametrize("how", ["job_ended", "control_lost", "proxy_stopped"])
@pytest_twisted.ensureDeferred
async def test_idle_pooled_connections_close_with_the_job_its_control_or_the_proxy(
        keys: Keys, echo: int, how: str) -> None:
    proxy = await start_proxy(keys, pool_per_job=2, grace=5.0)
    registry = proxy.registry
    exposure = manager(proxy, keys, {"echo": ("127.0.0.1", echo, True)})
    job = exposure.job_id
    raw = await opened_control(proxy, keys.token(new_job()), minor=messages.MINOR)
    try:
        exposure.start()
        await exposure.published()
        await eventually(lambda: registry.pool.waiting(job) == 2)
        link = exposure.links[0]
        idle = list(link.pool.idle)
        if how == "job_ended":
            await exposure.close()
        elif how == "control_lost":
            registry.sessions[job].control.transport.abortConnection()  # a network cut
        else:
            await proxy.stop()
        await eventually(lambda: all(end.lost for end in idle))
        assert registry.pool.waiting(job) == 0
        if how == "control_lost":
            # The tunnels wait out the grace period; the new control connection's
            # supervisor opens a new pool.
            assert job in registry.sessions
            await eventually(lambda: registry.pool.waiting(job) == 2)
            assert link.pool.counts["closed_idle"] == 0  # not taken for a refusal
        elif how == "job_ended":
            assert job not in registry.sessions and registry.pool.size == 0
        else:
            assert registry.pool.size == 0 and link.pool.size == 0
    finally:
        raw.sendClose(1000)
        await exposure.close()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_fresh_token_is_used_for_pooled_connections_from_the_next_control_connection(
        small: tuple[Keys, Running], echo: int) -> None:
    keys, proxy = small
    registry = proxy.registry
    exposure = manager(proxy, keys, {"echo": ("127.0.0.1", echo, True)}, pool=1)
    job = exposure.job_id
    try:
        await started(exposure, proxy, 1)
        link = exposure.links[0]
        exposure.set_token(proxy.ws, keys.token(job, subject="host-1", ttl=900.0))
        assert await echo_once((exposure.endpoints[0])["port"]) == b"hello"
        await eventually(lambda: registry.pool.waiting(job) == 1)  # the old token still
        assert registry.counts["data_refused"] == 0
        registry.sessions[job].control.transport.abortConnection()
        await eventually(lambda: link.connections == 2 and registry.pool.waiting(job) == 1)
        assert link.session_token == link.token != keys.token(job)
        assert await echo_once((exposure.endpoints[0])["port"]) == b"hello"
        assert registry.counts["data_refused"] == 0
    finally:
        await exposure.close()


@pytest_twisted.ensureDeferred
async def test_an_older_supervisor_is_offered_no_pool(small: tuple[Keys, Running]) -> None:
    """Minor 0 or 1: no ``welcome.pool`` (it would be a violation there), pooled
    connections of its job refused, every client through ``connect``."""
    keys, proxy = small
    for minor in (None, 1):
        job = new_job()
        control = await raw_welcome(proxy, keys, job, minor)
        assert "pool" not in control.welcome
        assert await refused(await pooled(proxy, job, control.token))
        control.send(messages.publish(1, "svc", authenticates=True))
        port = (await control.next())["tcp_port"]
        client = await echo_client(port)
        assert (await control.next())["type"] == "connect"
        client.transport.loseConnection()
        control.sendClose(1000)
    assert proxy.registry.counts["pool_unknown"] == 2
    new = await raw_welcome(proxy, keys, new_job(), messages.MINOR)
    assert new.welcome["pool"] == 3
    new.sendClose(1000)


async def raw_welcome(proxy: Running, keys: Keys, job: str, minor: int | None) -> Any:
    from tests.proxy.support import raw_control

    token = keys.token(job)
    control = await raw_control(proxy, token, job, minor=minor)
    control.token = token
    await control.opened
    control.welcome = await control.next()
    assert control.welcome["type"] == "welcome"
    return control


@pytest_twisted.ensureDeferred
async def test_an_older_proxy_gets_no_pooled_connections(
        small: tuple[Keys, Running], echo: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy of minor 1 ignores the supervisor's minor 2 and sends no ``pool``: the
    supervisor opens no pooled connection and its clients go through ``connect``."""
    keys, proxy = small
    exposure = manager(proxy, keys, {"echo": ("127.0.0.1", echo, True)})  # announces 2
    monkeypatch.setattr(messages, "MINOR", 1)  # the proxy's negotiation: minor 1 code
    try:
        exposure.start()
        [endpoint] = await exposure.published()
        assert "pool" not in exposure.links[0].welcome
        await sleep(0.2)
        assert exposure.links[0].pool.size == 0 and proxy.registry.pool.size == 0
        assert await echo_once(endpoint["port"], b"old") == b"old"
        assert proxy.registry.counts["spliced"] == 1
        assert proxy.registry.counts["pool_joined"] == 0
        assert proxy.registry.counts["pool_unknown"] == 0  # it never tried
    finally:
        await exposure.close()
