"""Console connections in the audit log: ``console_event`` (protocol minor 7) from a
scripted supervisor to a real switchboard and PostgreSQL.

A host records console connections only for its own job (active, held or just ended), a
token bucket per host bounds the rows, an older link cannot send them at all, and the
records read with the job's authorisation (``GET /api/v1/audit``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from tests.support import RunningSwitchboard, add_host, job_reaches, start_switchboard
from tests.switchboard.peer import Peer, Script
from treadmill.common.ratelimit import RateLimiter
from treadmill.protocol import supervisor as protocol

DIGEST = "sha256:" + "c" * 64


@pytest_twisted.async_yield_fixture
async def sb(migrated_database: str, tmp_path: Path) -> AsyncIterator[RunningSwitchboard]:
    running = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2)
    try:
        yield running
    finally:
        await running.stop()


def opened(job_id: str, user: str = "alice", event: str = "opened",
           **more: Any) -> dict[str, Any]:
    fields = {"event": event, "conn_id": "k" * 22, "service": "console",
              "proxy": "ws://proxy.example:8200", "user": user, "jti": "t" * 22,
              "access": "manage", "peer": "198.51.100.9", "at": 1765000000.25, **more}
    return protocol.console_event(0, job_id, **fields)


async def peer_for(sb: RunningSwitchboard, name: str, tags: list[str],
                   minor: int = protocol.MINOR) -> Peer:
    peer = Peer(sb.url, await add_host(sb.admin, name, tags), Script(), minor=minor)
    await peer.connect()
    await peer.wait_for("status_request")
    return peer


async def running_job(sb: RunningSwitchboard, owner: Any, peer: Peer, tag: str) -> str:
    r = await owner.post("/api/v1/jobs", {"image": DIGEST, "tags": [tag]})
    assert r.status == 201, r.body
    job_id = r.body["id"]
    await peer.wait_for("start_job", job_id=job_id)
    await job_reaches(sb.admin, job_id, "assigned")
    return job_id  # type: ignore[no-any-return]


async def console_records(sb: RunningSwitchboard) -> list[dict[str, Any]]:
    return await sb.store.pool.fetchall(  # type: ignore[no-any-return]
        "SELECT * FROM audit_log WHERE action LIKE 'job.console\\_%%' ORDER BY id")


@pytest_twisted.ensureDeferred
async def test_a_console_connection_is_recorded_and_read_with_the_jobs_authorisation(
        sb: RunningSwitchboard) -> None:
    alice, bob = await sb.user("alice"), await sb.user("bob")
    peer = await peer_for(sb, "h1", ["t"])
    job_id = await running_job(sb, alice, peer, "t")
    for event in ("opened", "closed"):
        ack = await peer.report(opened(job_id, event=event, suppressed=2))
        assert ack["ok"], ack
    entries = (await alice.get(f"/api/v1/audit?job={job_id}&action=job")).body["entries"]
    consoles = [e for e in entries if e["action"].startswith("job.console_")]
    assert [e["action"] for e in consoles] == ["job.console_close", "job.console_open"]
    record = consoles[1]
    assert record["actor"] == "alice" and record["actor_kind"] == "user"
    assert record["source"] == "198.51.100.9" and record["subject_user"] == "alice"
    assert record["subject_kind"] == "job" and record["subject_id"] == job_id
    assert record["details"] == {"service": "console", "access": "manage",
                                 "conn_id": "k" * 22, "jti": "t" * 22,
                                 "proxy": "ws://proxy.example:8200", "suppressed": 2,
                                 "host": "h1", "at": 1765000000.25}
    # Bob may not read alice's job: he sees none of it, by job or by her name.
    assert (await bob.get(f"/api/v1/audit?job={job_id}")).body["entries"] == []
    assert not [e for e in (await bob.get("/api/v1/audit?user=alice")).body["entries"]
                if e["action"].startswith("job.console_")]
    # Once alice grants him read, he does.
    r = await alice.post(f"/api/v1/jobs/{job_id}/grants", {"user": "bob", "privilege": "read"})
    assert r.status == 201, r.body
    seen = (await bob.get(f"/api/v1/audit?job={job_id}&action=job.console_open")).body
    assert [e["actor"] for e in seen["entries"]] == ["alice"]


@pytest_twisted.ensureDeferred
async def test_a_host_cannot_forge_records_about_jobs_that_are_not_its_own(
        sb: RunningSwitchboard) -> None:
    alice = await sb.user("alice")
    peer1 = await peer_for(sb, "h1", ["t"])
    peer2 = await peer_for(sb, "h2", ["u"])
    job_id = await running_job(sb, alice, peer1, "t")
    await sb.user("mallory")
    for job in (job_id, str(uuid.uuid4())):
        ack = await peer2.report(opened(job, user="mallory"))
        assert not ack["ok"] and ack["error"]["code"] == "not_your_job", ack
    # Its own job, but an actor who is nobody: refused, nothing recorded.
    ack = await peer1.report(opened(job_id, user="nobody-at-all"))
    assert not ack["ok"] and ack["error"]["code"] == "unknown_user", ack
    # A job that ended long ago on this very host is refused too.
    ack = await peer1.event(job_id, "terminated", reason="workload_exited", exit_status=0)
    assert ack["ok"]
    assert (await peer1.report(opened(job_id, event="closed")))["ok"]  # just ended: fine
    sb.service.links.console_audit.ended_within = 0.0
    ack = await peer1.report(opened(job_id))
    assert not ack["ok"] and ack["error"]["code"] == "not_your_job"
    assert [(r["actor"], r["action"]) for r in await console_records(sb)] == [
        ("alice", "job.console_close")]


@pytest_twisted.ensureDeferred
async def test_a_flood_of_console_events_is_bounded_per_host(sb: RunningSwitchboard) -> None:
    alice = await sb.user("alice")
    peer = await peer_for(sb, "h1", ["t"])
    job_id = await running_job(sb, alice, peer, "t")
    sb.service.links.console_audit.limiter = RateLimiter(reactor, 0.001, 5)
    acks = [await peer.report(opened(job_id)) for _ in range(12)]
    assert [a["ok"] for a in acks] == [True] * 5 + [False] * 7
    assert {a["error"]["code"] for a in acks[5:]} == {"rate_limited"}
    assert not any(protocol.is_retryable(a) for a in acks)  # the supervisor drops them
    assert len(await console_records(sb)) == 5
    assert peer.connection is not None  # refused, not disconnected


@pytest_twisted.ensureDeferred
async def test_an_older_link_cannot_send_console_events(sb: RunningSwitchboard) -> None:
    alice = await sb.user("alice")
    peer = await peer_for(sb, "h1", ["t"], minor=protocol.CONSOLE_MINOR - 1)
    job_id = await running_job(sb, alice, peer, "t")
    peer.send({**opened(job_id), "request_id": 77})
    assert await peer.closed() == protocol.CloseCode.PROTOCOL_VIOLATION
    assert await console_records(sb) == []
