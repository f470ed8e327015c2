"""The WebSocket link: handshake, heartbeats, reconnection, close codes, violations."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.supervisor.peer import FakeSwitchboard, PeerConnection, job
from tests.util.certs import make_pki
from tests.util.waiting import eventually, sleep, within
from treadmill.protocol import supervisor as protocol
from treadmill.protocol.supervisor import CloseCode
from treadmill.supervisor.link import SupervisorLink, parse_url
from treadmill.supervisor.service import SupervisorService

Make = Callable[..., SupervisorService]


async def connected(peer: FakeSwitchboard, service: SupervisorService) -> PeerConnection:
    """The next connection, once open on both sides."""
    conn = await peer.connection()
    await within(service.connected())
    return conn


@pytest_twisted.ensureDeferred
async def test_handshake_headers_and_minor(peer: FakeSwitchboard, supervisors: Make) -> None:
    peer.minor = protocol.MINOR + 1  # a newer switchboard: the lower minor wins
    service = supervisors()
    conn = await connected(peer, service)
    session = await within(service.connected())
    assert conn.request_headers["authorization"] == "Bearer host-token"
    assert conn.request_headers[protocol.MINOR_HEADER] == str(protocol.MINOR)
    assert protocol.SUBPROTOCOL in conn.request_headers["sec-websocket-protocol"]
    assert session.minor == protocol.MINOR
    assert service.link.url == f"{peer.url}{protocol.PATH}"


@pytest_twisted.ensureDeferred
async def test_reconnects_after_the_switchboard_goes_away(peer: FakeSwitchboard,
                                                          supervisors: Make) -> None:
    service = supervisors()
    conn = await connected(peer, service)
    conn.sendClose(int(CloseCode.GOING_AWAY), "restarting")
    conn2 = await connected(peer, service)
    assert service.link.last_close.code == CloseCode.GOING_AWAY
    assert service.link.failures == 0 and service.link.connections == 2
    assert (await conn2.status())["job"] is None


@pytest_twisted.ensureDeferred
async def test_reconnects_after_the_connection_drops(peer: FakeSwitchboard,
                                                     supervisors: Make) -> None:
    service = supervisors()
    (await connected(peer, service)).drop()
    await connected(peer, service)
    assert service.link.last_close.code == 1006 and service.link.failures == 0


@pytest_twisted.ensureDeferred
async def test_reconnects_with_backoff_while_the_switchboard_is_down(
        peer: FakeSwitchboard, supervisors: Make) -> None:
    service = supervisors(reconnect_initial=0.05, reconnect_max=0.2)
    conn = await connected(peer, service)
    await peer.stop_listening()
    conn.drop()
    await sleep(1.0)  # refused connections, retried at most every 0.2 s + jitter
    assert service.link.session is None
    peer.listen()
    await connected(peer, service)
    assert peer.handshakes == 2


@pytest_twisted.ensureDeferred
async def test_a_dead_peer_is_detected_by_heartbeats(peer: FakeSwitchboard,
                                                     supervisors: Make) -> None:
    service = supervisors(heartbeat_interval=0.2, heartbeat_timeout=0.4)
    conn = await connected(peer, service)
    conn.die()  # no pong, no close: only the heartbeat notices
    started = reactor.seconds()
    await connected(peer, service)
    assert reactor.seconds() - started < 2.0
    assert service.link.last_close.code == 1006


@pytest.mark.parametrize("code", [CloseCode.SUPERSEDED, CloseCode.HOST_REMOVED,
                                  CloseCode.INTERNAL_ERROR])
@pytest_twisted.ensureDeferred
async def test_switchboard_close_codes_slow_down_reconnection(
        peer: FakeSwitchboard, supervisors: Make, code: CloseCode) -> None:
    service = supervisors(reconnect_initial=0.1, reconnect_max=2.0)
    conn = await connected(peer, service)
    conn.sendClose(int(code), "go away")
    closed_at = reactor.seconds()
    await connected(peer, service)
    assert service.link.last_close.code == code and service.link.failures == 1
    assert reactor.seconds() - closed_at >= 0.2  # backoff(1) = 2 x initial


@pytest_twisted.ensureDeferred
async def test_a_newer_connection_supersedes(peer: FakeSwitchboard, supervisors: Make) -> None:
    first = supervisors("one", reconnect_initial=0.5, reconnect_max=5.0)
    await connected(peer, first)
    second = supervisors("two")
    await connected(peer, second)
    await eventually(lambda: first.link.last_close is not None)
    assert first.link.last_close.code == CloseCode.SUPERSEDED
    assert first.link.session is None and second.link.session is not None
    await second.stopService()


@pytest.mark.parametrize("payload, binary, text", [
    (b"not json", False, "malformed JSON"),
    (b"[1, 2]", False, "JSON object"),
    (b'{"type": "status", "request_id": 1, "job": null}', False, "unexpected message type"),
    (b'{"type": "nonsense"}', False, "unexpected message type"),
    (b'{"type": "status_request", "request_id": "1"}', False, "request_id"),
    (b'{"type": "status_request", "request_id": 1, "extra": 1}', False, "additionalProperties"),
    (b'{"type": "stop_job", "request_id": 1, "job_id": "x", "reason": "user_terminated"}',
     False, "job_id"),
    (b'{"type": "status_request", "request_id": 1}', True, "binary"),
])
@pytest_twisted.ensureDeferred
async def test_protocol_violations_close_with_4000(peer: FakeSwitchboard, supervisors: Make,
                                                   payload: bytes, binary: bool,
                                                   text: str) -> None:
    service = supervisors()
    conn = await connected(peer, service)
    conn.send_raw(payload, binary)
    error = await conn.next("protocol_error")
    assert error["code"] == "violation" and text in error["message"]
    _, code, _ = await within(conn.closed)
    assert code == CloseCode.PROTOCOL_VIOLATION
    await connected(peer, service)  # and it comes back
    assert service.link.last_close.code == CloseCode.PROTOCOL_VIOLATION


@pytest_twisted.ensureDeferred
async def test_an_invalid_start_changes_nothing(peer: FakeSwitchboard, supervisors: Make,
                                                tmp_path: Path) -> None:
    service = supervisors()
    conn = await connected(peer, service)
    bad = protocol.start_job(1, job())
    bad["job"]["unexpected"] = True
    conn.send(bad)
    await conn.next("protocol_error")
    conn2 = await connected(peer, service)
    assert (await conn2.status())["job"] is None
    assert service.runner.current_job is None
    assert not (tmp_path / "state" / "current-job.json").exists()


@pytest_twisted.ensureDeferred
async def test_an_oversized_frame_closes_the_connection(peer: FakeSwitchboard,
                                                        supervisors: Make) -> None:
    service = supervisors()
    conn = await connected(peer, service)
    conn.send_raw(b" " * (protocol.MAX_MESSAGE_BYTES + 1))
    await within(conn.closed)  # Autobahn fails the connection before any parsing
    await connected(peer, service)
    assert "exceeds payload limit" in service.link.last_close.reason


@pytest_twisted.ensureDeferred
async def test_a_refused_token_is_retried_with_backoff(peer: FakeSwitchboard,
                                                       supervisors: Make) -> None:
    service = supervisors(token="wrong-token", reconnect_initial=0.05, reconnect_max=0.4)
    await sleep(1.2)
    # 0.05, 0.1, 0.2, 0.4, 0.4 ... plus jitter: a handful of attempts, not dozens.
    assert 2 <= peer.handshakes <= 8
    assert service.link.connections == 0 and service.link.session is None
    assert service.link.last_close.http_status == 401
    assert service.link.failures >= 2
    assert peer.open_connections() == []


@pytest_twisted.ensureDeferred
async def test_another_major_version_waits_the_longest(peer: FakeSwitchboard,
                                                       supervisors: Make) -> None:
    peer.deny = 400
    service = supervisors(reconnect_initial=0.05, reconnect_max=0.5)
    await eventually(lambda: service.link.last_close is not None)
    assert service.link.last_close.http_status == 400
    assert service.link._retry_delay(1) >= 0.5


@pytest_twisted.ensureDeferred
async def test_a_switchboard_without_our_subprotocol_is_a_version_mismatch(
        peer: FakeSwitchboard, supervisors: Make) -> None:
    peer.refuse_subprotocol = True
    service = supervisors(reconnect_initial=0.05, reconnect_max=0.5)
    conn = await peer.connection()
    _, code, _ = await within(conn.closed)
    assert code == CloseCode.VERSION_MISMATCH
    assert service.link.connections == 0
    assert service.link._retry_delay(1) >= 0.5


def test_retry_policy_is_capped_exponential_with_jitter() -> None:
    link = SupervisorLink(reactor, "ws://127.0.0.1:1", "t", handler=None,  # type: ignore[arg-type]
                          reconnect_initial=0.5, reconnect_max=10.0, jitter=lambda: 0.0)
    assert [link._retry_delay(n) for n in (1, 2, 3, 4, 5, 6, 7)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    link.failures = 3
    assert link._retry_delay(1) == 4.0
    jittery = SupervisorLink(reactor, "ws://127.0.0.1:1", "t", handler=None,  # type: ignore[arg-type]
                             reconnect_initial=0.5, reconnect_max=10.0, jitter=lambda: 1.0)
    assert jittery._retry_delay(1) == 1.0  # jitter scaled by the initial delay


@pytest.mark.parametrize("url, expected", [
    ("ws://127.0.0.1:8080", (False, "127.0.0.1", 8080, "ws://127.0.0.1:8080/api/v1/supervisor")),
    ("wss://sb.example.org", (True, "sb.example.org", 443,
                              "wss://sb.example.org:443/api/v1/supervisor")),
    ("ws://[::1]:81/treadmill/", (False, "::1", 81, "ws://[::1]:81/treadmill/api/v1/supervisor")),
])
def test_parse_url(url: str, expected: Any) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "ws://", "ws://h:99999",
                                 "ws://u:p@h", "ws://h/?q=1"])
def test_parse_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        parse_url(url)


@pytest_twisted.ensureDeferred
async def test_wss_with_a_ca_file(tmp_path: Path, supervisors: Make) -> None:
    pki = make_pki(tmp_path, "good")
    other = make_pki(tmp_path, "other")
    secure = await FakeSwitchboard().listen_tls(str(pki["key"]), str(pki["cert"]))
    try:
        trusting = supervisors("a", url=secure.url, ca_file=str(pki["ca"]))
        conn = await secure.connection()
        assert (await conn.status())["job"] is None
        await trusting.stopService()
        distrusting = supervisors("b", url=secure.url, ca_file=str(other["ca"]))
        await eventually(lambda: distrusting.link.failures >= 1)
        assert distrusting.link.connections == 0 and secure.open_connections() == []
        await distrusting.stopService()
    finally:
        await secure.shutdown()
