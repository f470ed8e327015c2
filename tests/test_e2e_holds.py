"""Holding a failed job's host end to end: a switchboard and a mock supervisor as
``twistd`` processes, driven by ``tml`` (docs/jobs.md, "Holding a failed job's host").

A job run with ``--hold-on-failure`` fails; its host stays held (another job
waits, ``tml host ls`` shows the hold), survives a switchboard restart, and is
released by ``tml job cancel``, after which the waiting job runs.
"""

from __future__ import annotations

import signal

import pytest_twisted

from tests.support import final, run_tml
from tests.util.processbed import DIGEST, Bed
from tests.util.processbed import bed as bed  # the fixture: both daemons, no tracebacks
from tests.util.waiting import eventually, sleep


@pytest_twisted.ensureDeferred
async def test_a_failed_job_keeps_its_host_until_cancelled(bed: Bed) -> None:
    admin = bed.admin
    assert admin is not None
    token = admin.token
    code, out = await run_tml(bed.url, token, "job", "run", DIGEST, "--tag", "mock",
                              "--no-console", "--param", "mock.exit_status=3",
                              "--hold-on-failure", "30m")
    assert code == 4, out
    assert "held for debugging until" in out and "mock-1" in out, out
    held = (await admin.get("/api/v1/jobs?state=terminated")).body["jobs"][0]
    job_id = held["id"]
    assert f"tml job cancel {job_id}" in out and f"tml job ssh {job_id}" in out, out
    assert held["hold_on_failure"] == 1800 and held["held_until"] is not None

    # The host is held: a second job waits; tml host ls shows the hold.
    code, out = await run_tml(bed.url, token, "job", "submit", DIGEST, "--tag", "mock")
    assert code == 0, out
    waiting = out.split()[0]
    code, out = await run_tml(bed.url, token, "host", "ls")
    assert code == 0 and job_id in out and "root" in out, out
    host = (await admin.get("/api/v1/hosts/mock-1")).body
    assert (host["current_job"], host["held_by"]) == (job_id, "root")
    assert host["held_until"] == held["held_until"]

    # A switchboard restart keeps it: the supervisor's status still names the hold.
    assert await bed.switchboard.signal(signal.SIGKILL) != 0
    bed.switchboard.start()
    await bed.switchboard.wait_http(f"{bed.url}/healthz")

    async def reconnected() -> bool:
        return (await admin.get("/api/v1/hosts/mock-1")).body["connected"]

    await eventually(reconnected, timeout=30)
    await sleep(1.5)  # reconciled; three scheduling passes
    r = await admin.get(f"/api/v1/jobs/{waiting}")
    assert r.body.get("state") == "queued", (waiting, r.body)
    assert (await admin.get(f"/api/v1/jobs/{job_id}")).body["held_until"] == held["held_until"]

    # tml job cancel releases the host; the waiting job then runs.
    code, out = await run_tml(bed.url, token, "job", "cancel", job_id[:8])
    assert code == 0 and "releasing its held host" in out, out
    end = await final(admin, waiting)
    assert end["termination"]["reason"] == "workload_exited"
    released = (await admin.get(f"/api/v1/jobs/{job_id}")).body
    assert released["held_until"] is None
    assert released["termination"]["exit_status"] == 3
    code, out = await run_tml(bed.url, token, "host", "ls")
    assert code == 0 and job_id not in out, out
