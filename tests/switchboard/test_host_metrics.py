"""``treadmill_hosts{state="busy"}`` counts the hosts the scheduler skips: those running
a job and those held for a failed one (``hold_on_failure``), scraped from a real
switchboard's registry."""

from __future__ import annotations

import pytest_twisted
from prometheus_client import generate_latest

from tests.support import RunningSwitchboard

DIGEST = "sha256:" + "7" * 64


async def _busy(sb: RunningSwitchboard) -> str:
    await sb.service._count_jobs()
    text = generate_latest(sb.service.metrics.registry).decode()
    (line,) = [line for line in text.splitlines()
               if line.startswith('treadmill_hosts{state="busy"}')]
    return line.split()[-1]


@pytest_twisted.ensureDeferred
async def test_a_held_host_is_busy(switchboard: RunningSwitchboard) -> None:
    sb = switchboard
    for name in ("held-1", "idle-1"):
        assert (await sb.admin.post("/api/v1/hosts", {"name": name})).status == 201
    r = await sb.admin.post("/api/v1/jobs", {"image": DIGEST, "tags": ["nowhere"]})
    assert r.status == 201, r.body
    assert await _busy(sb) == "0.0"
    # The job failed on held-1 and its host is held (as the supervisor's hold leaves it).
    await sb.store.pool.execute(
        "UPDATE jobs SET host_id = (SELECT id FROM hosts WHERE name = 'held-1'), "
        "state = 'terminated', termination_reason = 'workload_exited', exit_status = 1, "
        "terminated_at = now(), held_until = now() + interval '1 hour' WHERE id = %s",
        (r.body["id"],))
    assert await _busy(sb) == "1.0"
    await sb.store.pool.execute("UPDATE jobs SET held_until = NULL WHERE id = %s",
                                (r.body["id"],))
    assert await _busy(sb) == "0.0"
