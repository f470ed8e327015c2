"""A job's services published on its proxies by a whole supervisor, reported as job_endpoints."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.task import Clock

from tests.proxy.support import Keys, Running, console_echo, keys_fixture, proxy_fixture  # noqa: F401 (fixtures)
from tests.supervisor.peer import JOB_A, job
from tests.util.waiting import sleep
from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.jobexposure import JobExposure

INF = "inf"




def proxied_job(proxy: Running, keys: Keys, **mock: Any) -> dict[str, Any]:
    start = job(**mock)
    start["proxies"] = [{"url": proxy.ws, "token": keys.token(JOB_A)}]
    return start


def manage(keys: Keys) -> str:
    """A user's console token for JOB_A (what POST .../console-token gives)."""
    return keys.token(JOB_A, actions=("read", "manage"), subject="alice")


async def refused(url: str, keys: Keys) -> bool:
    try:
        await console_echo(url, manage(keys), b"x")
    except Exception:
        return True
    return False


@pytest_twisted.ensureDeferred
async def test_the_mock_echo_is_published_and_reported(peered: Any, proxy: Running,
                                                       keys: Keys) -> None:
    peer, service = peered(minor=protocol.ENDPOINT_AUTH_MINOR)
    conn = await peer.connection()
    assert (await conn.start(proxied_job(proxy, keys, run_time=INF)))["ok"]
    message = await conn.wait_for(lambda m: m["type"] == "job_endpoints", timeout=10)
    assert message["job_id"] == JOB_A
    [endpoint] = message["endpoints"]
    assert endpoint["service"] == "echo" and endpoint["proxy"] == proxy.ws
    assert endpoint["url"].startswith(proxy.ws + "/v1/tunnels/")
    # The echo does not authenticate its users: no public port, a console token instead.
    assert endpoint["auth"] == "token" and "port" not in endpoint
    assert await console_echo(endpoint["url"], manage(keys)) == b"hello"
    conn.send(protocol.ack(message["request_id"]))
    assert (await conn.stop(JOB_A))["ok"]
    await conn.events_until("terminated")
    for _ in range(100):  # the job's end closes its tunnel at once
        if await refused(endpoint["url"], keys):
            break
        await sleep(0.05)
    else:
        raise AssertionError("the tunnel outlived its job")
    assert service.exposure.managers == {}
    assert not [m for m in conn.inbox.pending if m["type"] == "job_endpoints"]


@pytest_twisted.ensureDeferred
async def test_unacknowledged_endpoints_are_sent_again_after_a_reconnect(
        peered: Any, proxy: Running, keys: Keys) -> None:
    peer, service = peered()
    conn = await peer.connection()
    await conn.start(proxied_job(proxy, keys, run_time=INF))
    first = await conn.wait_for(lambda m: m["type"] == "job_endpoints", timeout=10)
    conn.drop()  # before acknowledging them
    again = await peer.connection()
    second = await again.wait_for(lambda m: m["type"] == "job_endpoints", timeout=10)
    assert second["endpoints"] == first["endpoints"]
    again.send(protocol.ack(second["request_id"]))
    await sleep(0.2)
    assert service.runner._endpoints is None
    await again.stop(JOB_A)
    await again.events_until("terminated")


@pytest_twisted.ensureDeferred
async def test_an_older_switchboard_gets_no_endpoints_but_tunnels_work(
        peered: Any, proxy: Running, keys: Keys) -> None:
    peer, service = peered(minor=1)
    conn = await peer.connection()
    await conn.start(proxied_job(proxy, keys, run_time=INF))
    await conn.events_until("ready")
    for _ in range(100):
        if service.exposure.managers and service.exposure.managers[JOB_A].endpoints:
            break
        await sleep(0.05)
    [endpoint] = service.exposure.managers[JOB_A].endpoints
    assert await console_echo(endpoint["url"], manage(keys), b"hi") == b"hi"
    await conn.stop(JOB_A)
    await conn.events_until("terminated")
    assert not [m for m in conn.received if m["type"] == "job_endpoints"]


@pytest_twisted.ensureDeferred
async def test_a_job_without_proxies_publishes_nothing(peered: Any) -> None:
    peer, service = peered()
    conn = await peer.connection()
    await conn.start(job(run_time=0.3))
    await conn.events_until("terminated")
    assert service.exposure.managers == {}
    assert not [m for m in conn.received if m["type"] == "job_endpoints"]


@pytest_twisted.ensureDeferred
async def test_endpoints_to_an_older_switchboard_carry_no_auth(peered: Any, proxy: Running,
                                                               keys: Keys) -> None:
    """A switchboard below minor 5 refuses unknown fields: ``auth`` is left out."""
    peer, _ = peered(minor=protocol.ENDPOINT_AUTH_MINOR - 1)
    conn = await peer.connection()
    assert (await conn.start(proxied_job(proxy, keys, run_time=INF)))["ok"]
    message = await conn.wait_for(lambda m: m["type"] == "job_endpoints", timeout=10)
    [endpoint] = message["endpoints"]
    assert endpoint["service"] == "echo" and "auth" not in endpoint
    conn.send(protocol.ack(message["request_id"]))
    assert (await conn.stop(JOB_A))["ok"]
    await conn.events_until("terminated")


@pytest_twisted.ensureDeferred
async def test_a_held_job_stays_reachable_until_its_hold_ends(peered: Any, proxy: Running,
                                                             keys: Keys) -> None:
    """hold_on_failure (docs/jobs.md): the failed job's tunnels outlive its end until the
    stop_job that releases the host, then close."""
    peer, service = peered(minor=protocol.HOLD_MINOR)
    conn = await peer.connection()
    start = proxied_job(proxy, keys, run_time=0.5, exit_status=3)
    start["hold_on_failure"] = 60
    assert (await conn.start(start))["ok"]
    message = await conn.wait_for(lambda m: m["type"] == "job_endpoints", timeout=10)
    conn.send(protocol.ack(message["request_id"]))
    [endpoint] = message["endpoints"]
    final = (await conn.events_until("terminated"))[-1]
    assert final["held"] is True and final["exit_status"] == 3
    await sleep(0.3)
    assert await console_echo(endpoint["url"], manage(keys)) == b"hello"  # still there
    assert service.runner.held == JOB_A and JOB_A in service.exposure.managers
    assert (await conn.stop(JOB_A, "user_terminated"))["ok"]  # acked once torn down
    assert service.runner.held is None and service.exposure.managers == {}
    for _ in range(100):
        if await refused(endpoint["url"], keys):
            break
        await sleep(0.05)
    else:
        raise AssertionError("the tunnel outlived the hold")


def test_console_output_is_not_a_console_notice() -> None:
    """The observer's ``console`` (a job's console bytes) and the proxies' console
    notices (``console_report``) are two things: bytes never reach the audit path."""
    notices: list[Any] = []
    exposure = JobExposure(Clock(), lambda job_id, endpoints: None,
                           console=lambda job_id, notice: notices.append(notice))
    exposure.console(JOB_A, b"login: ")
    assert notices == []
