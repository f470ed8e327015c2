"""An extended job's proxy publishing, with a real proxy: the publish token of its
``start_job`` expires, and a control connection opened after that (a reconnect) would be
refused; ``renew_tokens`` (protocol minor 8) gives the supervisor a fresh one, which the
job's proxy link presents from its next connection on, so the job's services stay
reachable. The open control connection is not interrupted by the renewal."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor

from tests.proxy.support import Keys, Running, console_echo, keys_fixture, proxy_fixture  # noqa: F401 (fixtures)
from tests.supervisor.peer import JOB_A, job
from tests.util.waiting import eventually, sleep
from treadmill.protocol import supervisor as protocol

LEEWAY = 5.0  # the proxy's, on a token's expiry
LIFE = 1.5  # seconds the first publish token has left when the job starts


async def _published(service: Any) -> dict[str, Any]:
    async def endpoint() -> dict[str, Any] | None:
        manager = service.exposure.managers.get(JOB_A)
        return manager.endpoints[0] if manager is not None and manager.endpoints else None

    return await eventually(endpoint, timeout=10)  # type: ignore[no-any-return]


async def _reconnected_after_expiry(peered: Any, proxy: Running, keys: Keys,
                                    renew: bool) -> tuple[Any, bool]:
    """Start a job whose publish token dies soon, renew it (or not), let the first token
    expire, cut the control connection: the link and whether the job is reachable again."""
    peer, service = peered(minor=protocol.RENEW_MINOR)
    conn = await peer.connection()
    start = job(run_time="inf")
    first = keys.token(JOB_A, ttl=10.0, issued_at=reactor.seconds() - 10.0 + LIFE)
    start["proxies"] = [{"url": proxy.ws, "token": first}]
    assert (await conn.start(start))["ok"]
    endpoint = await _published(service)
    console = keys.token(JOB_A, actions=("read", "manage"), subject="alice")
    assert await console_echo(endpoint["url"], console, b"before") == b"before"
    if renew:
        fresh = keys.token(JOB_A, ttl=600.0)
        answer = await conn.command(protocol.renew_tokens(
            conn.next_rid(), JOB_A, 600.0, proxies=[{"url": proxy.ws, "token": fresh}]))
        assert answer["ok"]
    [link] = service.exposure.managers[JOB_A].links
    assert link.connections == 1  # the renewal keeps the open connection
    await sleep(LIFE + LEEWAY + 1.0)
    assert link.session is not None
    link.session.transport.loseConnection()  # the proxy link reconnects

    async def republished() -> bool:
        try:
            return await console_echo(endpoint["url"], console, b"after") == b"after"
        except Exception:
            return False

    reachable = False
    for _ in range(30):
        await sleep(0.2)
        if link.connections > 1 and link.session is not None and await republished():
            reachable = True
            break
    return link, reachable


@pytest_twisted.ensureDeferred
async def test_a_renewed_publish_token_serves_the_next_control_connection(
        peered: Any, proxy: Running, keys: Keys) -> None:
    link, reachable = await _reconnected_after_expiry(peered, proxy, keys, renew=True)
    assert reachable and link.connections == 2


@pytest_twisted.ensureDeferred
async def test_without_a_renewal_the_expired_token_is_refused(
        peered: Any, proxy: Running, keys: Keys) -> None:
    """The bug ``renew_tokens`` mends: the first token no longer opens a control
    connection, so the job's services are gone."""
    link, reachable = await _reconnected_after_expiry(peered, proxy, keys, renew=False)
    assert not reachable and link.connections == 1
