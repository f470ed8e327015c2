"""Helpers of the switchboard tests that drive a scripted supervisor (:mod:`.peer`).

Hosts, jobs and peers against a :class:`tests.support.RunningSwitchboard`: add a
host, submit a job, wait for a job state, connect a peer and reconnect it; hold
hosts' rows locked (``locked_hosts``: a link registration that waits).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests.support import Client, RunningSwitchboard, start_switchboard
from tests.switchboard.peer import Peer, Script
from tests.util.running import stopping
from tests.util.waiting import eventually
from treadmill.common.captoken import CapabilityVerifier, parse_jwks

DIGEST = "sha256:" + "c" * 64
FAST = {"scheduler_interval": 0.2}


@pytest_twisted.async_yield_fixture
async def sb(migrated_database: str, tmp_path: Path) -> AsyncIterator[RunningSwitchboard]:
    """A switchboard with the ``FAST`` settings, stopped after the test."""
    async with stopping(await start_switchboard(migrated_database, tmp_path, **FAST)) as running:
        yield running


async def add_host(sb: RunningSwitchboard, name: str = "h1", tags: tuple[str, ...] = ("t",),
                   grant: bool = True) -> str:
    r = await sb.admin.post("/api/v1/hosts", {"name": name, "tags": list(tags)})
    assert r.status == 201, r.body
    if grant:
        r2 = await sb.admin.post(f"/api/v1/hosts/{name}/grants",
                                 {"user": "*", "privilege": "start"})
        assert r2.status == 201, r2.body
    return r.body["token"]


async def submit(sb: RunningSwitchboard, client: Any = None, **fields: Any) -> str:
    body = {"image": DIGEST, "tags": ["t"], **fields}
    r = await (client or sb.admin).post("/api/v1/jobs", body)
    assert r.status == 201, r.body
    return r.body["id"]


async def job(sb: RunningSwitchboard, job_id: str) -> dict[str, Any]:
    r = await sb.admin.get(f"/api/v1/jobs/{job_id}")
    assert r.status == 200, r.body
    return r.body


async def reaches(sb: RunningSwitchboard, job_id: str, state: str, **more: Any
                  ) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        body = await job(sb, job_id)
        if body["state"] != state:
            return None
        for key, value in more.items():
            actual = (body["termination"] or {}).get(key) if key in (
                "reason", "exit_status") else body.get(key)
            if actual != value:
                return None
        return body

    return await eventually(check)


async def connected_peer(sb: RunningSwitchboard, token: str, script: Script | None = None
                         ) -> Peer:
    peer = Peer(sb.url, token, script or Script())
    await peer.connect()
    await peer.wait_for("status_request")
    return peer


async def host_peer(sb: RunningSwitchboard, name: str = "h1", tags: tuple[str, ...] = ("t",),
                    grant: bool = True, script: Script | None = None) -> Peer:
    """A host added as :func:`add_host` does, with a scripted supervisor connected for it
    (:func:`connected_peer`)."""
    return await connected_peer(sb, await add_host(sb, name, tags, grant), script)


async def assigned_job(sb: RunningSwitchboard, peer: Peer, **fields: Any) -> str:
    job_id = await submit(sb, **fields)
    await peer.wait_for("start_job", job_id=job_id)
    await reaches(sb, job_id, "assigned")
    return job_id


def seconds_of(text: str) -> float:
    """A time of the API (RFC 3339) as POSIX seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def without_sweep(sb: RunningSwitchboard) -> None:
    """Stop the links' sweep of expired holds (every ``touch_interval``, the backstop):
    only a hold's own timer can end it on time now."""
    await sb.service.links.getServiceNamed("holds").stopService()


async def reconnect(peer: Peer, job: dict[str, Any] | None) -> None:
    peer.disconnect()
    await peer.closed()
    peer.received.clear()
    peer.script.job = job
    await peer.connect()
    await peer.wait_for("status_request")


@asynccontextmanager
async def locked_hosts(dsn: str, *names: str) -> AsyncIterator[None]:
    """Hold row locks on the hosts ``names`` from another session (in a thread, off the
    reactor): a link's registration of one of them waits, as on a busy database."""
    conn = await deferToThread(psycopg2.connect, dsn)

    def lock() -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT id FROM hosts WHERE name = ANY(%s) FOR UPDATE", (list(names),))
            assert cur.rowcount == len(names)

    try:
        await deferToThread(lock)
        yield
    finally:
        await deferToThread(conn.rollback)
        await deferToThread(conn.close)


# -- registry tokens ------------------------------------------------------------------


async def grants(sb: RunningSwitchboard, client: Client | None, *scopes: str,
                 service: str = "store-1", headers: dict[str, str] | None = None
                 ) -> tuple[int, dict[str, tuple[str, ...]] | Any]:
    query = "&".join(f"scope={s}" for s in scopes)
    caller = client or Client(sb.url, None)
    r = await caller.get(f"/api/v1/registry/token?service={service}&{query}",
                         headers=headers or {})
    if r.status != 200:
        return r.status, r.body
    keys = (await Client(sb.url).get("/.well-known/treadmill/capability-keys")).body
    claims = CapabilityVerifier(parse_jwks(keys), "treadmill", service, reactor).verify_any(
        r.body["token"])
    assert r.body["access_token"] == r.body["token"] and r.body["expires_in"] == 300
    return 200, {a.name: a.actions for a in claims.access}


def basic(user: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{secret}".encode()).decode()
    return {"authorization": f"Basic {raw}"}
