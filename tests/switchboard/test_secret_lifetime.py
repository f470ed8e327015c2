"""Secret parameter values end with their job: read back from PostgreSQL itself.

The names of secret parameters stay (and that they were secret); the values
are replaced in the transaction that terminates the job, after the restart
policy copied them to a successor, which still receives them.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted

from tests.switchboard.support import (
    add_host,
    assigned_job,
    connected_peer,
    reaches,
    reconnect,
    submit,
)
from tests.switchboard.support import sb as sb  # the fixture: a switchboard with FAST settings

SECRET = "wipe-me-6c1f0e2d9b8a7f3e"
PARAMETERS = {"TOKEN": {"value": SECRET, "secret": True}, "PLAIN": {"value": "keep"}}
WIPED = {"TOKEN": {"value": "", "secret": True}, "PLAIN": {"value": "keep", "secret": False}}


async def stored(sb: Any, job_id: str) -> dict[str, Any]:
    """The job's parameters as PostgreSQL holds them, after checking no column has the secret."""
    row = await sb.store.pool.fetchone(
        "SELECT j.parameters, strpos(j::text, %s) AS leak FROM jobs j WHERE j.id = %s",
        (SECRET, job_id))
    events = await sb.store.pool.fetchone(
        "SELECT count(*) AS n FROM job_events e WHERE e.job_id = %s AND strpos(e::text, %s) > 0",
        (job_id, SECRET))
    assert events["n"] == 0
    if row["leak"]:
        return {"leak": True, **row["parameters"]}
    return row["parameters"]


@pytest_twisted.ensureDeferred
async def test_cancelled_queued_job_forgets_its_secrets(sb) -> None:
    job_id = await submit(sb, parameters=PARAMETERS)
    assert (await stored(sb, job_id))["leak"] is True  # Kept while it may still run.
    r = await sb.admin.post(f"/api/v1/jobs/{job_id}/terminate")
    assert r.status == 200 and r.body["state"] == "terminated"
    assert await stored(sb, job_id) == WIPED
    shown = (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body["parameters"]
    assert shown == {"TOKEN": {"secret": True}, "PLAIN": {"value": "keep", "secret": False}}


@pytest_twisted.ensureDeferred
async def test_finished_job_forgets_its_secrets(sb) -> None:
    peer = await connected_peer(sb, await add_host(sb))
    job_id = await submit(sb, parameters=PARAMETERS)
    start = (await peer.wait_for("start_job", job_id=job_id))[0]
    assert start["job"]["parameters"]["TOKEN"] == {"value": SECRET, "secret": True}
    ack = await peer.event(job_id, "terminated", reason="workload_exited", exit_status=0)
    assert ack["ok"], ack
    await reaches(sb, job_id, "terminated")
    assert await stored(sb, job_id) == WIPED


@pytest_twisted.ensureDeferred
async def test_restarted_job_hands_its_secrets_to_the_successor(sb) -> None:
    peer = await connected_peer(sb, await add_host(sb))
    job_id = await assigned_job(sb, peer, max_restarts=1, parameters=PARAMETERS)
    await peer.event(job_id, "initializing", stage="starting")
    await reaches(sb, job_id, "initializing")
    peer.script.job = None
    await reconnect(peer, None)  # The host lost the job: host_dropped_job, restartable.
    await reaches(sb, job_id, "terminated", reason="host_dropped_job")
    assert await stored(sb, job_id) == WIPED
    successor = await sb.store.pool.fetchone(
        "SELECT id FROM jobs WHERE restart_of = %s", (job_id,))
    start = (await peer.wait_for("start_job", job_id=str(successor["id"])))[0]
    assert start["job"]["parameters"] == {"TOKEN": {"value": SECRET, "secret": True},
                                          "PLAIN": {"value": "keep", "secret": False}}
    ack = await peer.event(str(successor["id"]), "terminated", reason="workload_exited",
                           exit_status=0)
    assert ack["ok"], ack
    await reaches(sb, str(successor["id"]), "terminated")
    assert await stored(sb, str(successor["id"])) == WIPED
