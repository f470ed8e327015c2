"""POST /api/v1/jobs with an Idempotency-Key: exactly one job per user, key and body.

Real switchboard over HTTP and a real PostgreSQL; the outage cases cut the
test database's sessions (tests/switchboard/outage.py).
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.web.http_headers import Headers

from tests.support import Client, RunningSwitchboard, start_switchboard
from tests.switchboard.outage import Outage
from tests.switchboard.outage import outage as outage  # the fixture
from tests.util.running import stopping
from treadmill.cli.main import run as tml

DIGEST = "sha256:" + "d" * 64
BODY = {"image": DIGEST, "label": "nightly", "parameters": {"S": {"value": "hush",
                                                                  "secret": True}}}


@pytest_twisted.async_yield_fixture
async def sb(database: str, tmp_path: Path) -> AsyncIterator[RunningSwitchboard]:
    async with stopping(await start_switchboard(database, tmp_path)) as running:
        yield running


def keyed(key: str) -> dict[str, str]:
    return {"idempotency-key": key}


async def jobs_of(client: Client) -> list[str]:
    r = await client.get("/api/v1/jobs")
    assert r.status == 200, r.body
    return [job["id"] for job in r.body["jobs"]]


async def raw_post(client: Client, body: Any, key: str) -> tuple[int, bytes]:
    response = await treq.post(client.url + "/api/v1/jobs", data=json.dumps(body).encode(),
                               headers={**client.headers(), **keyed(key)})
    return response.code, await response.content()


@pytest_twisted.ensureDeferred
async def test_a_retried_request_returns_the_same_job(sb: RunningSwitchboard) -> None:
    alice = await sb.user("alice")
    key = str(uuid.uuid4())
    first = await raw_post(alice, BODY, key)
    assert first[0] == 201
    again = await raw_post(alice, BODY, key)
    assert again == first  # the same status and the same bytes
    # The same body in another key order and spacing is the same request.
    reordered = {"parameters": BODY["parameters"], "label": "nightly", "image": DIGEST}
    assert await raw_post(alice, reordered, key) == first
    assert len(await jobs_of(alice)) == 1
    assert b'"hush"' not in first[1]
    # The first answer is kept while the job moves on.
    job_id = (await jobs_of(alice))[0]
    assert (await alice.post(f"/api/v1/jobs/{job_id}/terminate")).status == 200
    assert await raw_post(alice, BODY, key) == first


@pytest_twisted.ensureDeferred
async def test_concurrent_retries_create_one_job(sb: RunningSwitchboard) -> None:
    alice = await sb.user("alice")
    results = await DeferredList([ensureDeferred(raw_post(alice, BODY, "same"))
                                  for _ in range(8)], consumeErrors=True)
    answers = [result for ok, result in results if ok]
    assert len(answers) == 8 and {status for status, _ in answers} == {201}
    assert len({content for _, content in answers}) == 1
    assert len(await jobs_of(alice)) == 1


@pytest_twisted.ensureDeferred
async def test_the_key_with_another_body_is_refused(sb: RunningSwitchboard) -> None:
    alice = await sb.user("alice")
    r = await alice.post("/api/v1/jobs", BODY, headers=keyed("k1"))
    assert r.status == 201
    for other in ({**BODY, "label": "other"}, {"image": DIGEST},
                  {**BODY, "parameters": {"S": {"value": "other", "secret": True}}}):
        r2 = await alice.post("/api/v1/jobs", other, headers=keyed("k1"))
        assert (r2.status, r2.error) == (409, "conflict"), r2.body
    assert await jobs_of(alice) == [r.body["id"]]


@pytest_twisted.ensureDeferred
async def test_keys_are_per_user(sb: RunningSwitchboard) -> None:
    alice, bob = await sb.user("alice"), await sb.user("bob")
    a = await alice.post("/api/v1/jobs", BODY, headers=keyed("shared"))
    b = await bob.post("/api/v1/jobs", BODY, headers=keyed("shared"))
    assert a.status == b.status == 201
    assert a.body["id"] != b.body["id"] and b.body["owner"] == "bob"
    assert await jobs_of(bob) == [b.body["id"]]
    # Bob's different body under the same key is his own business: no conflict with alice.
    c = await bob.post("/api/v1/jobs", {"image": DIGEST}, headers=keyed("alices-key"))
    assert c.status == 201
    # Without a key, every request creates a job.
    carol = await sb.user("carol")
    for _ in range(2):
        assert (await carol.post("/api/v1/jobs", BODY)).status == 201
    assert len(await jobs_of(carol)) == 2


BAD_KEYS = [[b""], [b" "], [b"x" * 256], ["clé".encode()], [b"a\tb"], [b"a", b"b"]]


@pytest_twisted.ensureDeferred
async def test_bad_keys_are_400_and_create_nothing(sb: RunningSwitchboard) -> None:
    alice = await sb.user("alice")
    for values in BAD_KEYS:
        headers = Headers({k: [v] for k, v in alice.headers().items()})
        headers.setRawHeaders(b"idempotency-key", values)
        response = await treq.post(alice.url + "/api/v1/jobs",
                                   data=json.dumps(BODY).encode(), headers=headers)
        body = json.loads(await response.content())
        assert response.code == 400 and body["error"]["code"] == "bad_request", values
        assert "Idempotency-Key" in body["error"]["message"]
    assert await jobs_of(alice) == []


@pytest_twisted.ensureDeferred
async def test_a_key_is_forgotten_after_the_retention(sb: RunningSwitchboard) -> None:
    alice = await sb.user("alice")
    first = await alice.post("/api/v1/jobs", BODY, headers=keyed("old"))
    await sb.service.pool.execute(
        "UPDATE job_idempotency SET created_at = now() - interval '25 hours'")
    second = await alice.post("/api/v1/jobs", BODY, headers=keyed("old"))
    assert second.status == 201 and second.body["id"] != first.body["id"]
    third = await alice.post("/api/v1/jobs", BODY, headers=keyed("old"))
    assert third.body == second.body
    rows = await sb.service.pool.fetchall("SELECT key FROM job_idempotency")
    assert rows == [{"key": "old"}]


@pytest_twisted.ensureDeferred
async def test_the_answer_needs_no_connection_after_the_commit(
        sb: RunningSwitchboard, outage: Outage) -> None:
    """The database goes away right after the job committed: still 201 with the job,
    and the client's retry after the outage gets the same job, not a second one."""
    alice = await sb.user("alice")
    await jobs_of(alice)  # alice's token is cached from here on
    pool = sb.service.pool
    original = pool.transaction

    async def then_outage(fn: Any) -> Any:
        result = await original(fn)
        if isinstance(result, dict) and "id" in result and not outage.active:
            await outage.begin()  # the transaction that inserted the job committed
        return result

    for key in (None, "k"):
        while True:
            pool.transaction = then_outage  # type: ignore[method-assign]
            first = await alice.post("/api/v1/jobs", BODY,
                                     headers=keyed(key) if key else None)
            pool.transaction = original  # type: ignore[method-assign]
            # A 503 before anything committed (a pooled connection still reconnecting
            # after the last outage) is what a client retries; not one after the commit.
            if first.status != 503 or outage.active:
                break
        assert first.status == 201, first.body
        assert first.body["state"] == "queued" and first.body["owner"] == "alice"
        await outage.end()
        while (await alice.get("/healthz")).status != 200:
            pass
        if key:
            again = await alice.post("/api/v1/jobs", BODY, headers=keyed(key))
            while again.status == 503:
                again = await alice.post("/api/v1/jobs", BODY, headers=keyed(key))
            assert again.status == 201 and again.body == first.body
    assert len(await jobs_of(alice)) == 2


@pytest_twisted.ensureDeferred
async def test_a_request_refused_during_an_outage_creates_its_job_once_after(
        database: str, tmp_path: Path, outage: Outage) -> None:
    sb = await start_switchboard(database, tmp_path)
    try:
        alice = await sb.user("alice")
        await outage.begin()
        r = await alice.post("/api/v1/jobs", BODY, headers=keyed("retry-me"))
        assert (r.status, r.error) == (503, "unavailable")
        await outage.end()
        answers = []
        while len(answers) < 3:
            r = await alice.post("/api/v1/jobs", BODY, headers=keyed("retry-me"))
            if r.status != 503:
                answers.append(r)
        assert {a.status for a in answers} == {201}
        assert len({a.body["id"] for a in answers}) == 1
        assert len(await jobs_of(alice)) == 1
    finally:
        await sb.stop()


@pytest_twisted.ensureDeferred
async def test_tml_submits_once_across_an_outage(database: str, tmp_path: Path,
                                                 outage: Outage) -> None:
    """End to end: `tml job submit` meets 503s, retries with its Idempotency-Key, and
    the database's return leaves exactly one job."""
    sb = await start_switchboard(database, tmp_path)
    try:
        alice = await sb.user("alice")
        await outage.begin()
        out, err = io.StringIO(), io.StringIO()
        submitting = ensureDeferred(tml(reactor, [
            "--url", sb.url, "--token", alice.token, "job", "submit", DIGEST, "--json"],
            out, err, {"TREADMILL_RETRY_FOR": "20"}))
        await deferLater(reactor, 1.5, lambda: None)
        assert not submitting.called
        await outage.end()
        submitting.addTimeout(15, reactor)
        assert await submitting == 0, err.getvalue()
        assert "503" in err.getvalue()
        job_id = json.loads(out.getvalue())["id"]
        assert await jobs_of(alice) == [job_id]
    finally:
        await sb.stop()
