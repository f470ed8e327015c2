"""Jobs end to end through real daemons: switchboard, supervisor (mock host), tml.

The switchboard and supervisors run as ``twistd`` processes where a test
kills them; otherwise in this process, which is faster and equally real
(same services, real sockets, real PostgreSQL).
"""

from __future__ import annotations

import signal
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
from tests.util.processbed import DIGEST, Bed
from tests.util.processbed import bed as bed  # the fixture: both daemons, no tracebacks

# -- in process -----------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def testbed(migrated_database: str, tmp_path: Path):
    async with one_mock_host(migrated_database, tmp_path) as sb:
        yield sb


def mock(**settings: Any) -> dict[str, dict[str, Any]]:
    return {f"mock.{k}": {"value": str(v)} for k, v in settings.items()}


@pytest_twisted.ensureDeferred
async def test_submit_follow_shows_the_job_to_its_exit(testbed: Any) -> None:
    code, out = await run_tml(testbed.url, testbed.admin_token, "job", "submit", DIGEST,
                              "--tag", "mock", "--param", "mock.exit_status=0", "--follow")
    assert code == 0, out
    for state in ("queued", "assigned", "initializing", "ready", "terminated"):
        assert state in out
    code, out = await run_tml(testbed.url, testbed.admin_token, "job", "submit", DIGEST,
                              "--tag", "mock", "--param", "mock.exit_status=7", "--follow")
    assert code == 4, out  # The workload exited non-zero.
    code, out = await run_tml(testbed.url, testbed.admin_token, "host", "ls")
    assert code == 0 and "mock-1" in out and "yes" in out


@pytest.mark.parametrize("where", ["queued", "assigned", "initializing", "ready"])
@pytest_twisted.ensureDeferred
async def test_cancel_in_every_state(testbed: Any, where: str) -> None:
    admin = testbed.admin
    if where == "queued":
        body = {"image": DIGEST, "tags": ["nowhere"]}
    elif where in ("assigned", "initializing"):
        body = {"image": DIGEST, "tags": ["mock"], "parameters": mock(**{
            "stages.starting": 30})}
    else:
        body = {"image": DIGEST, "tags": ["mock"], "parameters": mock(run_time=60)}
    job_id = (await admin.post("/api/v1/jobs", body)).body["id"]
    if where != "queued":
        await job_reaches(admin, job_id, "initializing" if where != "ready" else "ready")
    r = await admin.post(f"/api/v1/jobs/{job_id}/terminate")
    assert r.status == 200
    end = await final(admin, job_id)
    assert end["termination"]["reason"] == "user_terminated"
    # The host is free again.
    nxt = await mock_job(admin, DIGEST)
    assert (await final(admin, nxt))["termination"]["reason"] == "workload_exited"


@pytest_twisted.ensureDeferred
async def test_execution_timeout_stops_the_mock_host(testbed: Any) -> None:
    admin = testbed.admin
    job_id = (await admin.post("/api/v1/jobs", {
        "image": DIGEST, "tags": ["mock"], "timeout": 1,
        "parameters": mock(run_time="inf")})).body["id"]
    end = await final(admin, job_id)
    assert end["termination"]["reason"] == "execution_timeout"


@pytest_twisted.ensureDeferred
async def test_host_start_failure_and_image_error(testbed: Any) -> None:
    admin = testbed.admin
    failing = (await admin.post("/api/v1/jobs", {
        "image": DIGEST, "tags": ["mock"],
        "parameters": mock(fail_at="provisioning")})).body["id"]
    assert (await final(admin, failing))["termination"]["reason"] == "host_start_failure"
    bad_image = (await admin.post("/api/v1/jobs", {
        "image": DIGEST, "tags": ["mock"],
        "parameters": mock(fail_at="fetching_image")})).body["id"]
    assert (await final(admin, bad_image))["termination"]["reason"] == "image_error"
    host = (await admin.get("/api/v1/hosts/mock-1")).body
    # Neither is the host's fault: the image has never become ready anywhere (so its
    # start failure is the job's), and image errors are the image's.
    assert host["consecutive_failures"] == 0 and host["healthy"] is True


# -- real processes, killed ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_switchboard_killed_mid_job(bed: Bed) -> None:
    admin = bed.admin
    assert admin is not None
    job_id = (await admin.post("/api/v1/jobs", {
        "image": DIGEST, "tags": ["mock"], "parameters": mock(run_time=3)})).body["id"]
    await job_reaches(admin, job_id, "ready")
    assert await bed.switchboard.signal(signal.SIGKILL) != 0
    bed.switchboard.start()  # The supervisor reconnects; its journal fills any gap.
    await bed.switchboard.wait_http(f"{bed.url}/healthz")
    end = await final(admin, job_id)
    assert end["termination"] == {"reason": "workload_exited", "exit_status": 0,
                                  "message": "mock workload finished"}
    events = (await admin.get(f"/api/v1/jobs/{job_id}/events")).body["events"]
    states = [e["state"] for e in events]
    assert states[0] == "queued" and states[-1] == "terminated"
    assert states.count("terminated") == 1 and states.count("ready") == 1
    # Work goes on: the next job runs.
    nxt = await mock_job(admin, DIGEST)
    assert (await final(admin, nxt))["termination"]["reason"] == "workload_exited"


@pytest_twisted.ensureDeferred
async def test_supervisor_killed_mid_job(bed: Bed) -> None:
    admin = bed.admin
    assert admin is not None and bed.supervisor is not None
    job_id = (await admin.post("/api/v1/jobs", {
        "image": DIGEST, "tags": ["mock"], "max_restarts": 1,
        "parameters": mock(run_time=60)})).body["id"]
    await job_reaches(admin, job_id, "ready")
    assert await bed.supervisor.signal(signal.SIGKILL) != 0
    bed.supervisor.start()
    # The restarted supervisor cannot re-adopt an in-process mock job and says so.
    end = await final(admin, job_id)
    assert end["termination"]["reason"] == "host_dropped_job"
    jobs = (await admin.get("/api/v1/jobs")).body["jobs"]
    successor = [j for j in jobs if j["restart_of"] == job_id]
    assert len(successor) == 1
    # The successor runs; nothing is lost or run twice.
    await job_reaches(admin, successor[0]["id"], "ready")
    await admin.post(f"/api/v1/jobs/{successor[0]['id']}/terminate")
    assert (await final(admin, successor[0]["id"]))["termination"]["reason"] == \
        "user_terminated"
    everything = (await admin.get("/api/v1/jobs")).body["jobs"]
    assert len(everything) == 2
