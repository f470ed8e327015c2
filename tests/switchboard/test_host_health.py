"""Host health that users cannot spoil, on a real switchboard and PostgreSQL with a
scripted supervisor (``docs/operations.md``, "Host health"): failures blamed on
the job never count, suspicious ones and the clock run the operator's health
check, and only a failing check takes the host out of service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted

from tests.support import RunningSwitchboard, start_switchboard
from tests.switchboard import support
from tests.switchboard.peer import Peer
from tests.util.running import stopping
from tests.util.waiting import eventually

CHECK_DIGEST = "sha256:" + "e" * 64


@pytest_twisted.async_yield_fixture
async def sb(migrated_database: str, tmp_path: Path):
    async with stopping(await start_switchboard(migrated_database, tmp_path, **support.FAST,
                                                health_interval=3600.0)) as running:
        yield running


async def health(sb: RunningSwitchboard, host: str = "h1", client: Any = None
                 ) -> dict[str, Any]:
    r = await (client or sb.admin).get(f"/api/v1/hosts/{host}/health")
    assert r.status == 200, r.body
    return r.body


async def set_check(sb: RunningSwitchboard, target: str = "hosts/h1", **fields: Any
                    ) -> dict[str, Any]:
    r = await sb.admin.put(f"/api/v1/health-checks/{target}",
                           {"image": CHECK_DIGEST, **fields})
    assert r.status == 200, r.body
    return r.body


async def run(peer: Peer, job_id: str, exit_status: int = 0) -> None:
    """The peer runs ``job_id`` to its workload's exit."""
    await peer.event(job_id, "initializing", stage="starting")
    await peer.event(job_id, "ready")
    await peer.event(job_id, "terminated", reason="workload_exited", exit_status=exit_status)
    peer.script.job = None


async def start_failure(sb: RunningSwitchboard, peer: Peer, client: Any = None,
                        stage: str = "booting") -> str:
    """A job that fails to start in ``stage`` (its image fetched: no agent at boot)."""
    job_id = await support.submit(sb, client) if client else await support.assigned_job(sb, peer)
    await peer.wait_for("start_job", job_id=job_id)
    await peer.event(job_id, "initializing", stage=stage)
    await peer.event(job_id, "terminated", reason="host_start_failure", message="no agent")
    await support.reaches(sb, job_id, "terminated")
    peer.script.job = None
    return job_id


async def next_check(sb: RunningSwitchboard, peer: Peer) -> dict[str, Any]:
    """The health-check job the host was given (assigned to it)."""
    async def found() -> dict[str, Any] | None:
        jobs = (await sb.admin.get("/api/v1/jobs")).body["jobs"]
        checks = [j for j in jobs if j["health_check"] and j["state"] == "assigned"]
        return checks[0] if checks else None

    check = await eventually(found)
    await peer.wait_for("start_job", job_id=check["id"])
    return check


@pytest_twisted.ensureDeferred
async def test_a_users_bad_image_never_counts_against_the_host(sb: RunningSwitchboard):
    peer = await support.host_peer(sb)
    alice = await sb.user("alice")
    for _ in range(5):  # more than hosts.max_failures
        await start_failure(sb, peer, alice)
    state = await health(sb)
    assert state["healthy"] is True and state["consecutive_failures"] == 0
    assert [e["event"] for e in state["events"]] == ["not_counted"] * 5
    assert all(e["reason"] == "host_start_failure" for e in state["events"])
    # The host still runs jobs.
    job_id = await support.assigned_job(sb, peer)
    await run(peer, job_id)
    await support.reaches(sb, job_id, "terminated", exit_status=0)


@pytest_twisted.ensureDeferred
async def test_start_refused_for_bad_parameters_is_the_jobs(sb: RunningSwitchboard):
    peer = await support.host_peer(sb)
    await run(peer, await support.assigned_job(sb, peer))  # the image is known to start
    peer.script.start_error = ("bad_request", "unknown parameter mock.nonsense")
    alice = await sb.user("alice")
    for _ in range(4):
        job_id = await support.submit(sb, alice)
        await support.reaches(sb, job_id, "terminated", reason="host_start_failure")
    state = await health(sb)
    assert state["healthy"] is True and state["consecutive_failures"] == 0
    assert state["events"][0]["message"] == (
        "blamed on the job: the host refused its start as a bad request")
    # Refused for the host's own reasons, before any image was fetched: the host's.
    peer.script.start_error = ("internal_error", "disk full")
    job_id = await support.submit(sb, alice)
    await support.reaches(sb, job_id, "terminated", reason="host_start_failure")
    state = await health(sb)
    assert state["consecutive_failures"] == 1 and state["events"][0]["event"] == "failure"


@pytest_twisted.ensureDeferred
async def test_host_failures_without_a_check_take_the_host_out(sb: RunningSwitchboard):
    peer = await support.host_peer(sb)
    await run(peer, await support.assigned_job(sb, peer))  # DIGEST has become ready once
    for stage in ("booting", "starting", "fetching_image"):
        await start_failure(sb, peer, stage=stage)
    state = await health(sb)
    assert state["healthy"] is False and state["consecutive_failures"] == 3
    assert [e["event"] for e in state["events"]][:2] == ["out_of_service", "failure"]
    r = await sb.admin.post("/api/v1/hosts/h1/enable")
    assert r.body["healthy"] is True
    state = await health(sb)
    assert state["events"][0]["event"] == "enabled"
    assert state["events"][0]["actor"] == "admin"


@pytest_twisted.ensureDeferred
async def test_dropped_jobs_run_the_check_which_passes(sb: RunningSwitchboard):
    peer = await support.host_peer(sb)
    await set_check(sb, expect_exit=0, after_failures=2)  # not hosts.max_failures (3)
    for n in range(2):
        job_id = await support.assigned_job(sb, peer)
        await peer.event(job_id, "initializing", stage="starting")
        await support.reaches(sb, job_id, "initializing")
        await support.reconnect(peer, None)  # R3: the host lost the job
        await support.reaches(sb, job_id, "terminated", reason="host_dropped_job")
        if n < 1:
            assert (await health(sb))["consecutive_failures"] == n + 1
    waiting = await support.submit(sb)  # queued behind the check, which the host runs first
    check = await next_check(sb, peer)
    assert check["owner"] == "admin" and check["host"] == "h1"
    assert check["image"]["digest"] == CHECK_DIGEST
    assert (await support.job(sb, waiting))["state"] == "queued"
    await run(peer, check["id"], exit_status=0)
    await peer.wait_for("start_job", job_id=waiting)
    state = await health(sb)
    assert state["healthy"] is True and state["consecutive_failures"] == 0
    assert state["last_check_at"] is not None
    events = [e["event"] for e in state["events"]]
    assert events[:3] == ["check_passed", "check_started", "failure"]
    assert state["events"][1]["message"] == "2 host-side failures in a row"
    assert state["events"][0]["job"] == check["id"]


@pytest_twisted.ensureDeferred
async def test_a_failing_check_takes_the_host_out_and_queued_jobs_say_so(
        sb: RunningSwitchboard):
    peer = await support.host_peer(sb)
    await set_check(sb, expect_exit=0, every_jobs=1)
    first = await support.assigned_job(sb, peer)
    await run(peer, first)
    check = await next_check(sb, peer)
    await run(peer, check["id"], exit_status=7)
    await support.reaches(sb, check["id"], "terminated", exit_status=7)
    state = await health(sb)
    assert state["healthy"] is False
    assert state["events"][0]["event"] == "check_failed"
    assert "exit status 7" in state["events"][0]["message"]
    assert "expected exit status 0" in state["events"][0]["message"]
    # A queued job that only this host could run says why it waits.
    waiting = await support.submit(sb)
    assert await sb.store.refresh_queue_messages() == 1
    body = await support.job(sb, waiting)
    assert body["state"] == "queued"
    assert body["state_message"] == (
        "waiting: every host that could run it is out of service: h1 (unhealthy)")
    await sb.admin.post("/api/v1/hosts/h1/drain")
    await sb.store.refresh_queue_messages()
    assert (await support.job(sb, waiting))["state_message"].endswith("h1 (unhealthy, drained)")
    # The audit log says who took it out.
    audit = (await sb.admin.get("/api/v1/audit?action=host.health")).body["entries"]
    assert audit[0]["actor"] == "switchboard" and audit[0]["details"]["healthy"] is False
    # An operator puts it back; the message goes, the job runs.
    await sb.admin.post("/api/v1/hosts/h1/enable")
    await sb.store.refresh_queue_messages()
    assert (await support.job(sb, waiting))["state_message"] is None
    await peer.wait_for("start_job", job_id=waiting)


@pytest_twisted.ensureDeferred
async def test_every_n_jobs_runs_the_check(sb: RunningSwitchboard):
    peer = await support.host_peer(sb, tags=("t", "qemu"))
    await set_check(sb, "tags/qemu", every_jobs=3)
    for _ in range(2):
        await run(peer, await support.assigned_job(sb, peer))
    assert (await health(sb))["jobs_since_check"] == 2
    await run(peer, await support.assigned_job(sb, peer))
    check = await next_check(sb, peer)
    assert check["label"] == "health check: every 3 jobs"
    state = await health(sb)
    assert state["jobs_since_check"] == 0
    assert state["check"]["scope"] == "tag" and state["check"]["target"] == "qemu"
    await run(peer, check["id"])
    await support.reaches(sb, check["id"], "terminated")
    # The check itself is not one of the host's jobs.
    assert (await health(sb))["jobs_since_check"] == 0


@pytest_twisted.ensureDeferred
async def test_every_h_hours_runs_the_check_on_an_idle_host(sb: RunningSwitchboard):
    peer = await support.host_peer(sb)
    await set_check(sb, every_hours=0.0001)  # 0.36 s

    async def started() -> list[str] | None:
        return await sb.store.run_due_checks() or None

    (job_id,) = await eventually(started)
    await peer.wait_for("start_job", job_id=job_id)
    assert await sb.store.run_due_checks() == []  # the host is busy with it
    await run(peer, job_id)
    await support.reaches(sb, job_id, "terminated")
    events = [e["event"] for e in (await health(sb))["events"]]
    assert events[:2] == ["check_passed", "check_started"]


@pytest_twisted.ensureDeferred
async def test_health_is_read_like_the_host_and_checks_are_for_admins(
        sb: RunningSwitchboard):
    token = await support.add_host(sb)
    await sb.admin.post("/api/v1/hosts/h1/grants", {"user": "*", "privilege": "read"})
    await support.add_host(sb, "hidden", grant=False)
    peer = await support.connected_peer(sb, token)
    alice = await sb.user("alice")
    bob = await sb.user("bob")
    # Admins only set and list checks; a non-admin learns nothing from the answer.
    for client in (alice, bob):
        for target in ("hosts/h1", "hosts/hidden", "tags/t", "hosts/nosuch"):
            r = await client.put(f"/api/v1/health-checks/{target}", {"image": CHECK_DIGEST})
            assert r.status == 403, r.body
            r = await client.delete(f"/api/v1/health-checks/{target}")
            assert r.status == 403, r.body
        assert (await client.get("/api/v1/health-checks")).status == 403
    assert (await sb.admin.get("/api/v1/health-checks")).body == {"checks": []}
    # Health is read like the host: a host you cannot see does not exist.
    assert (await alice.get("/api/v1/hosts/hidden/health")).status == 404
    assert (await alice.get("/api/v1/hosts/nosuch/health")).status == 404
    # A host reader sees the history, but only the job ids they may read.
    bobs = await support.submit(sb, bob)
    await peer.wait_for("start_job", job_id=bobs)
    await peer.event(bobs, "terminated", reason="host_start_failure")
    await support.reaches(sb, bobs, "terminated")
    assert (await health(sb, client=bob))["events"][0]["job"] == bobs
    assert (await health(sb, client=alice))["events"][0]["job"] is None
    assert (await health(sb))["events"][0]["job"] == bobs


@pytest_twisted.ensureDeferred
async def test_bad_check_requests_are_refused_clearly(sb: RunningSwitchboard):
    await support.add_host(sb)
    for target, body, status in [
        ("hosts/h1", {}, 400),
        ("hosts/h1", {"image": CHECK_DIGEST, "expect_exit": 256}, 400),
        ("hosts/h1", {"image": CHECK_DIGEST, "every_jobs": 0}, 400),
        ("hosts/h1", {"image": CHECK_DIGEST, "every_hours": 0}, 400),
        ("hosts/h1", {"image": CHECK_DIGEST, "extra": 1}, 400),
        ("hosts/h1", {"image": "no-such-image"}, 400),
        ("hosts/nosuch", {"image": CHECK_DIGEST}, 404),
        ("hosts/bad name", {"image": CHECK_DIGEST}, 400),
        ("tags/bad tag", {"image": CHECK_DIGEST}, 400),
        ("users/x", {"image": CHECK_DIGEST}, 404),
    ]:
        r = await sb.admin.put(f"/api/v1/health-checks/{target}", body)
        assert r.status == status, (target, body, r.body)
        assert "error" in r.body
    assert (await sb.admin.delete("/api/v1/health-checks/hosts/h1")).status == 404
    await set_check(sb)
    await set_check(sb, expect_exit=3)  # replaces it
    checks = (await sb.admin.get("/api/v1/health-checks")).body["checks"]
    assert [(c["scope"], c["target"], c["expect_exit"]) for c in checks] == [
        ("host", "h1", 3)]
    assert (await sb.admin.delete("/api/v1/health-checks/hosts/h1")).status == 204
    assert (await sb.admin.get("/api/v1/health-checks")).body == {"checks": []}


@pytest_twisted.ensureDeferred
async def test_a_drained_host_starts_no_check(sb: RunningSwitchboard):
    peer = await support.host_peer(sb)
    await set_check(sb, every_jobs=1)
    job_id = await support.assigned_job(sb, peer)
    assert (await sb.admin.post("/api/v1/hosts/h1/drain")).status == 200
    await run(peer, job_id)
    await support.reaches(sb, job_id, "terminated")
    assert (await sb.store.run_due_checks()) == []
    jobs = (await sb.admin.get("/api/v1/jobs")).body["jobs"]
    assert not [j for j in jobs if j["health_check"]]
    assert "check_started" not in [e["event"] for e in (await health(sb))["events"]]


@pytest_twisted.ensureDeferred
async def test_the_history_keeps_the_newest_events(sb: RunningSwitchboard, monkeypatch):
    from treadmill.switchboard.store import health as stored

    monkeypatch.setattr(stored, "HISTORY_KEPT", 3)
    peer = await support.host_peer(sb)
    failed = [await start_failure(sb, peer) for _ in range(5)]
    events = (await health(sb))["events"]
    assert [e["job"] for e in events] == failed[:1:-1]


@pytest_twisted.ensureDeferred
async def test_a_held_failure_starts_no_check_on_its_held_host(sb: RunningSwitchboard):
    """A failure that keeps its host held (``hold_on_failure``) is counted, but the
    check it makes due does not start on the host while the user holds it."""
    peer = await support.host_peer(sb)
    await set_check(sb, expect_exit=0, every_jobs=1)
    job_id = await support.submit(sb, None, hold_on_failure=60.0)
    await peer.wait_for("start_job", job_id=job_id)
    await peer.event(job_id, "ready")
    peer.script.job, peer.script.held = None, job_id
    ack = await peer.event(job_id, "terminated", reason="workload_exited", exit_status=3,
                           held=True)
    assert ack["ok"] is True, ack
    body = await support.reaches(sb, job_id, "terminated", exit_status=3)
    assert body["held_until"] is not None
    host = (await sb.admin.get("/api/v1/hosts/h1")).body
    assert host["current_job"] == job_id
    jobs = (await sb.admin.get("/api/v1/jobs")).body["jobs"]
    assert not [j for j in jobs if j["health_check"]], jobs
    assert len(peer.of_type("start_job")) == 1
