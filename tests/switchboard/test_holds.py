"""Held hosts on the switchboard (``hold_on_failure``, docs/jobs.md), against a scripted
supervisor: a held failure keeps its host from the scheduler until a cancel, the
expiry or a reconciliation ends the hold; only ``stop`` may release it; a
supervisor below minor 6 gets no ``hold_on_failure``. Extending a hold: who may
(``manage``), how far (``jobs.max_hold`` from now), which jobs (held ones, 409
otherwise), what the store and the audit log record, and the ``renew_tokens`` with
``held_for`` (protocol minor 9) the supervisor gets at once or, when it missed it, at a
reconciliation (R4b).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from tests.support import RunningSwitchboard, start_switchboard
from tests.switchboard.peer import Peer, Script
from tests.switchboard.support import (
    add_host,
    assigned_job,
    host_peer,
    job,
    reaches,
    reconnect,
    seconds_of,
    submit,
    without_sweep,
)
from tests.util.running import stopping
from tests.util.ssh import new_ssh_public_key
from tests.util.waiting import eventually, sleep
from treadmill.common.captoken import MAX_TTL
from treadmill.protocol import supervisor as protocol
from treadmill.switchboard.api import Limits
from treadmill.switchboard.renewal import HOLD_DRIFT
from treadmill.switchboard.store.errors import Conflict, NotFound

MAX_HOLD = 120.0
ON_TIME = 0.5  # seconds after its held_until within which a hold ends


@pytest_twisted.async_yield_fixture
async def sb(migrated_database: str, tmp_path: Path):
    async with stopping(await start_switchboard(
            migrated_database, tmp_path, scheduler_interval=0.2, timeout_interval=0.1,
            limits=Limits(max_hold=MAX_HOLD, max_timeout=MAX_TTL - 3600))) as running:
        yield running


async def held_failure(sb: RunningSwitchboard, peer: Peer, hold: float = 60.0,
                       client: Any = None) -> str:
    """A job with ``hold_on_failure`` that failed on ``peer``'s host, which holds it."""
    job_id = await submit(sb, client, hold_on_failure=hold)
    start = (await peer.wait_for("start_job", job_id=job_id))[-1]
    assert start["job"]["hold_on_failure"] == hold
    await peer.event(job_id, "ready")
    peer.script.job, peer.script.held = None, job_id
    ack = await peer.event(job_id, "terminated", reason="workload_exited", exit_status=3,
                           held=True)
    assert ack["ok"] is True, ack
    return job_id


def _renewals(peer: Peer, job_id: str) -> list[dict[str, Any]]:
    return [m for m in peer.of_type("renew_tokens") if m["job_id"] == job_id]


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
async def test_the_hold_expires_at_its_end(sb: RunningSwitchboard) -> None:
    await without_sweep(sb)
    peer = await host_peer(sb)
    held = await held_failure(sb, peer, hold=1.0)
    until = seconds_of((await job(sb, held))["held_until"])
    waiting = await submit(sb)
    await peer.wait_for("stop_job", job_id=held, reason="execution_timeout", timeout=3)
    assert until - 0.05 <= reactor.seconds() < until + ON_TIME
    await peer.wait_for("start_job", job_id=waiting)
    assert (await job(sb, held))["held_until"] is None


@pytest_twisted.ensureDeferred
async def test_only_stop_may_release_and_only_manage_extend_a_hold(
        sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    alice, bob, eve = (await sb.user("alice"), await sb.user("bob"), await sb.user("eve"))
    held = await held_failure(sb, peer, client=alice)
    before = (await job(sb, held))["held_until"]
    await alice.post(f"/api/v1/jobs/{held}/grants", {"user": "bob", "privilege": "read"})
    assert (await bob.get(f"/api/v1/jobs/{held}")).body["held_until"] == before
    for client, status in ((bob, 403), (eve, 404)):
        for action in ("terminate", "extend"):
            r = await client.post(f"/api/v1/jobs/{held}/{action}", {"by": 60})
            assert r.status == status, (action, r.body)
    # A grant of stop may release, not extend; manage may extend.
    await alice.post(f"/api/v1/jobs/{held}/grants", {"user": "bob", "privilege": "stop"})
    r = await bob.post(f"/api/v1/jobs/{held}/extend", {"by": 60})
    assert r.status == 403, r.body
    await sleep(0.5)
    assert (await job(sb, held))["held_until"] == before
    assert not peer.of_type("stop_job") and not _renewals(peer, held)
    await alice.post(f"/api/v1/jobs/{held}/grants", {"user": "bob", "privilege": "manage"})
    r = await bob.post(f"/api/v1/jobs/{held}/extend", {"by": 60})
    assert r.status == 200, r.body
    assert seconds_of(r.body["held_until"]) == pytest.approx(seconds_of(before) + 60, abs=0.01)
    r = await bob.post(f"/api/v1/jobs/{held}/terminate")  # manage includes stop
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


# -- extending a hold (POST .../extend of a held job; renew_tokens.held_for, minor 9) -------


@pytest_twisted.ensureDeferred
async def test_an_extended_hold_outlives_its_first_end(sb: RunningSwitchboard) -> None:
    await without_sweep(sb)
    peer = await host_peer(sb)
    alice = await sb.user("alice")
    held = await held_failure(sb, peer, hold=2.0, client=alice)
    first = seconds_of((await job(sb, held))["held_until"])
    waiting = await submit(sb)
    r = await alice.post(f"/api/v1/jobs/{held}/extend", {"by": 3})
    assert r.status == 200, r.body
    assert r.body["state"] == "terminated"
    assert seconds_of(r.body["held_until"]) == pytest.approx(first + 3, abs=0.01)
    # The supervisor is told at once: the hold's new end and fresh tokens.
    [renewal] = await peer.wait_for("renew_tokens", job_id=held)
    protocol.validate(renewal)
    assert 3.0 < renewal["held_for"] <= 5.0
    assert renewal["timeout"] == (await job(sb, held))["timeout"]
    # The host stays held past the first end, and shows the new one.
    await sleep(max(0.0, first - reactor.seconds()) + 0.5)
    assert not peer.of_type("stop_job")
    assert (await job(sb, waiting))["state"] == "queued"
    host = (await sb.admin.get("/api/v1/hosts/h1")).body
    assert (host["current_job"], host["held_by"]) == (held, "alice")
    assert host["held_until"] == r.body["held_until"]
    # Then it ends, at the new end: the next job runs.
    await peer.wait_for("stop_job", job_id=held, reason="execution_timeout", timeout=10)
    assert first + 3 - 0.05 <= reactor.seconds() < first + 3 + ON_TIME
    await peer.wait_for("start_job", job_id=waiting)
    assert (await job(sb, held))["held_until"] is None
    audit = (await sb.admin.get(f"/api/v1/audit?action=job.extend&job={held}")).body
    [entry] = audit["entries"]
    assert entry["actor"] == "alice" and entry["details"]["by"] == 3
    assert entry["details"]["held_until"] is not None and "deadline" not in entry["details"]
    assert seconds_of(entry["details"]["held_until"]) == pytest.approx(first + 3, abs=0.01)


@pytest_twisted.ensureDeferred
async def test_a_hold_ends_at_most_max_hold_from_now(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    held = await held_failure(sb, peer, hold=60.0)
    before = (await job(sb, held))["held_until"]
    r = await sb.admin.post(f"/api/v1/jobs/{held}/extend", {"by": 61})
    assert r.status == 400, r.body
    assert "at most 120 seconds from now" in r.body["error"]["message"], r.body
    for bad in (0, -5, "10", None):
        r = await sb.admin.post(f"/api/v1/jobs/{held}/extend", {"by": bad})
        assert r.status == 400, r.body
    assert (await job(sb, held))["held_until"] == before
    r = await sb.admin.post(f"/api/v1/jobs/{held}/extend", {"by": 59})
    assert r.status == 200, r.body
    assert seconds_of(r.body["held_until"]) == pytest.approx(seconds_of(before) + 59, abs=0.01)


@pytest_twisted.ensureDeferred
async def test_only_a_held_host_may_be_extended_after_the_end(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    # An ended job that holds nothing: 409.
    done = await submit(sb, hold_on_failure=60)
    await peer.wait_for("start_job", job_id=done)
    peer.script.job = None
    await peer.event(done, "terminated", reason="workload_exited", exit_status=0)
    await reaches(sb, done, "terminated")
    r = await sb.admin.post(f"/api/v1/jobs/{done}/extend", {"by": 60})
    assert r.status == 409 and "not held" in r.body["error"]["message"], r.body
    # A hold released (tml job cancel), ended or not yet freed by its host: 409.
    held = await held_failure(sb, peer)
    r = await sb.admin.post(f"/api/v1/jobs/{held}/terminate")
    assert r.status == 200, r.body
    r = await sb.admin.post(f"/api/v1/jobs/{held}/extend", {"by": 60})
    assert r.status == 409, r.body
    await peer.wait_for("stop_job", job_id=held)
    await eventually(lambda: _hold_over(sb, held), timeout=10)
    r = await sb.admin.post(f"/api/v1/jobs/{held}/extend", {"by": 60})
    assert r.status == 409 and "not held" in r.body["error"]["message"], r.body
    assert not _renewals(peer, held)


async def _hold_over(sb: RunningSwitchboard, job_id: str) -> bool:
    return (await job(sb, job_id))["held_until"] is None


@pytest_twisted.ensureDeferred
async def test_the_store_extends_holds_only(sb: RunningSwitchboard) -> None:
    """``Store.extend_hold`` on its own (real PostgreSQL): bounds, conflicts, the row."""
    peer = await host_peer(sb)
    held = await held_failure(sb, peer, hold=30.0)
    store = sb.store
    host = await store.pool.fetchone("SELECT id FROM hosts WHERE name = 'h1'")
    assert host is not None
    row = await store.held_job(host["id"])
    assert row is not None and str(row["id"]) == held and not row["due"]
    assert 25.0 < row["held_for"] <= 30.0 and row["timeout"] > 0
    updated = await store.extend_hold(held, 50.0, 90.0)
    assert updated["host_id"] == host["id"]
    row = await store.held_job(updated["host_id"])
    assert row is not None and 75.0 < row["held_for"] <= 80.0
    with pytest.raises(ValueError, match="at most 90 seconds"):
        await store.extend_hold(held, 11.0, 90.0)
    with pytest.raises(NotFound):
        await store.extend_hold("00000000-0000-4000-8000-000000000000", 1.0, 90.0)
    other = await submit(sb)
    with pytest.raises(Conflict, match="not held"):
        await store.extend_hold(other, 1.0, 90.0)
    # Without a link nothing ends the released hold (a link would, once its host
    # acknowledged the stop: then the job is "not held") before extend_hold sees it.
    peer.disconnect()
    await eventually(lambda: not sb.service.links.by_host, timeout=10)
    assert await store.release_hold(held)
    with pytest.raises(Conflict, match="has ended"):
        await store.extend_hold(held, 1.0, 90.0)


@pytest.mark.parametrize(("held_for", "held_timeout", "renewed"), [
    (None, None, False),  # as the database says (the test's start: 60 s, 3600 s)
    (59.0, 3600.0, False),  # a little sooner (the two clocks, the time since the end)
    (10.0, 3600.0, True),  # ends sooner than the database's: missed an extension
    (55.0, 60.0, True),  # a lower timeout: the job was extended while the link was down
    (500.0, 3600.0, False),  # later than the database's: the switchboard ends it then
])
@pytest_twisted.ensureDeferred
async def test_a_reconciliation_renews_an_outdated_hold(
        sb: RunningSwitchboard, held_for: float | None, held_timeout: float | None,
        renewed: bool) -> None:
    """R4b: the supervisor's ``status`` says what it knows of its hold (minor 9)."""
    peer = await host_peer(sb)
    held = await held_failure(sb, peer, hold=60.0)
    timeout = (await job(sb, held))["timeout"]
    assert timeout == 3600.0
    # As the database knows it (within HOLD_DRIFT) unless the case says otherwise.
    peer.script.held_for = held_for if held_for is not None else 60.0 - HOLD_DRIFT / 2
    peer.script.held_timeout = held_timeout if held_timeout is not None else timeout
    await reconnect(peer, None)
    await sleep(0.5)
    renewals = _renewals(peer, held)
    assert bool(renewals) is renewed, renewals
    if renewed:
        assert 55.0 < renewals[0]["held_for"] <= 60.0 and renewals[0]["timeout"] == timeout
    assert not peer.of_type("stop_job")


@pytest_twisted.ensureDeferred
async def test_a_supervisor_below_minor_9_gets_no_renewal_of_a_hold(
        sb: RunningSwitchboard) -> None:
    """It could not apply it: the extension is recorded, and the host's supervisor ends the
    hold at its first end (docs/jobs.md)."""
    token = await add_host(sb)
    peer = Peer(sb.url, token, Script(), minor=protocol.HOLD_RENEW_MINOR - 1)
    await peer.connect()
    await peer.wait_for("status_request")
    held = await held_failure(sb, peer)
    r = await sb.admin.post(f"/api/v1/jobs/{held}/extend", {"by": 30})
    assert r.status == 200, r.body
    await reconnect(peer, None)
    await sleep(0.5)
    assert not _renewals(peer, held)
    # Its status may not carry the minor 9 fields: none were sent.
    assert all("held_for" not in m for m in peer.received)


@pytest_twisted.ensureDeferred
async def test_a_lost_hold_renewal_is_resent(sb: RunningSwitchboard) -> None:
    """The link's request for the renewal went unanswered: the next reconciliation sends
    it again, since the supervisor still reports its first end."""
    peer = await host_peer(sb)
    held = await held_failure(sb, peer, hold=60.0)
    peer.script.held_for, peer.script.held_timeout = 59.0, 3600.0
    r = await sb.admin.post(f"/api/v1/jobs/{held}/extend", {"by": 30})
    assert r.status == 200, r.body
    await peer.wait_for("renew_tokens", job_id=held)
    [link] = sb.service.links.by_host.values()
    await link.reconcile()
    assert len(_renewals(peer, held)) == 2
    assert 85.0 < _renewals(peer, held)[-1]["held_for"] <= 90.0


@pytest_twisted.ensureDeferred
async def test_a_supervisor_below_minor_9_that_ends_an_extended_hold_frees_its_host(
        sb: RunningSwitchboard) -> None:
    """It ends the hold at its first end and says nothing (docs/jobs.md): from then on the
    switchboard asks for its ``status`` until that no longer names the hold, and frees the
    host at once, not at the next periodic reconciliation (30 s)."""
    token = await add_host(sb)
    peer = Peer(sb.url, token, Script(), minor=protocol.HOLD_RENEW_MINOR - 1)
    await peer.connect()
    await peer.wait_for("status_request")
    held = await held_failure(sb, peer, hold=1.0)
    first = seconds_of((await job(sb, held))["held_until"])
    r = await sb.admin.post(f"/api/v1/jobs/{held}/extend", {"by": 30})
    assert r.status == 200, r.body
    waiting = await submit(sb)
    # Its teardown takes a second past the first end; meanwhile its status names the hold.
    teardown = 1.0
    reactor.callLater(first + teardown - reactor.seconds(),
                      lambda: setattr(peer.script, "held", None))
    await sleep(first + teardown - reactor.seconds() - 0.1)
    assert (await job(sb, held))["held_until"] is not None
    assert len(peer.of_type("status_request")) >= 2  # probed from the first end on
    await eventually(lambda: _hold_over(sb, held), timeout=3)
    assert reactor.seconds() < first + teardown + 2 * ON_TIME
    await peer.wait_for("start_job", job_id=waiting)
    assert not peer.of_type("stop_job")  # it let the host go by itself
    # The probes stopped with the hold.
    probes = len(peer.of_type("status_request"))
    await sleep(1.0)
    assert len(peer.of_type("status_request")) == probes
