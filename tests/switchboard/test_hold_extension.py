"""Extending a held host's hold (``POST /api/v1/jobs/{id}/extend`` of an ended job whose
host is held, docs/jobs.md) against a scripted supervisor and a real database: who may,
how far (``jobs.max_hold`` from now), which jobs (held ones, 409 otherwise), what the
store and the audit log record, and the ``renew_tokens`` with ``held_for`` (protocol
minor 9) the supervisor gets at once or, when it missed it, at a reconciliation (R4b).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.support import RunningSwitchboard, start_switchboard
from tests.switchboard.peer import Peer, Script
from tests.switchboard.support import (
    add_host,
    held_failure,
    host_peer,
    job,
    reaches,
    reconnect,
    seconds_of,
    submit,
)
from tests.util.running import stopping
from tests.util.waiting import eventually, sleep
from treadmill.common.captoken import MAX_TTL
from treadmill.protocol import supervisor as protocol
from treadmill.switchboard.api import Limits
from treadmill.switchboard.renewal import HOLD_DRIFT
from treadmill.switchboard.store.errors import Conflict, NotFound

MAX_HOLD = 120.0


@pytest_twisted.async_yield_fixture
async def sb(migrated_database: str, tmp_path: Path):
    async with stopping(await start_switchboard(
            migrated_database, tmp_path, scheduler_interval=0.2, unreachable_after=60.0,
            timeout_interval=0.1,
            limits=Limits(max_hold=MAX_HOLD, max_timeout=MAX_TTL - 3600))) as running:
        yield running


def _renewals(peer: Peer, job_id: str) -> list[dict[str, Any]]:
    return [m for m in peer.of_type("renew_tokens") if m["job_id"] == job_id]


@pytest_twisted.ensureDeferred
async def test_an_extended_hold_outlives_its_first_end(sb: RunningSwitchboard) -> None:
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
    assert reactor.seconds() >= first + 3 - 0.5
    await peer.wait_for("start_job", job_id=waiting)
    assert (await job(sb, held))["held_until"] is None
    audit = (await sb.admin.get(f"/api/v1/audit?action=job.extend&job={held}")).body
    [entry] = audit["entries"]
    assert entry["actor"] == "alice" and entry["details"]["by"] == 3
    assert entry["details"]["held_until"] is not None and "deadline" not in entry["details"]
    assert seconds_of(entry["details"]["held_until"]) == pytest.approx(first + 3, abs=0.01)


@pytest_twisted.ensureDeferred
async def test_only_manage_may_extend_a_hold(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    alice, bob, eve = (await sb.user("alice"), await sb.user("bob"), await sb.user("eve"))
    held = await held_failure(sb, peer, client=alice)
    before = (await job(sb, held))["held_until"]
    for privilege in ("read", "stop"):
        await alice.post(f"/api/v1/jobs/{held}/grants", {"user": "bob", "privilege": privilege})
        r = await bob.post(f"/api/v1/jobs/{held}/extend", {"by": 60})
        assert r.status == 403, r.body
    r = await eve.post(f"/api/v1/jobs/{held}/extend", {"by": 60})
    assert r.status == 404, r.body
    assert (await job(sb, held))["held_until"] == before
    assert not _renewals(peer, held)
    await alice.post(f"/api/v1/jobs/{held}/grants", {"user": "bob", "privilege": "manage"})
    r = await bob.post(f"/api/v1/jobs/{held}/extend", {"by": 60})
    assert r.status == 200, r.body
    assert seconds_of(r.body["held_until"]) == pytest.approx(seconds_of(before) + 60, abs=0.01)


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
