"""Holding a failed job's host end to end: a switchboard and a mock supervisor as
``twistd`` processes, driven by ``tml`` (docs/jobs.md, "Holding a failed job's host").

A job run with ``--hold-on-failure`` fails; its host stays held (another job
waits, ``tml host ls`` shows the hold), survives a switchboard restart, and is
released by ``tml job cancel``, after which the waiting job runs. With a log server
(``logged_bed``): the held host's console goes on into the job's log, and a
supervisor killed (SIGKILL) during the hold loses none of what it had shipped or
spooled; the restart ends the (mock) hold and closes the logs, complete.
"""

from __future__ import annotations

import json
import re
import signal

import pytest_twisted

from tests.support import final, run_tml
from tests.util.processbed import DIGEST, Bed
from tests.util.processbed import bed as bed  # the fixture: both daemons, no tracebacks
from tests.util.processbed import logged_bed as logged_bed  # and a log server
from tests.util.waiting import eventually, sleep
from treadmill.protocol.logs import HOLD_MARKER


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


def mock_lines(console: str) -> list[int]:
    """The numbers of the mock console's lines, the hold's marker lines taken out."""
    text = re.sub(r"\r\n\[treadmill: [^]]*\]\r\n", "", console)
    return [int(n) for n in re.findall(r"mock console \w+ line (\d{8})", text)]


@pytest_twisted.ensureDeferred
async def test_a_killed_supervisor_loses_nothing_of_a_held_hosts_console(
        logged_bed: Bed) -> None:
    bed = logged_bed
    admin = bed.admin
    assert admin is not None and bed.supervisor is not None
    code, out = await run_tml(bed.url, admin.token, "job", "submit", DIGEST, "--tag", "mock",
                              "--param", "mock.exit_status=3", "--hold-on-failure", "30m")
    assert code == 0, out
    job_id = out.split()[0]

    async def held() -> bool:
        return (await admin.get(f"/api/v1/jobs/{job_id}")).body["held_until"] is not None

    await eventually(held, timeout=30)

    async def held_console() -> str | None:
        code, out = await run_tml(bed.url, admin.token, "job", "logs", job_id)
        marker = HOLD_MARKER.decode()
        return out if code == 0 and marker in out and \
            out.split(marker, 1)[1].count("mock console") > 20 else None

    shipped = await eventually(held_console, timeout=30)
    assert await bed.supervisor.signal(signal.SIGKILL) != 0  # kill -9 during the hold
    bed.supervisor.start()  # the mock host died with it: the restart ends the hold

    async def released() -> bool:
        return (await admin.get(f"/api/v1/jobs/{job_id}")).body["held_until"] is None

    await eventually(released, timeout=30)
    code, final = await run_tml(bed.url, admin.token, "job", "logs", job_id, "--follow")
    assert code == 0, final  # it ends: the stream was closed
    assert final.startswith(shipped)  # nothing shipped before the kill was lost
    assert final.endswith("[treadmill: the hold is over: the supervisor restarted and "
                          "could not re-adopt the held host]\r\n")
    numbers = mock_lines(final)
    assert numbers == list(range(1, len(numbers) + 1))  # no hole, no repeat
    code, out = await run_tml(bed.url, admin.token, "job", "logs", job_id, "--stream",
                              "events")
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-3]["state"] == "terminated" and lines[-3]["held"] is True
    assert [(line.get("hold"), line.get("reason")) for line in lines[-2:]] == [
        ("started", None), ("ended", "supervisor_restarted")]
