"""Catalogue image history: every digest change is a kept version, readers of the image
list them, managers roll back; against a real switchboard and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.support import Client, RunningSwitchboard, start_switchboard
from treadmill.switchboard.api import Limits

STORE = "http://store.example"
OTHER_STORE = "http://other.example"
D = ["sha256:" + c * 64 for c in "0123456789"]


@pytest_twisted.async_yield_fixture
async def sb(migrated_database: str, tmp_path: Path):
    running = await start_switchboard(migrated_database, tmp_path, limits=Limits(image_history=4))
    await running.register_store(STORE, "store")
    await running.register_store(OTHER_STORE, "other")
    try:
        yield running
    finally:
        await running.stop()


async def history(client: Client, name: str) -> list[dict[str, Any]]:
    r = await client.get(f"/api/v1/images/{name}/history")
    assert r.status == 200, r.body
    return r.body["versions"]


@pytest_twisted.ensureDeferred
async def test_replace_keeps_the_previous_digest_and_rollback_restores_it(
        sb: RunningSwitchboard) -> None:
    alice = await sb.user("alice")
    r = await alice.post("/api/v1/images", {"name": "alice/demo", "digest": D[0],
                                            "stores": [STORE], "kind": "qemu",
                                            "host_tags": ["qemu"]})
    assert r.status == 201, r.body
    [first] = await history(alice, "alice/demo")
    assert (first["version"], first["digest"], first["by"], first["note"]) == (
        1, D[0], "alice", "created")
    # POST to an existing name stays 409 and changes nothing.
    r = await alice.post("/api/v1/images", {"name": "alice/DEMO", "digest": D[1],
                                            "stores": [STORE]})
    assert r.status == 409
    assert len(await history(alice, "alice/demo")) == 1
    # A PUT that keeps the digest is no new version; one that changes it is.
    r = await alice.put("/api/v1/images/alice/demo", {"description": "d"})
    assert r.status == 200 and len(await history(alice, "alice/demo")) == 1
    r = await alice.put("/api/v1/images/alice/demo", {"digest": D[1], "stores": [OTHER_STORE],
                                                      "kind": "board", "host_tags": ["b"]})
    assert r.status == 200
    versions = await history(alice, "alice/demo")
    assert [(v["version"], v["digest"], v["note"]) for v in versions] == [
        (2, D[1], "replaced"), (1, D[0], "created")]
    assert versions[0]["stores"] == [OTHER_STORE] and versions[0]["kind"] == "board"
    # Rolling back to 1 brings back its digest, stores, host tags and kind, as version 3.
    r = await alice.post("/api/v1/images/alice/demo/rollback", {"version": 1})
    assert r.status == 200, r.body
    assert (r.body["digest"], r.body["stores"], r.body["kind"], r.body["host_tags"]) == (
        D[0], [STORE], "qemu", ["qemu"])
    assert r.body["description"] == "d"
    versions = await history(alice, "alice/demo")
    assert (versions[0]["version"], versions[0]["digest"], versions[0]["note"]) == (
        3, D[0], "rollback to version 1")
    # A job naming the image now runs the rolled-back digest.
    job = (await sb.admin.post("/api/v1/jobs", {"image": "alice/demo"})).body
    assert job["image"]["digest"] == D[0] and job["image"]["kind"] == "qemu"


@pytest_twisted.ensureDeferred
async def test_history_is_bounded(sb: RunningSwitchboard) -> None:
    admin = sb.admin
    assert (await admin.post("/api/v1/images", {"name": "img", "digest": D[0],
                                                "stores": [STORE]})).status == 201
    for digest in D[1:7]:
        assert (await admin.put("/api/v1/images/img", {"digest": digest})).status == 200
    versions = await history(admin, "img")
    assert [v["version"] for v in versions] == [7, 6, 5, 4]  # images.history = 4
    assert versions[0]["digest"] == D[6]
    r = await admin.post("/api/v1/images/img/rollback", {"version": 1})
    assert r.status == 404 and "no version 1" in r.body["error"]["message"]
    r = await admin.post("/api/v1/images/img/rollback", {"version": 4})
    assert r.status == 200 and r.body["digest"] == D[3]
    assert [v["version"] for v in await history(admin, "img")] == [8, 7, 6, 5]


@pytest_twisted.ensureDeferred
async def test_bad_rollbacks_are_4xx_and_change_nothing(sb: RunningSwitchboard) -> None:
    admin = sb.admin
    await admin.post("/api/v1/images", {"name": "img", "digest": D[0], "stores": [STORE]})
    for body in ({}, {"version": 0}, {"version": "1"}, {"version": 1.5}, {"version": 2**40},
                 {"version": 1, "extra": 1}, []):
        r = await admin.post("/api/v1/images/img/rollback", body)
        assert r.status == 400, (body, r.status, r.body)
    r = await admin.post("/api/v1/images/img/rollback", {"version": 99})
    assert r.status == 404
    r = await admin.post("/api/v1/images/nope/rollback", {"version": 1})
    assert r.status == 404
    r = await admin.get("/api/v1/images/nope/history")
    assert r.status == 404
    assert [v["version"] for v in await history(admin, "img")] == [1]
    # Names that would shadow the routes are refused.
    for name in ("a/history", "a/rollback", "a/History", "b/a/ROLLBACK"):
        r = await admin.post("/api/v1/images", {"name": name, "digest": D[0],
                                                "stores": [STORE]})
        assert r.status == 400, name


# Who may read the history and roll back: owner, granted use, granted manage, another
# user, an admin. An image the caller may not see at all answers 404.
AUTHZ = [
    ("owner", None, 200, 200),
    ("user", "use", 200, 403),
    ("user", "manage", 200, 200),
    ("user", None, 404, 404),
    ("admin", None, 200, 200),
]


@pytest.mark.parametrize(("who", "grant", "read", "rollback"), AUTHZ)
@pytest_twisted.ensureDeferred
async def test_who_may_read_and_roll_back(sb: RunningSwitchboard, who: str,
                                          grant: str | None, read: int, rollback: int) -> None:
    owner = await sb.user("owner")
    r = await owner.post("/api/v1/images", {"name": "owner/img", "digest": D[0],
                                            "stores": [STORE]})
    assert r.status == 201, r.body
    assert (await owner.put("/api/v1/images/owner/img", {"digest": D[1]})).status == 200
    caller = {"owner": owner, "admin": sb.admin}.get(who) or await sb.user("someone")
    if grant is not None:
        r = await owner.post("/api/v1/images/owner/img/grants",
                             {"user": "someone", "privilege": grant})
        assert r.status == 201, r.body
    r = await caller.get("/api/v1/images/owner/img/history")
    assert r.status == read, r.body
    if read == 200:
        assert [v["digest"] for v in r.body["versions"]] == [D[1], D[0]]
    else:
        assert "owner/img" in r.body["error"]["message"] and "versions" not in r.body
    r = await caller.post("/api/v1/images/owner/img/rollback", {"version": 1})
    assert r.status == rollback, r.body
    current = (await owner.get("/api/v1/images/owner/img")).body["digest"]
    assert current == (D[0] if rollback == 200 else D[1])
    anonymous = Client(sb.url, None)
    assert (await anonymous.get("/api/v1/images/owner/img/history")).status == 401
