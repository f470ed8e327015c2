"""Held hosts on the switchboard (``hold_on_failure``, docs/jobs.md), against a scripted
supervisor: a held failure keeps its host from the scheduler until a cancel, the
expiry or a reconciliation ends the hold; only ``stop`` may release it; a
supervisor below minor 6 gets no ``hold_on_failure``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from tests.support import RunningSwitchboard, start_switchboard
from tests.switchboard.peer import Peer, Script
from tests.switchboard.support import (
    add_host,
    assigned_job,
    held_failure,
    host_peer,
    job,
    reaches,
    reconnect,
    seconds_of,
    submit,
)
from tests.util.running import stopping
from tests.util.ssh import new_ssh_public_key
from tests.util.waiting import eventually, sleep
from treadmill.common.captoken import MAX_TTL
from treadmill.protocol import supervisor as protocol
from treadmill.switchboard.api import Limits

MAX_HOLD = 120.0


@pytest_twisted.async_yield_fixture
async def sb(migrated_database: str, tmp_path: Path):
    async with stopping(await start_switchboard(
            migrated_database, tmp_path, scheduler_interval=0.2, timeout_interval=0.1,
            limits=Limits(max_hold=MAX_HOLD, max_timeout=MAX_TTL - 3600))) as running:
        yield running


async def not_started(sb: RunningSwitchboard, peer: Peer, job_id: str) -> None:
    await sleep(1.0)  # five scheduling passes
    assert (await job(sb, job_id))["state"] == "queued"
    assert not [m for m in peer.of_type("start_job") if m["job"]["id"] == job_id]


@pytest_twisted.ensureDeferred
async def test_a_held_failure_keeps_its_host_until_cancelled(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    alice = await sb.user("alice")
    held = await held_failure(sb, peer, client=alice)
    body = await reaches(sb, held, "terminated", reason="workload_exited", exit_status=3)
    assert body["hold_on_failure"] == 60.0
    assert 55 < seconds_of(body["held_until"]) - seconds_of(body["terminated_at"]) <= 60.0
    # The host takes nothing else meanwhile, and shows who holds it until when.
    waiting = await submit(sb)
    await not_started(sb, peer, waiting)
    host = (await sb.admin.get("/api/v1/hosts/h1")).body
    assert (host["current_job"], host["held_by"]) == (held, "alice")
    assert seconds_of(host["held_until"]) == seconds_of(body["held_until"])
    assert not peer.of_type("stop_job")
    # The cancel of the ended job releases its host: a stop_job, then the next job.
    r = await alice.post(f"/api/v1/jobs/{held}/terminate")
    assert r.status == 200 and r.body["state"] == "terminated", r.body
    await peer.wait_for("stop_job", job_id=held, reason="user_terminated")
    await peer.wait_for("start_job", job_id=waiting)
    body = await job(sb, held)
    assert body["held_until"] is None and body["endpoints"] == []
    assert body["termination"]["reason"] == "workload_exited"  # the end is as it was
    host = (await sb.admin.get("/api/v1/hosts/h1")).body
    assert host["current_job"] == waiting
    # A second cancel changes nothing and sends nothing.
    r = await alice.post(f"/api/v1/jobs/{held}/terminate")
    assert r.status == 200 and r.body["held_until"] is None
    await sleep(0.5)
    assert len(peer.of_type("stop_job")) == 1
    audit = (await sb.admin.get(f"/api/v1/audit?action=job.cancel&job={held}")).body
    assert [(e["actor"], e["details"].get("released"), e["details"]["changed"])
            for e in audit["entries"]] == [("alice", None, False), ("alice", True, True)], audit


@pytest_twisted.ensureDeferred
async def test_the_hold_expires(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    held = await held_failure(sb, peer, hold=1.0)
    waiting = await submit(sb)
    await peer.wait_for("stop_job", job_id=held, reason="execution_timeout", timeout=15)
    await peer.wait_for("start_job", job_id=waiting)
    assert (await job(sb, held))["held_until"] is None


@pytest_twisted.ensureDeferred
async def test_only_stop_may_release_a_hold(sb: RunningSwitchboard) -> None:
    """(Extending a hold needs ``manage``: tests/switchboard/test_hold_extension.py.)"""
    peer = await host_peer(sb)
    alice, bob, eve = (await sb.user("alice"), await sb.user("bob"), await sb.user("eve"))
    held = await held_failure(sb, peer, client=alice)
    before = (await job(sb, held))["held_until"]
    await alice.post(f"/api/v1/jobs/{held}/grants", {"user": "bob", "privilege": "read"})
    assert (await bob.get(f"/api/v1/jobs/{held}")).body["held_until"] == before
    for client, status in ((bob, 403), (eve, 404)):
        r = await client.post(f"/api/v1/jobs/{held}/terminate")
        assert r.status == status, r.body
    await sleep(0.5)
    assert (await job(sb, held))["held_until"] == before
    assert not peer.of_type("stop_job")
    # A grant of stop is enough.
    await alice.post(f"/api/v1/jobs/{held}/grants", {"user": "bob", "privilege": "stop"})
    r = await bob.post(f"/api/v1/jobs/{held}/terminate")
    assert r.status == 200, r.body
    await peer.wait_for("stop_job", job_id=held, reason="user_terminated")


@pytest.mark.parametrize("hold", [0, -1, "30", True, None, MAX_HOLD + 1, [1]])
@pytest_twisted.ensureDeferred
async def test_bad_holds_are_refused(sb: RunningSwitchboard, hold: Any) -> None:
    r = await sb.admin.post("/api/v1/jobs", {"image": "sha256:" + "c" * 64,
                                             "hold_on_failure": hold})
    assert r.status == 400, r.body
    if hold == MAX_HOLD + 1:
        assert "at most 120 seconds" in r.body["error"]["message"]


@pytest.mark.parametrize("timeout, status", [(MAX_TTL - 3600 - MAX_HOLD, 201),
                                             (MAX_TTL - 3600 - MAX_HOLD + 1, 400)])
@pytest_twisted.ensureDeferred
async def test_a_hold_must_end_before_the_hosts_tokens_expire(
        sb: RunningSwitchboard, timeout: float, status: int) -> None:
    """The tokens a host gets for a job (log shipping, tunnels) live its timeout plus its
    hold plus an hour, at most 8 days: a held host's logs must not outlive them."""
    r = await sb.admin.post("/api/v1/jobs", {"image": "sha256:" + "c" * 64,
                                             "timeout": timeout, "hold_on_failure": MAX_HOLD})
    assert r.status == status, r.body
    if status == 400:
        assert "timeout plus its hold" in r.body["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_a_supervisor_below_minor_6_gets_no_hold(sb: RunningSwitchboard) -> None:
    token = await add_host(sb)
    peer = Peer(sb.url, token, Script(), minor=protocol.HOLD_MINOR - 1)
    await peer.connect()
    await peer.wait_for("status_request")
    job_id = await assigned_job(sb, peer, hold_on_failure=60)
    start = peer.of_type("start_job")[-1]
    assert "hold_on_failure" not in start["job"]
    # Its events cannot start a hold either.
    await peer.event(job_id, "terminated", reason="workload_exited", exit_status=3, held=True)
    body = await reaches(sb, job_id, "terminated")
    assert body["held_until"] is None


@pytest_twisted.ensureDeferred
async def test_a_success_or_a_final_event_without_held_holds_nothing(
        sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    job_id = await assigned_job(sb, peer, hold_on_failure=60)
    peer.script.job = None
    await peer.event(job_id, "terminated", reason="workload_exited", exit_status=3)
    assert (await reaches(sb, job_id, "terminated"))["held_until"] is None
    nxt = await submit(sb)
    await peer.wait_for("start_job", job_id=nxt)


@pytest_twisted.ensureDeferred
async def test_reconciliation_keeps_or_ends_holds(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    held = await held_failure(sb, peer)
    waiting = await submit(sb)
    # The switchboard's link comes back (a switchboard restart, a failover): the
    # supervisor still names the hold, so it stays.
    await reconnect(peer, None)
    await not_started(sb, peer, waiting)
    assert (await job(sb, held))["held_until"] is not None
    assert not peer.of_type("stop_job")
    # The supervisor restarted (it holds nothing now): the hold is over, the host free.
    peer.script.held = None
    await reconnect(peer, None)
    await peer.wait_for("start_job", job_id=waiting)
    assert (await job(sb, held))["held_until"] is None
    assert not peer.of_type("stop_job")


@pytest_twisted.ensureDeferred
async def test_a_hold_the_database_does_not_know_is_released(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    held = await held_failure(sb, peer)
    # Released while the link was away (the database no longer knows the hold) ...
    await sb.store.end_hold(held)
    await reconnect(peer, None)
    # ... yet the supervisor still keeps the host: it is told to let it go.
    await peer.wait_for("stop_job", job_id=held)
    await eventually(lambda: peer.script.held is None)


@pytest_twisted.ensureDeferred
async def test_a_held_jobs_host_may_still_publish_its_endpoints(sb: RunningSwitchboard) -> None:
    """A held VM's services are published again after its supervisor's restart (and its
    first publication may land after the job's end): endpoints and SSH host keys of a
    held job are recorded; once the hold is over, no longer."""
    peer = await host_peer(sb)
    held = await held_failure(sb, peer)
    endpoint = {"service": "ssh", "proxy": "http://proxy-1.example:8090",
                "host": "proxy-1.example", "port": 40022}
    host_key = new_ssh_public_key()
    rids = iter(range(5000, 6000))

    async def report(endpoints: list, keys: list | None = None, by: Peer = peer) -> dict:
        rid = next(rids)
        waiter: Deferred = Deferred()
        by._acks[rid] = waiter
        by.send(protocol.job_endpoints(rid, held, endpoints, ssh_host_keys=keys))
        return await waiter

    # Another host cannot publish for it (nor plant a host key for ssh to trust).
    stranger = await host_peer(sb, "h2")
    denied = await report([endpoint], [host_key], by=stranger)
    assert not denied["ok"] and denied["error"]["code"] == "not_your_job", denied
    assert (await job(sb, held))["ssh_host_keys"] == []
    assert (await report([endpoint], [host_key]))["ok"]
    body = await job(sb, held)
    assert body["endpoints"] == [endpoint] and body["ssh_host_keys"] == [host_key]
    r = await sb.admin.post(f"/api/v1/jobs/{held}/terminate")
    assert r.status == 200, r.body
    await peer.wait_for("stop_job", job_id=held, reason="user_terminated")
    await eventually(lambda: _hold_over(sb, held), timeout=10)
    assert (await report([endpoint]))["ok"]  # acknowledged, not recorded: the job is over
    assert (await job(sb, held))["endpoints"] == []


async def _hold_over(sb: RunningSwitchboard, job_id: str) -> bool:
    return (await job(sb, job_id))["held_until"] is None
