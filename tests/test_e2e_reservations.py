"""Reservations end to end: a real switchboard, a real supervisor (mock host) and ``tml``.

A reservation (docs/jobs.md, "Reservations") holds a host until its deadline:
queued like any job, shown in ``tml host ls`` with its holder, extended by
``manage`` only, released on cancel or at expiry.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.support import (
    final,
    job_reaches,
    mock_job,
    one_mock_host,
    run_tml,
)
from tests.util.processbed import DIGEST
from tests.util.waiting import sleep
from treadmill.supervisor.drivers.mock import RESERVATION_PARAMETER, MockSettings
from treadmill.switchboard.api import Limits
from treadmill.switchboard.jobstate import Reason, State, Status
from treadmill.switchboard.store.jobs import JobSpec

MAX_TIMEOUT = 60.0


def _time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest_twisted.async_yield_fixture
async def testbed(migrated_database: str, tmp_path: Path, request: Any):
    # Parametrized indirectly with an image: the switchboard boots it for
    # reservations that name none (jobs.reservation_image).
    image = getattr(request, "param", "")
    limits = Limits(max_timeout=MAX_TIMEOUT, default_timeout=30, reservation_image=image)
    async with one_mock_host(migrated_database, tmp_path, limits=limits) as sb:
        yield sb


@pytest_twisted.ensureDeferred
async def test_reservation_holds_shows_extends_and_expires(testbed: Any) -> None:
    alice = await testbed.user("alice")
    bob = await testbed.user("bob")
    await testbed.admin.post("/api/v1/hosts/mock-1/grants", {"user": "*", "privilege": "read"})
    code, out = await run_tml(testbed.url, alice.token, "host", "reserve", "--image", DIGEST,
                              "--tag", "mock", "--for", "3")
    assert code == 0, out
    assert "ready on mock-1" in out and "tml job cancel" in out and "tml job ssh" in out
    assert "\\x0a" not in out and any(line.startswith("  get in:  tml job ssh ")
                                       for line in out.splitlines()), out
    job = (await alice.get("/api/v1/jobs?state=ready")).body["jobs"][0]
    job_id = job["id"]
    assert job["reservation"] is True and job["deadline"] is not None
    # The mock workload (run_time 0.2 s on this host) does not end a reservation.
    await sleep(0.6)
    assert (await alice.get(f"/api/v1/jobs/{job_id}")).body["state"] == "ready"

    # tml host ls: the holder and the deadline, for readers of the job only.
    code, out = await run_tml(testbed.url, alice.token, "host", "ls")
    assert code == 0 and "alice" in out and job_id in out, out
    host = (await alice.get("/api/v1/hosts/mock-1")).body
    assert host["held_by"] == "alice" and _time(host["held_until"]) == _time(job["deadline"])
    other = (await bob.get("/api/v1/hosts/mock-1")).body
    assert (other["current_job"], other["held_by"], other["held_until"]) == (None, None, None)

    # Extending needs manage: bob (read) is refused, not told more than a reader.
    await alice.post(f"/api/v1/jobs/{job_id}/grants", {"user": "bob", "privilege": "read"})
    assert (await bob.get("/api/v1/hosts/mock-1")).body["held_by"] == "alice"
    r = await bob.post(f"/api/v1/jobs/{job_id}/extend", {"by": 5})
    assert r.status == 403, r.body
    # Bounded by jobs.max_timeout from now; bad bodies are 400.
    r = await alice.post(f"/api/v1/jobs/{job_id}/extend", {"by": MAX_TIMEOUT + 1})
    assert r.status == 400 and "at most" in r.body["error"]["message"], r.body
    for body in ({"by": 0}, {"by": -1}, {"by": "5"}, {}, {"by": 5, "x": 1}):
        r = await alice.post(f"/api/v1/jobs/{job_id}/extend", body)
        assert r.status == 400, (body, r.body)
    before = (await alice.get(f"/api/v1/jobs/{job_id}")).body["deadline"]
    code, out = await run_tml(testbed.url, alice.token, "job", "extend", job_id[:8], "2")
    assert code == 0, out
    after = (await alice.get(f"/api/v1/jobs/{job_id}")).body
    assert _time(after["deadline"]) - _time(before) == 2
    assert after["timeout"] == 5
    code, out = await run_tml(testbed.url, alice.token, "host", "reserve", "--extend", job_id, "1")
    assert code == 0 and "until" in out, out
    after = (await alice.get(f"/api/v1/jobs/{job_id}")).body
    assert _time(after["deadline"]) - _time(before) == 3

    # Expiry: the reservation ends at its deadline, and the host is free again.
    end = await final(alice, job_id, timeout=15)
    assert end["termination"]["reason"] == "execution_timeout"
    events = (await alice.get(f"/api/v1/jobs/{job_id}/events")).body["events"]
    stopping = [e for e in events if e["state"] == "terminating"]
    assert stopping[0]["message"] == "reservation expired", events
    assert _time(end["terminated_at"]) >= _time(after["deadline"])
    r = await alice.post(f"/api/v1/jobs/{job_id}/extend", {"by": 5})
    assert r.status == 409, r.body
    host = (await alice.get("/api/v1/hosts/mock-1")).body
    assert (host["current_job"], host["held_by"], host["held_until"]) == (None, None, None)
    r = await alice.post("/api/v1/jobs", {"image": DIGEST, "tags": ["mock"]})
    assert r.status == 201, r.body
    nxt = r.body["id"]
    assert (await final(alice, nxt))["termination"]["reason"] == "workload_exited"


@pytest_twisted.ensureDeferred
async def test_reservation_is_queued_like_a_job_and_released_on_cancel(testbed: Any) -> None:
    alice = await testbed.user("alice")
    # The host is busy: the reservation waits in the queue.
    busy = (await testbed.admin.post("/api/v1/jobs", {
        "image": DIGEST, "tags": ["mock"],
        "parameters": {"mock.run_time": {"value": "inf"}}})).body["id"]
    await job_reaches(testbed.admin, busy, "ready")
    code, out = await run_tml(testbed.url, alice.token, "host", "reserve", "--image", DIGEST,
                              "--tag", "mock", "--for", "20", "--no-wait")
    assert code == 0 and "queued" in out, out
    job_id = (await alice.get("/api/v1/jobs")).body["jobs"][0]["id"]
    await sleep(0.5)
    assert (await alice.get(f"/api/v1/jobs/{job_id}")).body["state"] == "queued"
    # Extending a queued reservation lengthens its timeout.
    r = await alice.post(f"/api/v1/jobs/{job_id}/extend", {"by": 10})
    assert r.status == 200 and r.body["timeout"] == 30 and r.body["deadline"] is None, r.body
    await testbed.admin.post(f"/api/v1/jobs/{busy}/terminate")
    await job_reaches(alice, job_id, "ready")
    job = (await alice.get(f"/api/v1/jobs/{job_id}")).body
    assert 29.5 <= _time(job["deadline"]) - _time(job["assigned_at"]) <= 30.5
    # tml job cancel releases it at once.
    code, out = await run_tml(testbed.url, alice.token, "job", "cancel", job_id)
    assert code == 0, out
    end = await final(alice, job_id, timeout=10)
    assert end["termination"]["reason"] == "user_terminated"
    nxt = await mock_job(alice, DIGEST)
    assert (await final(alice, nxt))["termination"]["reason"] == "workload_exited"


@pytest_twisted.ensureDeferred
async def test_reservation_parameter_is_reserved_and_ordinary_jobs_unchanged(
        testbed: Any) -> None:
    alice = await testbed.user("alice")
    r = await alice.post("/api/v1/jobs", {
        "image": DIGEST, "tags": ["mock"],
        "parameters": {RESERVATION_PARAMETER: {"value": "true"}}})
    assert r.status == 400 and RESERVATION_PARAMETER in r.body["error"]["message"], r.body
    r = await alice.post("/api/v1/jobs", {"image": DIGEST, "reservation": "yes"})
    assert r.status == 400, r.body
    code, out = await run_tml(testbed.url, alice.token, "host", "reserve", "--for", "5")
    assert code != 0 and "image: required" in out and "reservation_image" in out, out
    # An ordinary job is no reservation: its workload's exit ends it.
    job = (await alice.post("/api/v1/jobs", {"image": DIGEST, "tags": ["mock"]})).body
    assert job["reservation"] is False
    assert (await final(alice, job["id"]))["termination"]["reason"] == "workload_exited"


@pytest.mark.parametrize("testbed", [DIGEST], indirect=True)
@pytest_twisted.ensureDeferred
async def test_a_reservation_without_an_image_boots_the_switchboards(testbed: Any) -> None:
    alice = await testbed.user("alice")
    code, out = await run_tml(testbed.url, alice.token, "host", "reserve", "--tag", "mock",
                          "--for", "20")
    assert code == 0 and "ready on mock-1" in out and "tml job cancel" in out, out
    job = (await alice.get("/api/v1/jobs?state=ready")).body["jobs"][0]
    assert job["reservation"] is True and job["image"]["digest"] == DIGEST
    # An ordinary job still names its image.
    r = await alice.post("/api/v1/jobs", {"tags": ["mock"]})
    assert r.status == 400 and r.body["error"]["message"] == "image: required", r.body
    code, out = await run_tml(testbed.url, alice.token, "job", "cancel", job["id"])
    assert code == 0, out
    assert (await final(alice, job["id"]))["termination"]["reason"] == "user_terminated"


@pytest_twisted.ensureDeferred
async def test_a_restarted_reservation_is_a_reservation(testbed: Any) -> None:
    store = testbed.store
    owner = await store.user_id("admin")
    job = await store.enqueue(owner, JobSpec(
        image_name=None, image_digest=DIGEST, image_stores=[], tags=["nowhere"],
        parameters={}, timeout=20, queue_timeout=60, max_restarts=1, label="",
        reservation=True))
    await store.transition(job["id"], Status(State.ASSIGNED))
    await store.transition(job["id"], Status(State.TERMINATED,
                                             reason=Reason.HOST_DROPPED_JOB))
    jobs = (await testbed.admin.get(f"/api/v1/jobs?restart_of={job['id']}")).body["jobs"]
    assert [j["reservation"] for j in jobs] == [True]


def test_mock_driver_holds_a_reservation() -> None:
    settings = MockSettings(run_time=0.2)
    held = settings.with_parameters({RESERVATION_PARAMETER: {"value": "true"}})
    assert held.run_time == float("inf")
    assert settings.with_parameters({RESERVATION_PARAMETER: {"value": "false"}}).run_time == 0.2
