"""Host health end to end through real daemons (switchboard, supervisor with a mock
host, ``tml``): a user's bad image does not spoil the host; the operator's failing
health check takes it out, ``tml host health`` says why, and a queued job says what
it waits for (``docs/operations.md``, "Host health")."""

from __future__ import annotations

import json

import pytest_twisted

from tests import test_e2e_jobs
from tests.support import final, run_tml
from tests.util.waiting import eventually

testbed = test_e2e_jobs.testbed
"""A switchboard and the supervisor of mock host mock-1 (tags: mock), in process."""

GOOD = "sha256:" + "a" * 64
BAD = "sha256:" + "b" * 64
CHECK = "sha256:" + "c" * 64


async def submit(url: str, token: str, *argv: str) -> str:
    code, out = await run_tml(url, token, "--json", "job", "submit", *argv)
    assert code == 0, out
    return first_json(out)["id"]


def first_json(out: str) -> dict:
    """The JSON document ``tml --json`` printed (before any warning on stderr)."""
    return json.JSONDecoder().raw_decode(out)[0]


@pytest_twisted.ensureDeferred
async def test_bad_images_do_not_spoil_the_host_but_a_failing_check_does(testbed) -> None:
    sb = testbed
    await sb.admin.post("/api/v1/hosts/mock-1/grants", {"user": "*", "privilege": "read"})
    alice = await sb.user("alice")
    # A user's image that never starts (no agent: the host reports host_start_failure),
    # more times than hosts.max_failures.
    for _ in range(4):
        job_id = await submit(sb.url, alice.token, BAD, "--tag", "mock",
                              "--param", "mock.fail_at=booting")
        assert (await final(sb.admin, job_id))["termination"]["reason"] == "host_start_failure"
    code, out = await run_tml(sb.url, alice.token, "host", "health", "mock-1")
    assert code == 0, out
    assert "healthy: yes" in " ".join(out.split())
    assert out.count("not_counted") == 4
    good = await submit(sb.url, alice.token, GOOD, "--tag", "mock")
    assert (await final(sb.admin, good))["termination"]["exit_status"] == 0

    # The operator's check, after every job: its workload exits 1 where 0 passes.
    code, out = await run_tml(sb.url, sb.admin_token, "host", "health-check", "set", "mock-1",
                              "--image", CHECK, "--expect-exit", "0", "--every-jobs", "1",
                              "--param", "mock.exit_status=1")
    assert code == 0, out
    assert "expect exit 0" in out and "every 1 jobs" in out
    good = await submit(sb.url, alice.token, GOOD, "--tag", "mock")
    await final(sb.admin, good)

    async def out_of_service() -> bool:
        return (await sb.admin.get("/api/v1/hosts/mock-1")).body["healthy"] is False

    await eventually(out_of_service)
    code, out = await run_tml(sb.url, alice.token, "host", "health", "mock-1")
    assert code == 0, out
    assert "check_failed" in out and "exit status 1" in out
    assert "expected exit status 0" in out
    assert "check_started" in out and "every 1 jobs" in out

    # A job queued for it says why it waits.
    waiting = await submit(sb.url, alice.token, GOOD, "--tag", "mock")

    async def says_why() -> str | None:
        # The leader's health pass (every hosts.health_interval seconds), run now.
        await sb.service.getServiceNamed("health").run()
        return (await sb.admin.get(f"/api/v1/jobs/{waiting}")).body["state_message"]

    message = await eventually(says_why)
    assert message == "waiting: every host that could run it is out of service: " \
                      "mock-1 (unhealthy)"
    code, out = await run_tml(sb.url, alice.token, "job", "show", waiting)
    assert "mock-1 (unhealthy)" in out

    # The operator removes the check and puts the host back: the job runs.
    code, out = await run_tml(sb.url, sb.admin_token, "--json", "host", "health-check", "unset",
                              "mock-1")
    assert code == 0, out
    # What it did, as for every 204 (docs/cli.md, "JSON output"); it printed nothing.
    assert first_json(out) == {"deleted": {"scope": "host", "target": "mock-1"}}
    code, out = await run_tml(sb.url, sb.admin_token, "host", "health-check", "unset", "mock-1")
    assert code == 1 and "no health check for host 'mock-1'" in out, out
    code, out = await run_tml(sb.url, sb.admin_token, "host", "enable", "mock-1")
    assert code == 0, out
    assert (await final(sb.admin, waiting))["termination"]["exit_status"] == 0
    code, out = await run_tml(sb.url, sb.admin_token, "--json", "host", "health", "mock-1")
    events = [e["event"] for e in first_json(out)["events"]]
    assert events[0] == "enabled" and "check_failed" in events
