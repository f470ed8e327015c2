"""ExposureManager: a job's services published on real proxies (in this process)."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.proxy.support import Keys, echo_client, echo_once, new_job, start_proxy
from tests.util.waiting import eventually, sleep
from treadmill.protocol.proxy import parse_proxy_url
from treadmill.supervisor.echo import listen_echo
from treadmill.supervisor.exposure import ExposureManager


@pytest.fixture
def keys(tmp_path: Any) -> Keys:
    return Keys(tmp_path)


@pytest_twisted.async_yield_fixture
async def echo() -> Any:
    port = listen_echo(reactor)
    yield port.getHost().port
    await port.stopListening()


def manager(job: str, proxies: list[Any], keys: Keys, services: dict[str, Any],
            **kwargs: Any) -> ExposureManager:
    return ExposureManager(reactor, job, [{"url": p.ws, "token": keys.token(job)}
                                          for p in proxies], services,
                           reconnect_initial=0.05, reconnect_max=0.3, **kwargs)


def test_proxy_urls() -> None:
    assert parse_proxy_url("wss://proxy.example") == (True, "proxy.example", 443,
                                                      "wss://proxy.example:443")
    assert parse_proxy_url("http://10.0.0.1:8090/") == (False, "10.0.0.1", 8090,
                                                        "ws://10.0.0.1:8090")
    assert parse_proxy_url("ws://[::1]:8090")[3] == "ws://[::1]:8090"
    with pytest.raises(ValueError):
        parse_proxy_url("ftp://x")
    with pytest.raises(Exception):  # noqa: B017 - an invalid service name
        ExposureManager(reactor, "j", [], {"no spaces": ("127.0.0.1", 22)})


@pytest_twisted.ensureDeferred
async def test_services_are_published_on_every_proxy(keys: Keys, echo: int) -> None:
    one, two = await start_proxy(keys), await start_proxy(keys, public_url="wss://p2.example")
    job = new_job()
    exposure = manager(job, [one, two], keys, {"echo": ("127.0.0.1", echo, True),
                                               "ssh": ("127.0.0.1", echo, True)})
    seen: list[list[dict[str, Any]]] = []
    exposure.on_change(seen.append)
    try:
        exposure.start()
        endpoints = await exposure.published()
        assert [(e["service"], e["proxy"]) for e in endpoints] == [
            ("echo", one.ws), ("ssh", one.ws), ("echo", two.ws), ("ssh", two.ws)]
        for e in endpoints:
            assert e["host"] == "127.0.0.1" and isinstance(e["port"], int)
        assert endpoints[0]["url"].startswith(one.ws + "/v1/tunnels/")
        assert endpoints[2]["url"].startswith("wss://p2.example/v1/tunnels/")  # public_url
        assert seen[-1] == endpoints and len(seen) == 4
        for e in endpoints:
            assert await echo_once(e["port"], e["service"].encode()) == e["service"].encode()
    finally:
        await exposure.close()
        await one.stop()
        await two.stop()


@pytest_twisted.ensureDeferred
async def test_a_restarted_supervisor_finds_its_tunnels_within_the_grace_period(
        keys: Keys, echo: int) -> None:
    proxy = await start_proxy(keys, grace=0.6)
    job = new_job()
    first = manager(job, [proxy], keys, {"ssh": ("127.0.0.1", echo, True)})
    first.start()
    [endpoint] = await first.published()
    live = await echo_client(endpoint["port"])
    live.transport.write(b"on ")
    await live.wait_for(3)
    await first.close(final=False)  # the supervisor goes away; the job does not
    # The tunnel is still there, and so is the live connection (it does not need control).
    assert job in proxy.registry.sessions
    live.transport.write(b"still")
    assert await live.wait_for(8) == b"on still"
    second = manager(job, [proxy], keys, {"ssh": ("127.0.0.1", echo, True)})
    try:
        second.start()
        [again] = await second.published()
        assert again == endpoint  # same port, same path
        assert await echo_once(again["port"]) == b"hello"
        await sleep(0.8)  # longer than the grace period: the session was taken over
        assert await echo_once(again["port"]) == b"hello"
    finally:
        live.transport.loseConnection()
        await second.close()  # the job ended: at once
    assert job not in proxy.registry.sessions
    with pytest.raises(Exception):  # noqa: B017 - connection refused
        await echo_client(endpoint["port"])
    await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_tunnels_close_when_the_grace_period_ends(keys: Keys, echo: int) -> None:
    proxy = await start_proxy(keys, grace=0.3)
    job = new_job()
    exposure = manager(job, [proxy], keys, {"ssh": ("127.0.0.1", echo, True)})
    exposure.start()
    [endpoint] = await exposure.published()
    live = await echo_client(endpoint["port"])
    live.transport.write(b"on")
    await live.wait_for(2)
    await exposure.close(final=False)
    await live.lost  # closed with the tunnel, after the grace period
    assert job not in proxy.registry.sessions
    assert proxy.registry.counts["grace_expired"] == 1
    with pytest.raises(Exception):  # noqa: B017 - connection refused
        await echo_client(endpoint["port"])
    await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_lost_control_connection_is_reestablished(keys: Keys, echo: int) -> None:
    proxy = await start_proxy(keys, grace=5.0)
    job = new_job()
    exposure = manager(job, [proxy], keys, {"ssh": ("127.0.0.1", echo, True)})
    try:
        exposure.start()
        [endpoint] = await exposure.published()
        link = exposure.links[0]
        assert link.connections == 1
        proxy.registry.sessions[job].control.transport.abortConnection()  # a network cut
        await eventually(lambda: link.connections == 2 and link.session is not None)
        await eventually(lambda: proxy.registry.sessions[job].control is not None)
        assert exposure.endpoints == [endpoint]
        assert await echo_once(endpoint["port"]) == b"hello"
    finally:
        await exposure.close()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_the_manager_publishes_again_on_a_restarted_proxy(keys: Keys,
                                                                echo: int) -> None:
    proxy = await start_proxy(keys)
    http = proxy.service.ports()[0].getHost().port
    job = new_job()
    exposure = manager(job, [proxy], keys, {"ssh": ("127.0.0.1", echo, True)})
    seen: list[Any] = []
    exposure.on_change(seen.append)
    exposure.start()
    await exposure.published()
    await proxy.stop()  # closes control connections with 4005, and every tunnel
    proxy.service.config.listen = [f"tcp:{http}:interface=127.0.0.1"]
    proxy.service.startService()
    await proxy.service.ready()
    try:
        link = exposure.links[0]
        # Connected again, and the answer to the new publish has arrived.
        await eventually(lambda: link.connections == 2 and link.welcome is not None and
                         not link._requests, timeout=5)
        [endpoint] = exposure.endpoints
        assert endpoint["port"] == proxy.registry.sessions[job].tunnels["ssh"].tcp_port
        assert await echo_once(endpoint["port"]) == b"hello"
    finally:
        await exposure.close()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_closing_for_good_ends_live_connections(keys: Keys, echo: int) -> None:
    proxy = await start_proxy(keys)
    job = new_job()
    exposure = manager(job, [proxy], keys, {"ssh": ("127.0.0.1", echo, True)})
    exposure.start()
    [endpoint] = await exposure.published()
    live = await echo_client(endpoint["port"])
    live.transport.write(b"x")
    await live.wait_for(1)
    assert exposure.connections == 1
    await exposure.close()
    await live.lost
    await eventually(lambda: exposure.connections == 0)
    await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_refusals_are_reported_and_retried(keys: Keys, echo: int) -> None:
    proxy = await start_proxy(keys, ports=None, max_tunnels_per_job=1)
    job = new_job()
    exposure = manager(job, [proxy], keys, {"a": ("127.0.0.1", echo, True),
                                            "b": ("127.0.0.1", echo, True)})
    wrong = ExposureManager(reactor, job, [{"url": proxy.ws, "token": keys.token(new_job())}],
                            {"a": ("127.0.0.1", echo, True)}, reconnect_initial=0.05,
                            reconnect_max=0.2)
    try:
        exposure.start()
        wrong.start()
        await eventually(lambda: exposure.errors and exposure.endpoints)
        [error] = exposure.errors
        assert error["service"] == "b" and error["code"] == "too_many_tunnels"
        assert [e["service"] for e in exposure.endpoints] == ["a"]
        await eventually(lambda: wrong.links[0].failures >= 2)  # 403, again and again
        assert not wrong.endpoints and wrong.links[0].connections == 0
    finally:
        await exposure.close()
        await wrong.close()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_the_echo_service_answers_and_honours_end_of_file(echo: int) -> None:
    client = await echo_client(echo)
    client.transport.write(b"ping")
    assert await client.wait_for(4) == b"ping"
    client.transport.loseWriteConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_services_left_over_from_an_earlier_run_are_unpublished(keys: Keys,
                                                                     echo: int) -> None:
    proxy = await start_proxy(keys, grace=5.0)
    job = new_job()
    first = manager(job, [proxy], keys, {"a": ("127.0.0.1", echo, True),
                                         "b": ("127.0.0.1", echo, True)})
    first.start()
    await first.published()
    await first.close(final=False)
    second = manager(job, [proxy], keys, {"a": ("127.0.0.1", echo, True)})
    try:
        second.start()
        await second.published()
        await eventually(lambda: set(proxy.registry.sessions[job].tunnels) == {"a"})
    finally:
        await second.close()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_services_can_come_and_go_while_connected(keys: Keys, echo: int) -> None:
    proxy = await start_proxy(keys)
    job = new_job()
    exposure = manager(job, [proxy], keys, {"echo": ("127.0.0.1", echo, True)})
    seen: list[list[dict[str, Any]]] = []
    exposure.on_change(seen.append)
    try:
        exposure.start()
        first = (await exposure.published())[0]
        exposure.set_services({"echo": ("127.0.0.1", echo, True),
                               "ssh": ("127.0.0.1", echo, True)})
        await eventually(lambda: len(exposure.endpoints) == 2)
        ssh = next(e for e in exposure.endpoints if e["service"] == "ssh")
        assert await echo_once(ssh["port"], b"new") == b"new"
        exposure.set_services({"ssh": ("127.0.0.1", echo, True)})
        assert [e["service"] for e in exposure.endpoints] == ["ssh"]
        assert [e["service"] for e in seen[-1]] == ["ssh"]

        async def refused() -> bool:
            try:
                await echo_once(first["port"], b"x", timeout=1.0)
            except Exception:
                return True
            return False

        for _ in range(50):
            if await refused():
                break
            await sleep(0.05)
        else:
            raise AssertionError("the unpublished service still answers")
        with pytest.raises(Exception):  # noqa: B017 - an invalid service name
            exposure.set_services({"bad name": ("127.0.0.1", echo, True)})
    finally:
        await exposure.close()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_service_declares_whether_it_authenticates_its_users(keys: Keys,
                                                                      echo: int) -> None:
    proxy = await start_proxy(keys)
    job = new_job()
    exposure = manager(job, [proxy], keys, {"ssh": ("127.0.0.1", echo, True),
                                            "console": ("127.0.0.1", echo)})
    try:
        exposure.start()
        found = {e["service"]: e for e in await exposure.published()}
        assert found["ssh"]["auth"] == "service" and "port" in found["ssh"]
        assert found["console"]["auth"] == "token" and "port" not in found["console"]
        # The driver says ssh no longer authenticates: it is published again, without port.
        exposure.set_services({"ssh": ("127.0.0.1", echo), "console": ("127.0.0.1", echo)})
        await eventually(lambda: all(e["auth"] == "token" for e in exposure.endpoints))
        assert all("port" not in e for e in exposure.endpoints)
        assert proxy.registry.ports.in_use == set()
    finally:
        await exposure.close()
        await proxy.stop()
