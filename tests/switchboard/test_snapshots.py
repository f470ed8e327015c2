"""Snapshots: the API, the snapshot_job/snapshot_result exchange, and the host's push grant."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest_twisted
import treq

from tests.support import RunningSwitchboard, start_switchboard
from tests.switchboard.peer import Peer
from tests.switchboard.support import (
    FAST,
    add_host,
    assigned_job,
    connected_peer,
    host_peer,
    reaches,
    reconnect,
)
from tests.util.waiting import eventually
from treadmill.protocol import supervisor as protocol

STORE = "http://store.example:5000"
NEW = "sha256:" + "d" * 64


@pytest_twisted.async_yield_fixture
async def sb(migrated_database: str, tmp_path: Path):
    running = await start_switchboard(migrated_database, tmp_path, **FAST)
    await running.register_store(STORE, "store")
    try:
        yield running
    finally:
        await running.stop()


async def ended_job(sb: RunningSwitchboard, peer: Peer) -> str:
    job_id = await assigned_job(sb, peer)
    await peer.event(job_id, "terminated", reason="workload_exited", exit_status=0)
    peer.script.job = None
    await reaches(sb, job_id, "terminated")
    return job_id


async def granted(sb: RunningSwitchboard, host_token: str, scope: str) -> list[dict[str, Any]]:
    """The access a host token gets for ``scope`` from the registry token endpoint."""
    basic = base64.b64encode(f"host:{host_token}".encode()).decode()
    response = await treq.get(f"{sb.url}/api/v1/registry/token",
                              params={"service": "store", "scope": scope},
                              headers={"Authorization": f"Basic {basic}"})
    body = json.loads(await response.content())
    payload = body["token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims.get("access", [])


@pytest_twisted.ensureDeferred
async def test_a_snapshot_is_made_by_the_host_and_registered(sb: RunningSwitchboard) -> None:
    token = await add_host(sb)
    peer = await connected_peer(sb, token)
    job_id = await ended_job(sb, peer)
    scope = "repository:admin/snap:pull,push"
    assert await granted(sb, token, scope) == []

    r = await sb.admin.post(f"/api/v1/jobs/{job_id}/snapshots",
                            {"name": "admin/Snap", "store": STORE, "description": "d"})
    assert r.status == 202, r.body
    snapshot = r.body
    assert snapshot["state"] == "pending" and snapshot["repository"] == "admin/snap"
    [command] = await peer.wait_for("snapshot_job")
    assert command["snapshot_id"] == snapshot["id"] and command["job_id"] == job_id
    assert command["repository"] == "admin/snap" and command["store"] == STORE
    [access] = await granted(sb, token, scope)
    assert sorted(access["actions"]) == ["pull", "push"] and access["name"] == "admin/snap"

    ack = await peer.report(protocol.snapshot_result(0, snapshot["id"], job_id, digest=NEW))
    assert ack["ok"] is True
    r = await sb.admin.get(f"/api/v1/jobs/{job_id}/snapshots/{snapshot['id']}")
    assert r.body["state"] == "done" and r.body["digest"] == NEW and r.body["error"] is None
    image = (await sb.admin.get("/api/v1/images/admin/Snap")).body
    assert image["digest"] == NEW and image["stores"] == [STORE]
    assert image["owner"] == "admin" and image["description"] == "d"
    assert await granted(sb, token, scope) == []  # no longer pending
    # A repeated result changes nothing and is acked.
    again = await peer.report(protocol.snapshot_result(0, snapshot["id"], job_id,
                                                       error=("failed", "late")))
    assert again["ok"] is True
    listed = (await sb.admin.get(f"/api/v1/jobs/{job_id}/snapshots")).body["snapshots"]
    assert [s["state"] for s in listed] == ["done"]


@pytest_twisted.ensureDeferred
async def test_failures_refusals_and_resending(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    job_id = await ended_job(sb, peer)
    # The host says it cannot: the snapshot fails at once.
    peer.script.snapshot_error = ("not_supported", "the mock driver cannot make snapshots")
    r = await sb.admin.post(f"/api/v1/jobs/{job_id}/snapshots", {"name": "a1", "store": STORE})
    sid = r.body["id"]

    async def state_of(snapshot_id: str) -> str:
        return (await sb.admin.get(f"/api/v1/jobs/{job_id}/snapshots/{snapshot_id}")).body

    failed = await eventually(lambda: _when(state_of(sid), "failed"))
    assert failed["error"] == {"code": "not_supported",
                               "message": "the mock driver cannot make snapshots"}
    # A pending snapshot is sent again after a reconnect, then fails by result.
    peer.script.snapshot_error = None
    peer.disconnect()
    await peer.closed()
    r = await sb.admin.post(f"/api/v1/jobs/{job_id}/snapshots", {"name": "a2", "store": STORE})
    assert r.status == 202
    sid = r.body["id"]
    await reconnect(peer, None)
    await peer.wait_for("snapshot_job", snapshot_id=sid)
    await peer.report(protocol.snapshot_result(0, sid, job_id,
                                               error=("unknown_job", "the disk is gone")))
    failed = await eventually(lambda: _when(state_of(sid), "failed"))
    assert failed["error"]["code"] == "unknown_job"
    # Another host cannot report on it.
    other = await connected_peer(sb, await add_host(sb, "h2", ("u",)))
    r = await sb.admin.post(f"/api/v1/jobs/{job_id}/snapshots", {"name": "a3", "store": STORE})
    ack = await other.report(protocol.snapshot_result(0, r.body["id"], job_id, digest=NEW))
    assert ack["ok"] is False and ack["error"]["code"] == "not_your_job"


async def _when(pending: Any, state: str) -> Any:
    body = await pending
    return body if body["state"] == state else None


@pytest_twisted.ensureDeferred
async def test_requests_that_cannot_be_snapshots(sb: RunningSwitchboard) -> None:
    peer = await host_peer(sb)
    running = await assigned_job(sb, peer)
    r = await sb.admin.post(f"/api/v1/jobs/{running}/snapshots", {"name": "x", "store": STORE})
    assert r.status == 409 and "has not ended" in r.body["error"]["message"]
    await peer.event(running, "terminated", reason="workload_exited", exit_status=0)
    peer.script.job = None
    await reaches(sb, running, "terminated")
    r = await sb.admin.post(f"/api/v1/jobs/{running}/snapshots", {"name": "x"})
    assert r.status == 400 and "store" in r.body["error"]["message"]  # digest jobs list no store
    await sb.admin.post("/api/v1/images", {"name": "taken", "digest": NEW, "stores": [STORE]})
    r = await sb.admin.post(f"/api/v1/jobs/{running}/snapshots",
                            {"name": "TAKEN", "store": STORE})
    assert r.status == 409
    r = await sb.admin.post(f"/api/v1/jobs/{running}/snapshots", {"name": "y", "store": STORE})
    assert r.status == 202
    r = await sb.admin.post(f"/api/v1/jobs/{running}/snapshots", {"name": "y", "store": STORE})
    assert r.status == 409 and "under way" in r.body["error"]["message"]
    # A user may not snapshot into another user's namespace, nor someone else's job.
    alice = await sb.user("alice")
    await sb.user("bob")
    job_id = (await alice.post("/api/v1/jobs", {"image": NEW, "tags": ["t"]})).body["id"]
    await peer.wait_for("start_job", job_id=job_id)
    await peer.event(job_id, "terminated", reason="workload_exited", exit_status=0)
    peer.script.job = None
    await reaches(sb, job_id, "terminated")
    r = await alice.post(f"/api/v1/jobs/{job_id}/snapshots", {"name": "bob/x", "store": STORE})
    assert r.status == 403
    r = await alice.post(f"/api/v1/jobs/{job_id}/snapshots",
                         {"name": "alice/x", "store": STORE})
    assert r.status == 202
    carol = await sb.user("carol")
    r = await carol.post(f"/api/v1/jobs/{job_id}/snapshots", {"name": "carol/x", "store": STORE})
    assert r.status == 404
    # Stopping a job is not copying its disk: that takes manage.
    await alice.post(f"/api/v1/jobs/{job_id}/grants", {"user": "carol", "privilege": "stop"})
    r = await carol.post(f"/api/v1/jobs/{job_id}/snapshots", {"name": "carol/x", "store": STORE})
    assert r.status == 403
    await alice.post(f"/api/v1/jobs/{job_id}/grants", {"user": "carol", "privilege": "manage"})
    r = await carol.post(f"/api/v1/jobs/{job_id}/snapshots", {"name": "carol/x", "store": STORE})
    assert r.status == 202 and r.body["owner"] == "carol"
