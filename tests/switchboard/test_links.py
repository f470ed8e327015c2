"""The supervisor link, reconciliation and scheduling, against a scripted supervisor.

Each reconciliation case of docs/protocol.md (R1 to R9) has a test here; the
peer in :mod:`tests.switchboard.peer` is a real WebSocket client speaking
protocol v1 over loopback to a real switchboard and PostgreSQL.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.support import RunningSwitchboard, mock_supervisor, start_switchboard
from tests.support import add_host as add_host_token
from tests.switchboard.peer import Peer, Script
from tests.switchboard.support import (
    DIGEST,
    add_host,
    assigned_job,
    connected_peer,
    host_peer,
    job,
    reaches,
    reconnect,
    submit,
)
from tests.switchboard.support import sb as sb  # the fixture: a switchboard with FAST settings
from tests.util.waiting import eventually, sleep
from treadmill.protocol import supervisor as protocol
from treadmill.switchboard.jobstate import Reason, State, Status
from treadmill.switchboard.links import LinkPolicy

# -- the handshake ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_host_token_is_refused(sb: RunningSwitchboard) -> None:
    await add_host(sb)
    for token in ("tmh_" + "x" * 43, "not a token", ""):
        with pytest.raises(ConnectionRefusedError):
            await Peer(sb.url, token).connect()
    r = await sb.admin.get("/api/v1/hosts/h1")
    assert r.body["connected"] is False


@pytest_twisted.ensureDeferred
async def test_other_major_version_is_refused(sb: RunningSwitchboard) -> None:
    token = await add_host(sb)
    with pytest.raises(ConnectionRefusedError):
        await Peer(sb.url, token).connect(subprotocol="treadmill.supervisor.v2")


@pytest_twisted.ensureDeferred
async def test_connected_host_is_listed_live(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    r = await sb.admin.get("/api/v1/hosts/h1")
    assert r.body["connected"] is True and r.body["last_seen_at"]
    peer.disconnect()
    await peer.closed()

    async def gone() -> bool:
        return (await sb.admin.get("/api/v1/hosts/h1")).body["connected"] is False

    await eventually(gone)


# -- a job from start to end ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_job_runs_to_its_exit_status(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    job_id = await submit(sb, parameters={"S": {"value": "hush", "secret": True}})
    start = (await peer.wait_for("start_job", job_id=job_id))[0]
    assert start["job"]["parameters"] == {"S": {"value": "hush", "secret": True}}
    assert start["job"]["image"]["digest"] == DIGEST
    for state, fields in (("initializing", {"stage": "starting"}),
                          ("initializing", {"stage": "booting"}),
                          ("ready", {}),
                          ("terminated", {"reason": "workload_exited", "exit_status": 3,
                                          "message": "exit 3"})):
        ack = await peer.event(job_id, state, **fields)
        assert ack["ok"], ack
    body = await reaches(sb, job_id, "terminated", reason="workload_exited", exit_status=3)
    assert body["host"] == "h1" and body["started_at"] and body["ready_at"]
    events = (await sb.admin.get(f"/api/v1/jobs/{job_id}/events")).body["events"]
    assert [(e["state"], e["stage"]) for e in events] == [
        ("queued", None), ("assigned", None), ("initializing", "starting"),
        ("initializing", "booting"), ("ready", None), ("terminated", None)]
    # A repeated event (after a lost ack) is a no-op, and is acked.
    again = await peer.event(job_id, "terminated", reason="workload_exited", exit_status=3)
    assert again["ok"]
    assert len((await sb.admin.get(f"/api/v1/jobs/{job_id}/events")).body["events"]) == 6


@pytest_twisted.ensureDeferred
async def test_refused_start_ends_the_job(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb, script=Script(start_error=("image_not_found", "no such")))
    job_id = await submit(sb)
    body = await reaches(sb, job_id, "terminated", reason="image_error")
    assert "image_not_found" in body["termination"]["message"]
    peer.script.start_error = ("internal_error", "disk full")
    job2 = await submit(sb)
    await reaches(sb, job2, "terminated", reason="host_start_failure")


@pytest_twisted.ensureDeferred
async def test_start_refused_as_already_running_is_tried_again_soon(
        migrated_database: str, tmp_path: Path) -> None:
    """A supervisor still busy with another job refuses a start (``already_running``):
    the host is reconciled again after ``reconcile_retry``, not at the next periodic
    pass, and the job starts once the supervisor is free."""
    policy = LinkPolicy(reconcile_interval=3600.0, reconcile_retry=0.2)
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 links=policy)
    try:
        peer = await host_peer(sb, script=Script(start_error=("already_running", "busy")))
        job_id = await submit(sb)
        await peer.wait_for("start_job", job_id=job_id)
        peer.script.start_error = None  # its other job is over
        await peer.wait_for("start_job", count=2, timeout=5, job_id=job_id)
        await peer.event(job_id, "initializing", stage="starting")
        await reaches(sb, job_id, "initializing")
    finally:
        await sb.stop()


# -- reconciliation, case by case -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_r1_nothing_expected_nothing_running(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    await reconnect(peer, None)
    assert [m["type"] for m in peer.received] == ["status_request"]


@pytest_twisted.ensureDeferred
async def test_r2_assigned_but_idle_resends_start(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb, script=Script(run_started=False))
    job_id = await assigned_job(sb, peer)
    await reconnect(peer, None)
    await peer.wait_for("start_job", job_id=job_id)
    assert (await job(sb, job_id))["state"] == "assigned"


@pytest.mark.parametrize("state", ["initializing", "ready"])
@pytest_twisted.ensureDeferred
async def test_r3_running_but_idle_is_dropped_and_restarted(sb: RunningSwitchboard,
                                                            state: str) -> None:
    peer = await host_peer(sb)
    job_id = await assigned_job(sb, peer, max_restarts=1)
    await peer.event(job_id, "initializing", stage="starting")
    if state == "ready":
        await peer.event(job_id, "ready")
    await reaches(sb, job_id, state)
    await reconnect(peer, None)
    body = await reaches(sb, job_id, "terminated", reason="host_dropped_job")
    assert body["restarts_left"] == 1
    # The restart policy enqueues a successor, which runs on the host again.
    jobs = (await sb.admin.get("/api/v1/jobs")).body["jobs"]
    successor = next(j for j in jobs if j["restart_of"] == job_id)
    assert successor["restarts_left"] == 0
    await peer.wait_for("start_job", job_id=successor["id"])
    health = (await sb.admin.get("/api/v1/hosts/h1")).body
    assert health["consecutive_failures"] == 1 and health["healthy"] is True


@pytest_twisted.ensureDeferred
async def test_r4_supervisor_ahead_advances_the_job(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    job_id = await assigned_job(sb, peer)
    await reconnect(peer, {"id": job_id, "state": "ready", "stage": None})
    await reaches(sb, job_id, "ready")
    assert not peer.of_type("stop_job") and not peer.of_type("start_job")


@pytest_twisted.ensureDeferred
async def test_r4_in_step_does_nothing(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    job_id = await assigned_job(sb, peer)
    await peer.event(job_id, "ready")
    await reconnect(peer, {"id": job_id, "state": "ready", "stage": None})
    await sb.service.links.reconcile_all()
    assert [m["type"] for m in peer.received if m["type"] != "status_request"] == []
    assert (await job(sb, job_id))["state"] == "ready"


@pytest_twisted.ensureDeferred
async def test_r5_terminating_and_running_sends_stop(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    job_id = await assigned_job(sb, peer)
    await peer.event(job_id, "ready")
    peer.disconnect()
    await peer.closed()
    r = await sb.admin.post(f"/api/v1/jobs/{job_id}/terminate")
    assert r.body["state"] == "terminating"
    peer.received.clear()
    peer.script.job = {"id": job_id, "state": "ready", "stage": None}
    await peer.connect()
    stop = (await peer.wait_for("stop_job"))[0]
    assert stop["job_id"] == job_id and stop["reason"] == "user_terminated"


@pytest_twisted.ensureDeferred
async def test_a_start_is_sent_only_for_a_job_still_assigned_to_the_host(
        sb: RunningSwitchboard) -> None:
    """A start decided earlier (a reconciliation, an assignment note read late) reads
    the job once more and sends nothing once the job has moved on."""
    from treadmill.switchboard.reconcile import Start

    peer = await host_peer(sb)
    job_id = await assigned_job(sb, peer)
    [start] = peer.of_type("start_job")
    assert start["job"]["id"] == job_id
    r = await sb.admin.post(f"/api/v1/jobs/{job_id}/terminate")
    assert r.body["state"] == "terminating"
    await peer.wait_for("stop_job")
    [link] = sb.service.links.by_host.values()
    await link.execute(Start(job_id))
    await link.execute(Start(str(uuid.uuid4())))  # not a job at all
    assert len(peer.of_type("start_job")) == 1


@pytest_twisted.ensureDeferred
async def test_r6_terminating_and_idle_terminates_with_first_reason(
        sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    job_id = await assigned_job(sb, peer)
    await peer.event(job_id, "ready")
    peer.disconnect()
    await peer.closed()
    await sb.admin.post(f"/api/v1/jobs/{job_id}/terminate")
    peer.script.job = None
    await peer.connect()
    await reaches(sb, job_id, "terminated", reason="user_terminated")


@pytest_twisted.ensureDeferred
async def test_r7_unknown_job_running_is_stopped(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    stray = str(uuid.uuid4())
    await reconnect(peer, {"id": stray, "state": "ready", "stage": None})
    stop = (await peer.wait_for("stop_job"))[0]
    assert stop["job_id"] == stray


@pytest_twisted.ensureDeferred
async def test_r8_other_job_running_is_stopped_then_ours_started(
        sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb, script=Script(run_started=False))
    job_id = await assigned_job(sb, peer)
    stray = str(uuid.uuid4())
    await reconnect(peer, {"id": stray, "state": "ready", "stage": None})
    await peer.wait_for("stop_job", job_id=stray)
    await peer.wait_for("start_job", job_id=job_id)
    kinds = [m["type"] for m in peer.received]
    assert kinds.index("stop_job") < kinds.index("start_job")


@pytest_twisted.ensureDeferred
async def test_r9_unreachable_host_ends_its_job(migrated_database: str, tmp_path: Path) -> None:
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 links=LinkPolicy(unreachable_after=1.0))
    try:
        peer = await host_peer(sb)
        job_id = await assigned_job(sb, peer)
        await peer.event(job_id, "ready")
        peer.disconnect()
        await peer.closed()
        body = await reaches(sb, job_id, "terminated", reason="host_unreachable")
        assert "unreachable" in body["termination"]["message"]
    finally:
        await sb.stop()


# -- link management ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_new_connection_supersedes_the_old(sb: RunningSwitchboard) -> None:
    token = await add_host(sb)
    first = await connected_peer(sb, token)
    second = await connected_peer(sb, token)
    assert await first.closed() == protocol.CloseCode.SUPERSEDED
    assert second.connection is not None
    assert (await sb.admin.get("/api/v1/hosts/h1")).body["connected"] is True
    # The old link's close does not mark the host disconnected.
    job_id = await submit(sb)
    await second.wait_for("start_job", job_id=job_id)


@pytest_twisted.ensureDeferred
async def test_replaced_token_closes_the_link(sb: RunningSwitchboard) -> None:
    token = await add_host(sb)
    peer = await connected_peer(sb, token)
    r = await sb.admin.post("/api/v1/hosts/h1/token")
    assert r.status == 200
    assert await peer.closed() == protocol.CloseCode.HOST_REMOVED
    with pytest.raises(ConnectionRefusedError):
        await Peer(sb.url, token).connect()


@pytest_twisted.ensureDeferred
async def test_notes_of_a_links_own_session_read_nothing(sb: RunningSwitchboard,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Accepting a link writes the host row twice (its session, its kinds), and each
    write notifies every instance: the holder re-read the row for each, two statements
    per link that a fleet's failover paid thousands of times. Only notes naming
    another session (or none) are checked."""
    reads: list[int] = []
    real = sb.store.host_link_state

    async def counted(host_id: int) -> dict | None:
        reads.append(host_id)
        return await real(host_id)

    monkeypatch.setattr(sb.store, "host_link_state", counted)
    notes: list[str] = []
    sb.service.listener.observe("treadmill_hosts", notes.append)  # after the links'
    token = await add_host(sb)
    # The host's creation names no session: its note is checked if it comes after
    # the link. Notes of one channel arrive in commit order: once a later one is
    # here, the links have seen the creation's.
    await sb.store.pool.execute("SELECT pg_notify('treadmill_hosts', 'sentinel')")
    await eventually(lambda: "sentinel" in notes)
    peer = await connected_peer(sb, token)
    assert (await sb.admin.put("/api/v1/hosts/h1/tags", {"tags": ["t", "u"]})).status == 200
    job_id = await submit(sb, tags=["u"])
    await peer.wait_for("start_job", job_id=job_id)  # the notes were handled by now
    assert reads == []
    # A newer session still supersedes the first.
    second = await connected_peer(sb, token)
    assert await peer.closed() == protocol.CloseCode.SUPERSEDED
    assert second.connection is not None
    second.disconnect()


@pytest.mark.parametrize("payload", [
    b"{not json",
    b"[]",
    b'{"type": "launch_missiles"}',
    b'{"type": "job_event", "request_id": 1, "job_id": "nope", "state": "ready"}',
    b'{"type": "job_event", "request_id": 1, "job_id": "00000000-0000-0000-0000-000000000000",'
    b' "state": "ready", "extra": true}',
    b'{"type": "ack", "request_id": 999, "ok": true}',
    b'{"type": "status", "request_id": 12345, "job": null}',
    b'{"type": "start_job", "request_id": 1, "job": {}}',
    b'"' + b"x" * (protocol.MAX_MESSAGE_BYTES + 10) + b'"',
])
@pytest_twisted.ensureDeferred
async def test_protocol_violations_close_the_link_and_change_nothing(
        sb: RunningSwitchboard, payload: bytes) -> None:
    peer = await host_peer(sb)
    job_id = await assigned_job(sb, peer)
    before = await job(sb, job_id)
    peer.send(payload)
    code = await peer.closed()
    # An oversized frame is cut off at the TCP level (1006) or with 1009.
    assert code in (protocol.CloseCode.PROTOCOL_VIOLATION, 1009, 1006)
    assert await job(sb, job_id) == before
    if code == protocol.CloseCode.PROTOCOL_VIOLATION and len(payload) < 1000:
        assert peer.of_type("protocol_error")
    # The switchboard is unharmed: the host reconnects and carries on.
    await peer.connect()
    await peer.wait_for("status_request")


@pytest_twisted.ensureDeferred
async def test_a_host_cannot_report_another_hosts_job(sb: RunningSwitchboard) -> None:
    token1 = await add_host(sb, "h1", ("t",))
    token2 = await add_host(sb, "h2", ("u",))
    peer1 = await connected_peer(sb, token1)
    peer2 = await connected_peer(sb, token2)
    job_id = await assigned_job(sb, peer1)
    ack = await peer2.event(job_id, "terminated", reason="workload_exited", exit_status=0)
    assert not ack["ok"] and ack["error"]["code"] == "not_your_job"
    assert (await job(sb, job_id))["state"] == "assigned"


@pytest_twisted.ensureDeferred
async def test_stale_event_is_acked_and_ignored(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    job_id = await assigned_job(sb, peer)
    await peer.event(job_id, "initializing", stage="booting")
    ack = await peer.event(job_id, "initializing", stage="starting")
    assert ack["ok"]
    assert (await job(sb, job_id))["stage"] == "booting"


# -- scheduling --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tags_must_be_a_subset_of_the_hosts(sb: RunningSwitchboard) -> None:
    small = await add_host(sb, "small", ("t",))
    big = await add_host(sb, "big", ("t", "gpu"))
    peer_small = await connected_peer(sb, small, Script(run_started=False))
    peer_big = await connected_peer(sb, big, Script(run_started=False))
    needs_gpu = await submit(sb, tags=["t", "gpu"])
    await peer_big.wait_for("start_job", job_id=needs_gpu)
    plain = await submit(sb, tags=["t"])
    await peer_small.wait_for("start_job", job_id=plain)
    assert not peer_small.of_type("start_job")[1:] and len(peer_big.of_type("start_job")) == 1


@pytest_twisted.ensureDeferred
async def test_drained_host_gets_no_jobs_until_enabled(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    await sb.admin.post("/api/v1/hosts/h1/drain")
    job_id = await submit(sb)
    await sb.service.scheduler.expire_unrunnable()
    await eventually(lambda: _passes(sb, 3))
    assert (await job(sb, job_id))["state"] == "queued"
    await sb.admin.post("/api/v1/hosts/h1/enable")
    await peer.wait_for("start_job", job_id=job_id)


async def _passes(sb: RunningSwitchboard, n: int) -> bool:
    start = getattr(sb, "_passes0", None)
    if start is None:
        sb._passes0 = sb.service.scheduler.counts.passes  # type: ignore[attr-defined]
        return False
    return sb.service.scheduler.counts.passes - start >= n


@pytest_twisted.ensureDeferred
async def test_host_failing_repeatedly_is_taken_out_of_service(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    for _ in range(3):
        job_id = await assigned_job(sb, peer)
        await peer.event(job_id, "terminated", reason="host_start_failure", message="no power")
        await reaches(sb, job_id, "terminated")
        peer.script.job = None
    host = (await sb.admin.get("/api/v1/hosts/h1")).body
    assert host["healthy"] is False and host["consecutive_failures"] == 3
    waiting = await submit(sb)
    await eventually(lambda: _passes(sb, 3))
    assert (await job(sb, waiting))["state"] == "queued"
    r = await sb.admin.post("/api/v1/hosts/h1/enable")
    assert r.body["healthy"] is True and r.body["consecutive_failures"] == 0
    await peer.wait_for("start_job", job_id=waiting)


@pytest_twisted.ensureDeferred
async def test_fairness_between_two_users_on_one_host(sb: RunningSwitchboard) -> None:
    token = await add_host(sb)
    alice = await sb.user("alice")
    bob = await sb.user("bob")
    peer = await connected_peer(sb, token, Script(run_started=False))
    # Alice floods the queue first; Bob submits one job after.
    alice_jobs = [await submit(sb, alice, label=f"a{i}") for i in range(4)]
    first = (await peer.wait_for("start_job"))[0]["job"]["id"]
    assert first == alice_jobs[0]
    bob_job = await submit(sb, bob)
    order = [first]
    for _ in range(3):
        current = order[-1]
        await peer.event(current, "terminated", reason="workload_exited", exit_status=0)
        peer.script.job = None
        starts = await peer.wait_for("start_job", count=len(order) + 1)
        order.append(starts[-1]["job"]["id"])
    # Bob, served least, goes before Alice's older jobs.
    assert order[1] == bob_job
    assert order[2:] == alice_jobs[1:3]


@pytest_twisted.ensureDeferred
async def test_job_no_host_can_run_expires(migrated_database: str, tmp_path: Path) -> None:
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 unrunnable_grace=0.0)
    try:
        await add_host(sb, tags=("t",), grant=False)
        job_id = await submit(sb, tags=["fpga"])
        await sb.service.scheduler.expire_unrunnable()
        body = await reaches(sb, job_id, "terminated", reason="queue_timeout")
        assert "no host can run" in body["termination"]["message"]
        # A user without start on any host cannot run anything either.
        nobody = await sb.user("nobody")
        r = await nobody.post("/api/v1/jobs", {"image": DIGEST, "tags": ["t"]})
        await sb.service.scheduler.expire_unrunnable()
        await reaches(sb, r.body["id"], "terminated", reason="queue_timeout")
    finally:
        await sb.stop()


@pytest_twisted.ensureDeferred
async def test_execution_timeout_stops_the_job_on_its_host(migrated_database: str,
                                                           tmp_path: Path) -> None:
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 timeout_interval=0.1)
    try:
        peer = await host_peer(sb)
        job_id = await assigned_job(sb, peer, timeout=1)
        await peer.event(job_id, "ready")
        stop = (await peer.wait_for("stop_job", job_id=job_id))[0]
        assert stop["reason"] == "execution_timeout"
        await peer.event(job_id, "terminated", reason="execution_timeout")
        await reaches(sb, job_id, "terminated", reason="execution_timeout")
    finally:
        await sb.stop()


@pytest_twisted.ensureDeferred
async def test_cancel_while_ready_stops_on_the_host(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    job_id = await assigned_job(sb, peer)
    await peer.event(job_id, "ready")
    r = await sb.admin.post(f"/api/v1/jobs/{job_id}/terminate")
    assert r.body["state"] == "terminating"
    await peer.wait_for("stop_job", job_id=job_id, reason="user_terminated")
    # The host reports it ended; the first reason stays.
    await peer.event(job_id, "terminated", reason="workload_exited", exit_status=137)
    await reaches(sb, job_id, "terminated", reason="user_terminated", exit_status=137)


@pytest_twisted.ensureDeferred
async def test_transition_store_api(sb: RunningSwitchboard) -> None:
    """Store-level moves used by the tests above behave as the API shows them."""
    peer = await host_peer(sb, script=Script(run_started=False))
    job_id = await assigned_job(sb, peer)
    assert await sb.store.transition(job_id, Status(State.TERMINATING,
                                                    reason=Reason.USER_TERMINATED))
    await peer.wait_for("stop_job", job_id=job_id)


@pytest_twisted.ensureDeferred
async def test_silent_peer_is_detected_by_heartbeats(migrated_database: str,
                                                     tmp_path: Path) -> None:
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 links=LinkPolicy(ping_interval=1.0, ping_timeout=2.0))
    try:
        peer = await host_peer(sb)
        assert peer.connection is not None
        # The peer's host freezes: it reads nothing more, so it answers no ping.
        peer.connection.transport.pauseProducing()
        started = reactor.seconds()

        async def gone() -> bool:
            return not sb.service.links.by_host

        await eventually(gone, timeout=15)
        # interval + timeout (3 s), with room for a machine loaded by other work; a link
        # without heartbeats stays up as long as its TCP connection does (forever here).
        assert reactor.seconds() - started < 9
        host = (await sb.admin.get("/api/v1/hosts/h1")).body
        assert host["connected"] is False
    finally:
        await sb.stop()


@pytest_twisted.ensureDeferred
async def test_a_supervisor_that_pings_is_not_pinged_until_it_falls_silent(
        migrated_database: str, tmp_path: Path) -> None:
    """A link's own pings prove it alive (no second keepalive from the switchboard); a
    quiet but answering link gets pings and stays; a frozen one is dropped in time."""
    from twisted.internet.task import LoopingCall

    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 links=LinkPolicy(ping_interval=0.5, ping_timeout=1.5))
    try:
        peer = await host_peer(sb)
        connection = peer.connection
        assert connection is not None
        pings: list[float] = []
        answer = connection.onPing

        def counted(payload: bytes) -> None:
            pings.append(reactor.seconds())
            answer(payload)

        connection.onPing = counted  # type: ignore[method-assign]
        pinging = LoopingCall(connection.sendPing)
        pinging.start(0.2)
        await sleep(3.0)  # six ping intervals
        assert pings == [] and sb.service.links.by_host
        # Quiet but answering: pinged, and kept.
        pinging.stop()
        await eventually(lambda: pings, timeout=5)
        await sleep(2.0)
        assert len(pings) >= 2 and sb.service.links.by_host
        # Frozen: neither pings nor pongs; dropped within 1.25 intervals + the timeout.
        connection.transport.pauseProducing()
        started = reactor.seconds()
        await eventually(lambda: not sb.service.links.by_host, timeout=15)
        assert reactor.seconds() - started < 6  # 2.1 s, with room for a loaded machine
    finally:
        await sb.stop()


@pytest_twisted.ensureDeferred
async def test_a_sub_second_heartbeat_pings_at_its_interval_end_to_end(
        migrated_database: str, tmp_path: Path) -> None:
    """A real supervisor (``heartbeat.interval = 0.3``) linked over loopback to a real
    switchboard (``ping_interval = 0.3``) pings about every 0.3 s, not in a loop
    (Autobahn's txaio timer: thousands a second), and the switchboard, hearing those
    pings, sends few or none of its own."""
    sb = await start_switchboard(migrated_database, tmp_path,
                                 links=LinkPolicy(ping_interval=0.3, ping_timeout=2.0))
    supervisor = None
    try:
        token = await add_host_token(sb.admin, "mock-1", ["mock"])
        supervisor = mock_supervisor(sb.url, token, tmp_path / "mock-1", config={
            "heartbeat_interval": 0.3, "heartbeat_timeout": 2.0})
        session = await supervisor.connected()
        await eventually(lambda: sb.service.links.by_host)
        (link,) = sb.service.links.by_host.values()
        sent, started = session.autoPingPendingSeq, reactor.seconds()
        answered = link.autoPingPendingSeq
        await sleep(2.0)
        pings = session.autoPingPendingSeq - sent
        elapsed = reactor.seconds() - started
        # One ping every 0.3 s plus a round trip: at most 7 in 2 s; fewer on a loaded machine.
        assert 3 <= pings <= elapsed / 0.3 + 1, (pings, elapsed)
        # Heard in time, the switchboard pings none; each delay beyond the slack costs one.
        assert link.autoPingPendingSeq - answered <= elapsed / 0.3
        assert session.state == session.STATE_OPEN and link.state == link.STATE_OPEN
    finally:
        if supervisor is not None:
            await supervisor.stopService()
        await sb.stop()


@pytest_twisted.ensureDeferred
async def test_start_job_names_log_servers_with_a_write_token(migrated_database: str,
                                                              tmp_path: Path) -> None:
    from treadmill.common.captoken import CapabilityVerifier, parse_jwks
    from treadmill.switchboard.api import Limits

    servers = ("http://logs-1.example:8082", "http://logs-2.example:8082",
               "http://logs-3.example:8082")
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 limits=Limits(log_servers=servers, log_replicas=2))
    try:
        token = await add_host(sb)
        peer = await connected_peer(sb, token)
        job_id = await submit(sb)
        start = (await peer.wait_for("start_job", job_id=job_id))[0]["job"]
        urls = [s["url"] for s in start["log_servers"]]
        assert len(urls) == 2 and set(urls) <= set(servers)
        keys = parse_jwks((await sb.admin.get("/.well-known/treadmill/capability-keys")).body)
        verifier = CapabilityVerifier(keys, "treadmill", "treadmill-logserver", reactor)
        claims = verifier.verify(start["log_servers"][0]["token"], "job", job_id, "append")
        assert claims.subject == "host:h1"
        assert (await job(sb, job_id))["logs"] == urls
        # Users get read tokens for the same servers.
        r = await sb.admin.post(f"/api/v1/jobs/{job_id}/logs/token")
        assert r.body["servers"] == urls
        verifier.verify(r.body["token"], "job", job_id, "read")
        with pytest.raises(Exception, match="does not grant append"):
            verifier.verify(r.body["token"], "job", job_id, "append")
    finally:
        await sb.stop()


@pytest_twisted.ensureDeferred
async def test_proxies_in_start_job_and_reported_endpoints(migrated_database: str,
                                                           tmp_path: Path) -> None:
    from treadmill.common.captoken import CapabilityVerifier, parse_jwks

    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 proxies=("http://proxy-1.example:8090",))
    try:
        token = await add_host(sb)
        token2 = await add_host(sb, "h2", ("u",))
        peer = await connected_peer(sb, token)
        other = await connected_peer(sb, token2)
        job_id = await assigned_job(sb, peer)
        start = peer.of_type("start_job")[-1]["job"]
        assert [p["url"] for p in start["proxies"]] == ["http://proxy-1.example:8090"]
        keys = parse_jwks((await sb.admin.get("/.well-known/treadmill/capability-keys")).body)
        CapabilityVerifier(keys, "treadmill", "treadmill-proxy", reactor).verify(
            start["proxies"][0]["token"], "tunnel", job_id, "publish")
        endpoint = {"service": "ssh", "proxy": "http://proxy-1.example:8090",
                    "host": "proxy-1.example", "port": 40022}
        ids = iter(range(1000, 2000))

        async def report(p: Peer, endpoints: list) -> dict:
            from twisted.internet.defer import Deferred

            rid = next(ids)
            waiter: Deferred = Deferred()
            p._acks[rid] = waiter
            p.send(protocol.job_endpoints(rid, job_id, endpoints))
            return await waiter

        assert (await report(peer, [endpoint]))["ok"]
        assert (await job(sb, job_id))["endpoints"] == [endpoint]
        denied = await report(other, [])
        assert not denied["ok"] and denied["error"]["code"] == "not_your_job"
        await peer.event(job_id, "terminated", reason="workload_exited", exit_status=0)
        assert (await job(sb, job_id))["endpoints"] == []
    finally:
        await sb.stop()
