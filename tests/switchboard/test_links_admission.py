"""Admission control for supervisor link handshakes, against a real switchboard.

``supervisors.max_handshakes`` handshakes may be under way; a registration is made
to wait by a row lock on its host (:func:`tests.switchboard.support.locked_hosts`),
so the gate fills exactly when a test says. Beyond the limit an upgrade waits in
the queue (held open, no database work) and gets the slot of the handshake that
ends first, whichever way it ends (registered, refused, closed mid-way, timed
out); a full queue, a wait that runs out, or no queue at all answers 503 with
``Retry-After``; a client that goes while queued frees its place; ``/healthz``
answers meanwhile; and many real supervisors through a gate of two all connect.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet.defer import Deferred

from tests.support import RunningSwitchboard, mock_supervisor, start_switchboard
from tests.switchboard.peer import Peer
from tests.switchboard.support import FAST, add_host, locked_hosts
from tests.util.raw import raw_connect
from tests.util.running import stopping
from tests.util.waiting import eventually, sleep
from treadmill.protocol import supervisor as protocol
from treadmill.switchboard.database import Timeouts
from treadmill.switchboard.links import LinkPolicy, SupervisorLinks


async def gated(dsn: str, tmp: Path, limit: int, queue: int = 0,
                wait: float = 10.0) -> RunningSwitchboard:
    """A switchboard admitting ``limit`` handshakes at once and queueing ``queue`` for up
    to ``wait`` seconds; its lock timeout is longer than any row lock a test holds."""
    policy = LinkPolicy(max_handshakes=limit, handshake_queue=queue, handshake_wait=wait)
    return await start_switchboard(dsn, tmp, links=policy, timeouts=Timeouts(lock=30.0), **FAST)


def links(sb: RunningSwitchboard) -> SupervisorLinks:
    return sb.service.links


def upgrade(token: str) -> bytes:
    return ("GET /api/v1/supervisor HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol.SUBPROTOCOL}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n").encode()


def port(sb: RunningSwitchboard) -> int:
    return int(sb.url.rsplit(":", 1)[1])


async def connected(sb: RunningSwitchboard, name: str) -> bool:
    return bool((await sb.admin.get(f"/api/v1/hosts/{name}")).body["connected"])


async def settled(sb: RunningSwitchboard) -> None:
    """Every slot free: a registered link keeps its slot until its first
    reconciliation ends."""
    await eventually(lambda: links(sb).gate.in_progress == 0, timeout=5,
                     what="every handshake slot free")


async def healthz_within(sb: RunningSwitchboard, seconds: float) -> None:
    started = time.monotonic()
    r = await treq.get(f"{sb.url}/healthz")
    await r.content()
    assert r.code == 200 and time.monotonic() - started < seconds


async def stuck_registration(sb: RunningSwitchboard, token: str) -> Deferred[Any]:
    """A peer's connection whose handshake is under way (its host's row is locked)."""
    pending = Deferred.fromCoroutine(Peer(sb.url, token).connect())
    await eventually(lambda: links(sb).gate.in_progress == 1, interval=0.02,
                     what="a handshake under way")
    return pending


async def quiet_database(sb: RunningSwitchboard, name: str) -> None:
    """Wait until the host's stalled registration (and its undoing) has run."""
    await sleep(0.5)
    rows = await sb.store.pool.fetchall(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'")
    assert rows[0]["n"] == 0
    await sleep(0.2)


async def queued(sb: RunningSwitchboard, token: str, count: int = 1) -> Deferred[Any]:
    """A peer's connection waiting in the queue (the ``count``-th waiting)."""
    pending = Deferred.fromCoroutine(Peer(sb.url, token).connect())
    await eventually(lambda: links(sb).gate.waiting == count, interval=0.02,
                     what="an upgrade in the queue")
    return pending


@pytest_twisted.ensureDeferred
async def test_without_a_queue_an_upgrade_beyond_the_limit_is_refused_at_once_with_503(
        migrated_database: str, tmp_path: Path) -> None:
    async with stopping(await gated(migrated_database, tmp_path, 1)) as sb:
        t1, t2 = await add_host(sb, "h1"), await add_host(sb, "h2")
        async with locked_hosts(migrated_database, "h1"):
            pending = await stuck_registration(sb, t1)
            started = time.monotonic()
            raw = await raw_connect(port(sb))
            raw.transport.write(upgrade(t2))
            await eventually(lambda: b"\r\n\r\n" in raw.data and raw.data.endswith(b"}"),
                             timeout=2, what="the refusal")
            assert time.monotonic() - started < 1.0
            head, body = raw.data.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 503 ")
            assert b"\r\nRetry-After: 1" in head
            assert json.loads(body)["error"]["code"] == "unavailable"
            raw.transport.loseConnection()
            assert links(sb).gate.refused == 1 and not await connected(sb, "h2")
            await healthz_within(sb, 1.0)  # The instance answers its checks meanwhile.
            assert not pending.called
        await pending  # The lock is gone: h1's handshake ends, registered.
        assert await connected(sb, "h1")
        await settled(sb)
        await Peer(sb.url, t2).connect()  # The slot is free again.
        assert await connected(sb, "h2") and links(sb).gate.admitted == 2


@pytest_twisted.ensureDeferred
async def test_a_refused_token_frees_its_slot(migrated_database: str, tmp_path: Path) -> None:
    async with stopping(await gated(migrated_database, tmp_path, 1)) as sb:
        token = await add_host(sb, "h1")
        for wrong in ("tmh_" + "x" * 43, "tmh_" + "y" * 43, "tmh_" + "z" * 43):
            try:
                await Peer(sb.url, wrong).connect()
            except ConnectionRefusedError:
                pass
            else:
                raise AssertionError("an unknown token was accepted")
            assert links(sb).gate.in_progress == 0
        await Peer(sb.url, token).connect()
        assert links(sb).gate.refused == 0 and links(sb).gate.admitted == 4


@pytest_twisted.ensureDeferred
async def test_a_connection_closed_mid_handshake_frees_its_slot_and_is_not_registered(
        migrated_database: str, tmp_path: Path) -> None:
    """The slot frees when the supervisor goes, not when the stalled database work ends;
    that work, once done, must not leave a dead link registered for the host."""
    async with stopping(await gated(migrated_database, tmp_path, 1)) as sb:
        t1, t2 = await add_host(sb, "h1"), await add_host(sb, "h2")
        async with locked_hosts(migrated_database, "h1"):
            raw = await raw_connect(port(sb))
            raw.transport.write(upgrade(t1))
            await eventually(lambda: links(sb).gate.in_progress == 1)
            raw.transport.abortConnection()
            await eventually(lambda: links(sb).gate.in_progress == 0, timeout=2)
            await Peer(sb.url, t2).connect()  # While h1's registration still waits.
            assert await connected(sb, "h2")
        await quiet_database(sb, "h1")
        assert not await connected(sb, "h1")
        h1 = await sb.store.pool.fetchall("SELECT id, session FROM hosts WHERE name = 'h1'")
        assert h1[0]["session"] is None and h1[0]["id"] not in links(sb).by_host
        await Peer(sb.url, t1).connect()
        assert await connected(sb, "h1")


@pytest_twisted.ensureDeferred
async def test_a_handshake_that_times_out_frees_its_slot(migrated_database: str,
                                                        tmp_path: Path) -> None:
    async with stopping(await gated(migrated_database, tmp_path, 1)) as sb:
        links(sb).factory.setProtocolOptions(openHandshakeTimeout=1.5)
        t1, t2 = await add_host(sb, "h1"), await add_host(sb, "h2")
        async with locked_hosts(migrated_database, "h1"):
            pending = await stuck_registration(sb, t1)
            started = time.monotonic()
            try:
                await pending
            except ConnectionRefusedError:
                pass
            else:
                raise AssertionError("a stalled handshake opened")
            assert time.monotonic() - started < 3.0
            assert links(sb).gate.in_progress == 0
            await Peer(sb.url, t2).connect()
        await quiet_database(sb, "h1")
        assert not await connected(sb, "h1")


@pytest_twisted.ensureDeferred
async def test_many_supervisors_through_a_gate_of_two_all_connect(
        migrated_database: str, tmp_path: Path) -> None:
    """Two stalled handshakes fill the gate; 22 real supervisors are refused meanwhile
    (503, none for good), /healthz answers throughout, and once the database moves
    every supervisor is connected, never more than two handshakes at once."""
    count = 24
    async with stopping(await gated(migrated_database, tmp_path, 2)) as sb:
        tokens = [await add_host(sb, f"h{i}") for i in range(count)]
        supervisors = []
        try:
            async with locked_hosts(migrated_database, "h0", "h1"):
                for i, token in enumerate(tokens):
                    supervisors.append(mock_supervisor(sb.url, token, tmp_path / f"s{i}"))
                    if i == 1:  # h0 and h1 first: their stalled handshakes fill the gate
                        await eventually(lambda: links(sb).gate.in_progress == 2, timeout=10,
                                         what="h0 and h1 in the gate")
                await eventually(lambda: links(sb).gate.refused >= count - 2, timeout=10,
                                 what="every other supervisor refused")
                for _ in range(5):
                    await healthz_within(sb, 0.5)
                    await sleep(0.1)
                assert len(links(sb).by_host) <= 2  # h0 and h1, still registering
            hosts = [f"h{i}" for i in range(count)]

            async def all_connected() -> bool:
                return all([await connected(sb, name) for name in hosts])

            await eventually(all_connected, timeout=30, interval=0.5,
                             what="every supervisor connected")
            assert len(links(sb).by_host) == count
            await settled(sb)
            assert links(sb).gate.peak == 2
            assert all(s.link.session is not None for s in supervisors)
        finally:
            for supervisor in supervisors:
                await supervisor.stopService()


# -- the queue ------------------------------------------------------------------------


async def refusal(raw: Any, within: float) -> tuple[bytes, dict[str, Any]]:
    """The head and JSON body of the 503 ``raw`` receives within ``within`` seconds."""
    await eventually(lambda: b"\r\n\r\n" in raw.data and raw.data.endswith(b"}"),
                     timeout=within, what="the refusal")
    head, body = raw.data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 ")
    return head, json.loads(body)


@pytest_twisted.ensureDeferred
async def test_a_queued_upgrade_waits_and_connects_when_the_handshake_before_registers(
        migrated_database: str, tmp_path: Path) -> None:
    async with stopping(await gated(migrated_database, tmp_path, 1, queue=4)) as sb:
        t1, t2, t3 = [await add_host(sb, f"h{i}") for i in (1, 2, 3)]
        async with locked_hosts(migrated_database, "h1"):
            first = await stuck_registration(sb, t1)
            second = await queued(sb, t2)
            third = await queued(sb, t3, count=2)
            for _ in range(3):
                await healthz_within(sb, 0.5)  # the instance answers its checks meanwhile
            await sleep(0.3)
            assert not second.called and not third.called
            assert not await connected(sb, "h2") and links(sb).gate.refused == 0
        await first  # h1 registers; its slot goes to h2, then h2's to h3
        await second
        await third
        assert all([await connected(sb, name) for name in ("h1", "h2", "h3")])
        gate = links(sb).gate
        await settled(sb)
        assert gate.peak == 1 and gate.queued == 2 and gate.waiting == 0
        assert gate.refused == 0


@pytest_twisted.ensureDeferred
async def test_a_refused_token_hands_its_slot_to_the_next_in_the_queue(
        migrated_database: str, tmp_path: Path) -> None:
    async with stopping(await gated(migrated_database, tmp_path, 1, queue=4)) as sb:
        t1, t2 = await add_host(sb, "h1"), await add_host(sb, "h2")
        async with locked_hosts(migrated_database, "h1"):
            first = await stuck_registration(sb, t1)
            wrong = await queued(sb, "tmh_" + "x" * 43)
            good = await queued(sb, t2, count=2)
        await first
        try:
            await wrong
        except ConnectionRefusedError:
            pass
        else:
            raise AssertionError("an unknown token was accepted")
        await good
        assert await connected(sb, "h2")
        await settled(sb)


@pytest_twisted.ensureDeferred
async def test_a_connection_closed_mid_handshake_hands_its_slot_to_the_queue(
        migrated_database: str, tmp_path: Path) -> None:
    async with stopping(await gated(migrated_database, tmp_path, 1, queue=4)) as sb:
        t1, t2 = await add_host(sb, "h1"), await add_host(sb, "h2")
        async with locked_hosts(migrated_database, "h1"):
            raw = await raw_connect(port(sb))
            raw.transport.write(upgrade(t1))
            await eventually(lambda: links(sb).gate.in_progress == 1)
            waiting = await queued(sb, t2)
            raw.transport.abortConnection()
            await waiting  # while h1's registration still waits for its lock
            assert await connected(sb, "h2")
        await quiet_database(sb, "h1")
        assert not await connected(sb, "h1")


@pytest_twisted.ensureDeferred
async def test_a_handshake_that_times_out_hands_its_slot_to_the_queue(
        migrated_database: str, tmp_path: Path) -> None:
    async with stopping(await gated(migrated_database, tmp_path, 1, queue=4)) as sb:
        links(sb).factory.setProtocolOptions(openHandshakeTimeout=1.5)
        t1, t2 = await add_host(sb, "h1"), await add_host(sb, "h2")
        async with locked_hosts(migrated_database, "h1"):
            first = await stuck_registration(sb, t1)
            waiting = await queued(sb, t2)
            try:
                await first
            except ConnectionRefusedError:
                pass
            else:
                raise AssertionError("a stalled handshake opened")
            await waiting
            assert await connected(sb, "h2")
        await quiet_database(sb, "h1")


@pytest_twisted.ensureDeferred
async def test_a_full_queue_and_a_wait_that_runs_out_answer_503_with_retry_after(
        migrated_database: str, tmp_path: Path) -> None:
    async with stopping(await gated(migrated_database, tmp_path, 1, queue=1,
                                    wait=1.0)) as sb:
        t1, t2, t3 = [await add_host(sb, f"h{i}") for i in (1, 2, 3)]
        async with locked_hosts(migrated_database, "h1"):
            first = await stuck_registration(sb, t1)
            held = await raw_connect(port(sb))
            held.transport.write(upgrade(t2))
            await eventually(lambda: links(sb).gate.waiting == 1, interval=0.02)
            started = time.monotonic()
            beyond = await raw_connect(port(sb))
            beyond.transport.write(upgrade(t3))
            head, body = await refusal(beyond, within=0.5)  # the queue is full: at once
            assert b"\r\nRetry-After: " in head and body["error"]["code"] == "unavailable"
            head, body = await refusal(held, within=3.0)  # its wait ran out
            assert 0.9 < time.monotonic() - started < 2.5
            assert b"\r\nRetry-After: " in head and body["error"]["code"] == "unavailable"
            gate = links(sb).gate
            assert gate.refused == 2 and gate.timed_out == 1 and gate.waiting == 0
            assert not await connected(sb, "h2") and not await connected(sb, "h3")
        await first


@pytest_twisted.ensureDeferred
async def test_a_client_that_goes_while_queued_frees_its_place(
        migrated_database: str, tmp_path: Path) -> None:
    async with stopping(await gated(migrated_database, tmp_path, 1, queue=1)) as sb:
        t1, t2, t3 = [await add_host(sb, f"h{i}") for i in (1, 2, 3)]
        async with locked_hosts(migrated_database, "h1"):
            first = await stuck_registration(sb, t1)
            gone = await raw_connect(port(sb))
            gone.transport.write(upgrade(t2))
            await eventually(lambda: links(sb).gate.waiting == 1, interval=0.02)
            gone.transport.abortConnection()
            await eventually(lambda: links(sb).gate.waiting == 0, timeout=2,
                             what="the place freed")
            third = await queued(sb, t3)  # the queue of one has room again
        await first
        await third
        assert await connected(sb, "h3") and not await connected(sb, "h2")
        assert links(sb).gate.refused == 0
        await settled(sb)


@pytest_twisted.ensureDeferred
async def test_a_registered_link_keeps_its_slot_until_its_first_reconciliation_ends(
        migrated_database: str, tmp_path: Path) -> None:
    """The gate bounds all of a new link's work: its first reconciliation (a status
    round trip, a statement) too, so a queued upgrade waits for it."""
    async with stopping(await gated(migrated_database, tmp_path, 1, queue=4)) as sb:
        t1, t2 = await add_host(sb, "h1"), await add_host(sb, "h2")
        silent = Peer(sb.url, t1)
        silent.script.answer_status = False  # its status request goes unanswered
        await silent.connect()
        await silent.wait_for("status_request")
        assert await connected(sb, "h1") and links(sb).gate.in_progress == 1
        waiting = await queued(sb, t2)
        await sleep(0.3)
        assert not waiting.called
        request = next(m for m in silent.received if m["type"] == "status_request")
        silent.send(protocol.status(request["request_id"], None))  # it answers: settled
        await waiting
        assert await connected(sb, "h2")
        await settled(sb)
