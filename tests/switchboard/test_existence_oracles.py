"""No existence oracles: what a user may not see answers exactly like what does not exist.

For every route that names a host, image, job, token, user or grant, the same
request about a resource the caller may not see and about one that does not
exist must get the same status and the same body (the name aside). The host
list shows a host's current job only to those who may read that job.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import pytest_twisted

from tests.support import Client, RunningSwitchboard
from treadmill.switchboard import credentials

DIGEST = "sha256:" + "ab" * 32


@dataclass
class Case:
    method: str
    path: str  # {} is the resource's name or id
    body: Any = None


HIDDEN = {  # kind -> (what the attacker may not see, what does not exist)
    "host": ("secret-host", "ghost-host"),
    "image": ("alice/private-fw", "alice/ghost-fw"),
    "job": None,  # set per test: alice's job id, a fresh uuid
    "token": None,  # alice's token id, a fresh uuid
    "user": ("alice", "ghost"),
}

CASES: list[tuple[str, Case]] = [
    ("host", Case("GET", "/api/v1/hosts/{}")),
    ("host", Case("PUT", "/api/v1/hosts/{}/tags", {"tags": ["x"]})),
    ("host", Case("POST", "/api/v1/hosts/{}/drain")),
    ("host", Case("POST", "/api/v1/hosts/{}/enable")),
    ("host", Case("POST", "/api/v1/hosts/{}/token")),
    ("host", Case("DELETE", "/api/v1/hosts/{}")),
    ("host", Case("GET", "/api/v1/hosts/{}/grants")),
    ("host", Case("POST", "/api/v1/hosts/{}/grants", {"user": "bob", "privilege": "read"})),
    ("host", Case("DELETE", "/api/v1/hosts/{}/grants/bob/read")),
    ("image", Case("GET", "/api/v1/images/{}")),
    ("image", Case("PUT", "/api/v1/images/{}", {"description": "mine now"})),
    ("image", Case("DELETE", "/api/v1/images/{}")),
    ("image", Case("GET", "/api/v1/images/{}/grants")),
    ("image", Case("POST", "/api/v1/images/{}/grants", {"user": "bob", "privilege": "use"})),
    ("image", Case("DELETE", "/api/v1/images/{}/grants/bob/use")),
    ("image", Case("POST", "/api/v1/jobs", {"image": "{}"})),
    ("job", Case("GET", "/api/v1/jobs/{}")),
    ("job", Case("POST", "/api/v1/jobs/{}/terminate")),
    ("job", Case("POST", "/api/v1/jobs/{}/snapshots", {"name": "bob/snap"})),
    ("job", Case("GET", "/api/v1/jobs/{}/snapshots")),
    ("job", Case("GET", "/api/v1/jobs/{}/snapshots/" + str(uuid.UUID(int=7)))),
    ("job", Case("POST", "/api/v1/jobs/{}/logs/token")),
    ("job", Case("POST", "/api/v1/jobs/{}/console-token", {"access": "read"})),
    ("job", Case("GET", "/api/v1/jobs/{}/events")),
    ("job", Case("GET", "/api/v1/jobs/{}/events/watch")),
    ("job", Case("GET", "/api/v1/jobs/{}/grants")),
    ("job", Case("POST", "/api/v1/jobs/{}/grants", {"user": "bob", "privilege": "read"})),
    ("job", Case("DELETE", "/api/v1/jobs/{}/grants/bob/read")),
    ("token", Case("DELETE", "/api/v1/tokens/{}")),
    ("user", Case("GET", "/api/v1/users/{}")),
    ("user", Case("PATCH", "/api/v1/users/{}", {"disabled": True})),
    ("user", Case("GET", "/api/v1/tokens?user={}")),
    ("user", Case("POST", "/api/v1/tokens", {"user": "{}"})),
]


def _fill(value: Any, name: str) -> Any:
    return json.loads(json.dumps(value).replace("{}", name)) if value is not None else None


async def _ask(client: Client, case: Case, name: str) -> tuple[int, Any]:
    r = await client.request(case.method, case.path.replace("{}", name), _fill(case.body, name))
    body = json.loads(json.dumps(r.body).replace(name, "NAME")) if r.body else r.body
    return r.status, body


@pytest_twisted.async_yield_fixture
async def world(switchboard: RunningSwitchboard):
    alice = await switchboard.user("alice")
    bob = await switchboard.user("bob")
    store = switchboard.store
    alice_id = await store.user_id("alice")
    await store.create_host("secret-host", ["t"], alice_id, "", credentials.token_hash("h"))
    await switchboard.register_store("https://s.example", "s")
    r = await alice.post("/api/v1/images", {"name": "alice/private-fw", "digest": DIGEST,
                                            "stores": ["https://s.example"]})
    assert r.status == 201, r.body
    r = await alice.post("/api/v1/jobs", {"image": "alice/private-fw"})
    assert r.status == 201, r.body
    job = r.body["id"]
    tokens = (await alice.get("/api/v1/tokens")).body["tokens"]
    hidden = {**HIDDEN, "job": (job, str(uuid.uuid4())),
              "token": (tokens[0]["id"], str(uuid.uuid4()))}
    yield switchboard, alice, bob, hidden


@pytest_twisted.ensureDeferred
async def test_invisible_answers_like_nonexistent(world) -> None:
    """One row per route (one switchboard for the whole table, to stay fast)."""
    _, _, bob, hidden = world
    differ = []
    for kind, case in CASES:
        invisible, missing = hidden[kind]
        seen = await _ask(bob, case, invisible)
        absent = await _ask(bob, case, missing)
        if seen != absent or seen[0] < 400:
            differ.append((case.method, case.path, seen, absent))
    assert differ == []


@pytest_twisted.ensureDeferred
async def test_image_name_taken_is_refused_alike_whether_visible_or_not(world) -> None:
    switchboard, alice, bob, _ = world
    body = {"name": "alice/private-fw", "digest": DIGEST, "stores": ["https://s.example"]}
    by_owner = await alice.post("/api/v1/images", body)
    assert by_owner.status == 409
    # Outside bob's namespaces a taken name and a free one answer alike.
    taken = await bob.post("/api/v1/images", body)
    free = await bob.post("/api/v1/images", {**body, "name": "alice/no-such-fw"})
    assert taken.status == free.status == 403
    assert json.dumps(taken.body).replace("private-fw", "X") == \
        json.dumps(free.body).replace("no-such-fw", "X")
    # In bob's own namespace, an image he cannot see (an admin's, private)
    # says only that the name is not available, not that it exists.
    r = await switchboard.admin.post("/api/v1/images", {**body, "name": "bob/admins-fw"})
    assert r.status == 201, r.body
    hidden = await bob.post("/api/v1/images", {**body, "name": "bob/admins-fw"})
    assert hidden.status == 409
    assert "exist" not in json.dumps(hidden.body)
    # The digest of a private image gives nothing away either.
    job = (await bob.post("/api/v1/jobs", {"image": DIGEST})).body
    assert job["image"] == {"name": None, "digest": DIGEST, "stores": [], "kind": None}


@pytest_twisted.ensureDeferred
async def test_host_list_shows_current_job_only_to_its_readers(world) -> None:
    switchboard, alice, bob, hidden = world
    job, _ = hidden["job"]
    host_id = (await switchboard.store.pool.fetchone(
        "SELECT id FROM hosts WHERE name = 'secret-host'"))["id"]
    await switchboard.store.pool.execute(
        "UPDATE jobs SET host_id = %s, state = 'assigned' WHERE id = %s", (host_id, job))
    r = await switchboard.admin.post("/api/v1/hosts/secret-host/grants",
                                     {"user": "bob", "privilege": "read"})
    assert r.status == 201, r.body

    async def current(client: Client) -> tuple[Any, Any]:
        listed = (await client.get("/api/v1/hosts")).body["hosts"]
        (row,) = [h for h in listed if h["name"] == "secret-host"]
        shown = (await client.get("/api/v1/hosts/secret-host")).body
        return row["current_job"], shown["current_job"]

    assert await current(switchboard.admin) == (job, job)
    assert await current(alice) == (job, job)
    assert await current(bob) == (None, None)  # Bob sees the host, not alice's job.
    # Any grant on the job lets bob read it (access.effective), stop as read.
    for privilege, visible in (("stop", True), ("read", True)):
        r = await alice.post(f"/api/v1/jobs/{job}/grants", {"user": "bob",
                                                            "privilege": privilege})
        assert r.status == 201, r.body
        assert await current(bob) == ((job, job) if visible else (None, None)), privilege


@pytest_twisted.ensureDeferred
async def test_snapshot_name_taken_is_refused_alike_whether_visible_or_not(world) -> None:
    switchboard, _, bob, _ = world
    store = switchboard.store
    admin_id = await store.user_id("admin")
    await store.create_image("bob/hidden", DIGEST, ["https://s.example"], admin_id, "")
    r = await bob.post("/api/v1/images", {"name": "bob/mine", "digest": DIGEST,
                                          "stores": ["https://s.example"]})
    assert r.status == 201, r.body
    job = (await bob.post("/api/v1/jobs", {"image": DIGEST})).body["id"]
    await store.pool.execute(
        "UPDATE jobs SET state = 'terminated', host_id = (SELECT id FROM hosts "
        "WHERE name = 'secret-host') WHERE id = %s", (job,))
    answers = []
    for name in ("bob/hidden", "bob/mine"):
        r = await bob.post(f"/api/v1/jobs/{job}/snapshots",
                           {"name": name, "store": "https://s.example"})
        answers.append((r.status, json.dumps(r.body).replace(name, "NAME")))
    assert answers[0] == answers[1] and answers[0][0] == 409, answers
