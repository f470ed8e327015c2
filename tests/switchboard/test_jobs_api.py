"""The jobs API over real HTTP against a real database: enqueue, read, list,
grants, terminate, events (listed and watched live) and timeouts."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from tests.support import Client, start_switchboard
from tests.util.waiting import eventually as wait_for
from tests.util.waiting import sleep
from treadmill.switchboard.api import Limits
from treadmill.switchboard.jobstate import Reason, Stage, State, Status

DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32
SECRET = "s3cr3t-value-that-must-never-leak-7f3a9c"


async def enqueue(client: Client, **fields: Any) -> dict:
    body = {"image": DIGEST, **fields}
    r = await client.post("/api/v1/jobs", body)
    assert r.status == 201, r.body
    return r.body


async def alices_image(switchboard: Any, name: str) -> tuple[Client, Client]:
    """Users alice and bob, once alice registered the image ``name`` (DIGEST, in the store
    https://a.example)."""
    alice = await switchboard.user("alice")
    bob = await switchboard.user("bob")
    await switchboard.register_store("https://a.example", "a")
    r = await alice.post("/api/v1/images", {"name": name, "digest": DIGEST,
                                            "stores": ["https://a.example/"]})
    assert r.status == 201, r.body
    return alice, bob


async def raw_get(client: Client, path: str) -> tuple[int, bytes]:
    response = await treq.get(client.url + path, headers=client.headers())
    return response.code, await response.content()


async def events_of(client: Client, job_id: str, after: int | None = None) -> list[dict]:
    query = f"?after={after}" if after is not None else ""
    r = await client.get(f"/api/v1/jobs/{job_id}/events{query}")
    assert r.status == 200, r.body
    return r.body["events"]


class EventStream:
    """A live ``events/watch`` response, parsed as Server-Sent Events arrive."""

    def __init__(self) -> None:
        self.buffer = b""
        self.raw = b""
        self.events: list[dict] = []
        self.ids: list[int] = []
        self.arrived: list[float] = []
        self.comments: list[bytes] = []
        self.done: Deferred[None] | None = None
        self.finished = False

    def feed(self, data: bytes) -> None:
        self.raw += data
        self.buffer += data
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            fields: dict[bytes, bytes] = {}
            for line in block.split(b"\n"):
                if line.startswith(b":"):
                    self.comments.append(line)
                    continue
                name, _, value = line.partition(b":")
                fields[name] = value[1:] if value.startswith(b" ") else value
            if b"data" in fields:
                assert fields.get(b"event") == b"job"
                self.events.append(json.loads(fields[b"data"]))
                self.ids.append(int(fields[b"id"]))
                self.arrived.append(reactor.seconds())

    @property
    def states(self) -> list[str]:
        return [event["state"] for event in self.events]


async def watch(client: Client, job_id: str, after: int | None = None,
                last_event_id: str | None = None) -> tuple[int, EventStream, Any]:
    query = f"?after={after}" if after is not None else ""
    headers = client.headers()
    if last_event_id is not None:  # as a reconnecting EventSource sends it
        headers["Last-Event-ID"] = last_event_id
    response = await treq.get(f"{client.url}/api/v1/jobs/{job_id}/events/watch{query}",
                              headers=headers, unbuffered=True)
    stream = EventStream()
    if response.code != 200:
        stream.feed(await response.content())
        return response.code, stream, response
    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    stream.done = treq.collect(response, stream.feed)
    stream.done.addBoth(lambda result: setattr(stream, "finished", True) or result)
    return response.code, stream, response


async def put_in(store, job_id: str, state: str) -> None:
    """Move a queued job to ``state`` the way a scheduler and supervisor would."""
    path = {
        "assigned": [Status(State.ASSIGNED)],
        "initializing": [Status(State.ASSIGNED),
                         Status(State.INITIALIZING, stage=Stage.STARTING)],
        "ready": [Status(State.ASSIGNED), Status(State.INITIALIZING, stage=Stage.BOOTING),
                  Status(State.READY)],
    }[state]
    for status in path:
        assert await store.transition(job_id, status)


# -- enqueue -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_enqueue_by_digest_with_defaults(switchboard):
    alice = await switchboard.user("alice")
    job = await enqueue(alice)
    limits = Limits()
    assert job["owner"] == "alice"
    assert job["state"] == "queued" and job["stage"] is None and job["host"] is None
    assert job["image"] == {"name": None, "digest": DIGEST, "stores": [], "kind": None}
    assert job["timeout"] == limits.default_timeout
    assert job["queue_timeout"] == limits.default_queue_timeout
    assert job["max_restarts"] == 0 and job["restarts_left"] == 0
    assert job["label"] == "" and job["tags"] == [] and job["parameters"] == {}
    assert job["termination"] is None and job["restart_of"] is None
    assert job["created_at"].endswith("Z")
    for stamp in ("assigned_at", "started_at", "ready_at", "terminated_at"):
        assert job[stamp] is None

    shown = await alice.get(f"/api/v1/jobs/{job['id']}")
    assert shown.status == 200 and shown.body == job


@pytest_twisted.ensureDeferred
async def test_enqueue_with_every_field(switchboard):
    alice = await switchboard.user("alice")
    job = await enqueue(alice, tags=["arch=x86_64", "qemu"], timeout=60.5, queue_timeout=30,
                        max_restarts=3, label="nightly build 42",
                        parameters={"A": {"value": "1"}, "B": {"value": "", "secret": False}})
    assert job["tags"] == ["arch=x86_64", "qemu"]
    assert job["timeout"] == 60.5 and job["queue_timeout"] == 30
    assert job["max_restarts"] == 3 and job["restarts_left"] == 3
    assert job["label"] == "nightly build 42"
    assert job["parameters"] == {"A": {"value": "1", "secret": False},
                                 "B": {"value": "", "secret": False}}


@pytest_twisted.ensureDeferred
async def test_configured_defaults_apply(migrated_database, tmp_path):
    limits = Limits(default_timeout=123, default_queue_timeout=456, max_timeout=1000)
    sb = await start_switchboard(migrated_database, tmp_path, limits=limits)
    try:
        job = await enqueue(sb.admin)
        assert job["timeout"] == 123 and job["queue_timeout"] == 456
        r = await sb.admin.post("/api/v1/jobs", {"image": DIGEST, "timeout": 1001})
        assert r.status == 400 and r.body["error"]["message"].startswith("timeout:")
        assert (await enqueue(sb.admin, timeout=1000))["timeout"] == 1000
    finally:
        await sb.stop()


@pytest_twisted.ensureDeferred
async def test_enqueue_by_catalogue_name_resolves_digest(switchboard):
    alice = await switchboard.user("alice")
    await switchboard.register_store("https://store.example/v2", "store")
    r = await alice.post("/api/v1/images", {"name": "alice/debian", "digest": DIGEST,
                                            "stores": ["https://store.example/v2"]})
    assert r.status == 201, r.body
    job = await enqueue(alice, image="alice/debian")
    assert job["image"] == {"name": "alice/debian", "digest": DIGEST,
                            "stores": ["https://store.example/v2"], "kind": None}

    # The name was resolved at enqueue: moving the name later does not move the job.
    r = await alice.put("/api/v1/images/alice/debian", {"digest": OTHER_DIGEST})
    assert r.status == 200, r.body
    shown = await alice.get(f"/api/v1/jobs/{job['id']}")
    assert shown.body["image"]["digest"] == DIGEST
    assert (await enqueue(alice, image="alice/debian"))["image"]["digest"] == OTHER_DIGEST
    row = await switchboard.store.pool.fetchone(
        "SELECT image_name, image_digest FROM jobs WHERE id = %s", (job["id"],))
    assert row == {"image_name": "alice/debian", "image_digest": DIGEST}


@pytest_twisted.ensureDeferred
async def test_enqueue_by_digest_lists_stores_of_usable_images_only(switchboard):
    alice, bob = await alices_image(switchboard, "alice/fw")
    image = (await enqueue(alice))["image"]
    assert image["stores"] == ["https://a.example"]
    # The entry it is fetched from (stores are read by repository).
    assert image["name"] == "alice/fw"
    # Bob may not use alice's image, so he learns nothing about where it lives.
    assert (await enqueue(bob))["image"] == {"name": None, "digest": DIGEST, "stores": [],
                                             "kind": None}


@pytest_twisted.ensureDeferred
async def test_enqueue_by_name_without_use_privilege(switchboard):
    alice, bob = await alices_image(switchboard, "alice/private")
    # An image bob may not use answers like one that does not exist (400).
    r = await bob.post("/api/v1/jobs", {"image": "alice/private"})
    assert r.status == 400, r.body
    assert r.body["error"] == {"code": "bad_request",
                               "message": "image: no image named 'alice/private' that you may use"}
    r = await bob.post("/api/v1/jobs", {"image": "nonexistent"})
    assert r.status == 400
    assert r.body["error"]["message"] == "image: no image named 'nonexistent' that you may use"
    listed = await switchboard.admin.get("/api/v1/jobs")
    assert listed.body["jobs"] == []

    r = await alice.post("/api/v1/images/alice/private/grants", {"user": "bob", "privilege": "use"})
    assert r.status == 201, r.body
    job = await enqueue(bob, image="alice/private")
    assert job["image"] == {"name": "alice/private", "digest": DIGEST,
                            "stores": ["https://a.example"], "kind": None}


# -- secrets ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_secret_parameters_are_redacted_everywhere(switchboard):
    alice = await switchboard.user("alice")
    body = {"image": DIGEST, "parameters": {
        "TOKEN": {"value": SECRET, "secret": True}, "PLAIN": {"value": "visible"}}}
    response = await treq.post(alice.url + "/api/v1/jobs", json.dumps(body).encode(),
                               headers=alice.headers())
    created = await response.content()
    assert response.code == 201
    assert SECRET.encode() not in created
    job = json.loads(created)
    expected = {"TOKEN": {"secret": True}, "PLAIN": {"value": "visible", "secret": False}}
    assert job["parameters"] == expected
    job_id = job["id"]

    # The switchboard keeps the value (a supervisor needs it) ...
    row = await switchboard.store.pool.fetchone(
        "SELECT parameters FROM jobs WHERE id = %s", (job_id,))
    assert row["parameters"]["TOKEN"] == {"value": SECRET, "secret": True}

    # ... but no read path shows it, to the owner or to an admin.
    for client in (alice, switchboard.admin):
        for path in (f"/api/v1/jobs/{job_id}", "/api/v1/jobs", "/api/v1/jobs?state=queued",
                     f"/api/v1/jobs/{job_id}/events"):
            code, raw = await raw_get(client, path)
            assert code == 200, (path, raw)
            assert SECRET.encode() not in raw, path
        shown = await client.get(f"/api/v1/jobs/{job_id}")
        assert shown.body["parameters"] == expected

    response = await treq.post(f"{alice.url}/api/v1/jobs/{job_id}/terminate",
                               headers=alice.headers())
    raw = await response.content()
    assert response.code == 200 and SECRET.encode() not in raw

    code, stream, _ = await watch(alice, job_id)
    assert code == 200
    await stream.done
    assert stream.states == ["queued", "terminated"]
    assert SECRET.encode() not in stream.raw


# -- listing -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_list_pagination_is_keyset_newest_first(switchboard):
    alice = await switchboard.user("alice")
    created = [(await enqueue(alice, label=f"job {i}"))["id"] for i in range(7)]

    pages: list[list[str]] = []
    cursor = None
    for _ in range(5):
        path = "/api/v1/jobs?limit=3" + (f"&cursor={cursor}" if cursor else "")
        r = await alice.get(path)
        assert r.status == 200, r.body
        pages.append([job["id"] for job in r.body["jobs"]])
        cursor = r.body.get("next_cursor")
        if cursor is None:
            break
    assert [len(page) for page in pages] == [3, 3, 1]
    flat = [job_id for page in pages for job_id in page]
    assert flat == list(reversed(created))  # newest first, no gaps, no duplicates

    # A job created while paging does not shift later pages.
    r = await alice.get("/api/v1/jobs?limit=3")
    first_cursor = r.body["next_cursor"]
    await enqueue(alice, label="late")
    r = await alice.get(f"/api/v1/jobs?limit=3&cursor={first_cursor}")
    assert [job["id"] for job in r.body["jobs"]] == pages[1]

    r = await alice.get("/api/v1/jobs?limit=8")
    assert len(r.body["jobs"]) == 8 and "next_cursor" not in r.body
    r = await alice.get("/api/v1/jobs")
    assert len(r.body["jobs"]) == 8 and "next_cursor" not in r.body


@pytest_twisted.ensureDeferred
async def test_list_filters_by_state_and_owner(switchboard):
    alice = await switchboard.user("alice")
    bob = await switchboard.user("bob")
    a1 = await enqueue(alice)
    a2 = await enqueue(alice)
    b1 = await enqueue(bob)
    r = await alice.post(f"/api/v1/jobs/{a2['id']}/terminate")
    assert r.status == 200 and r.body["state"] == "terminated"
    await put_in(switchboard.store, b1["id"], "assigned")

    admin = switchboard.admin

    async def ids(client: Client, query: str) -> list[str]:
        r = await client.get("/api/v1/jobs" + query)
        assert r.status == 200, r.body
        return [job["id"] for job in r.body["jobs"]]

    assert await ids(admin, "") == [b1["id"], a2["id"], a1["id"]]
    assert await ids(admin, "?state=queued") == [a1["id"]]
    assert await ids(admin, "?state=terminated") == [a2["id"]]
    assert await ids(admin, "?state=assigned") == [b1["id"]]
    assert await ids(admin, "?state=queued,terminated") == [a2["id"], a1["id"]]
    assert await ids(admin, "?state=queued&state=assigned") == [b1["id"], a1["id"]]
    assert await ids(admin, "?state=ready") == []
    assert await ids(admin, "?owner=alice") == [a2["id"], a1["id"]]
    assert await ids(admin, "?owner=bob&state=assigned") == [b1["id"]]
    assert await ids(admin, "?owner=bob&state=queued") == []
    assert await ids(admin, "?owner=nobody") == []
    # User names are compared without case (api.md, "Canonical names").
    assert await ids(admin, "?owner=ALICE") == [a2["id"], a1["id"]]
    assert await ids(admin, "?owner=Bob&state=assigned") == [b1["id"]]
    # A user's listing holds only what they may read, whatever the filter.
    assert await ids(alice, "") == [a2["id"], a1["id"]]
    assert await ids(alice, "?owner=bob") == []
    assert await ids(bob, "?state=queued") == []


@pytest_twisted.ensureDeferred
async def test_other_users_cannot_see_my_jobs_unless_granted(switchboard):
    alice = await switchboard.user("alice")
    bob = await switchboard.user("bob")
    carol = await switchboard.user("carol")
    job = await enqueue(alice, label="mine")
    job_id = job["id"]

    for path in (f"/api/v1/jobs/{job_id}", f"/api/v1/jobs/{job_id}/events",
                 f"/api/v1/jobs/{job_id}/grants"):
        r = await bob.get(path)
        assert r.status == 404 and r.body["error"]["code"] == "not_found", (path, r.body)
    r = await bob.post(f"/api/v1/jobs/{job_id}/terminate")
    assert r.status == 404
    r = await bob.post(f"/api/v1/jobs/{job_id}/grants", {"user": "bob", "privilege": "manage"})
    assert r.status == 404
    assert (await bob.get("/api/v1/jobs")).body["jobs"] == []
    assert (await alice.get(f"/api/v1/jobs/{job_id}")).body["state"] == "queued"

    r = await alice.post(f"/api/v1/jobs/{job_id}/grants", {"user": "bob", "privilege": "read"})
    assert r.status == 201, r.body
    assert r.body["user"] == "bob" and r.body["privilege"] == "read"
    r = await bob.get(f"/api/v1/jobs/{job_id}")
    assert r.status == 200 and r.body["label"] == "mine"
    assert [j["id"] for j in (await bob.get("/api/v1/jobs")).body["jobs"]] == [job_id]
    assert len(await events_of(bob, job_id)) == 1
    # Read is not stop, and not manage.
    r = await bob.post(f"/api/v1/jobs/{job_id}/terminate")
    assert r.status == 403 and r.body["error"]["code"] == "forbidden"
    r = await bob.get(f"/api/v1/jobs/{job_id}/grants")
    assert r.status == 403
    assert (await alice.get(f"/api/v1/jobs/{job_id}")).body["state"] == "queued"
    # Carol still sees nothing.
    assert (await carol.get(f"/api/v1/jobs/{job_id}")).status == 404
    assert (await carol.get("/api/v1/jobs")).body["jobs"] == []

    r = await alice.post(f"/api/v1/jobs/{job_id}/grants", {"user": "*", "privilege": "stop"})
    assert r.status == 201
    r = await carol.post(f"/api/v1/jobs/{job_id}/terminate")
    assert r.status == 200 and r.body["state"] == "terminated"
    events = await events_of(alice, job_id)
    assert events[-1]["message"] == "terminated by carol"

    r = await alice.delete(f"/api/v1/jobs/{job_id}/grants/bob/read")
    assert r.status == 204
    # Bob still holds stop (through "*"), which implies read: his list shows the job.
    assert (await bob.get(f"/api/v1/jobs/{job_id}")).status == 200
    assert [j["id"] for j in (await bob.get("/api/v1/jobs")).body["jobs"]] == [job_id]
    r = await alice.delete(f"/api/v1/jobs/{job_id}/grants/*/stop")
    assert r.status == 204
    assert (await bob.get(f"/api/v1/jobs/{job_id}")).status == 404
    assert (await bob.get("/api/v1/jobs")).body["jobs"] == []
    r = await alice.delete(f"/api/v1/jobs/{job_id}/grants/*/stop")
    assert r.status == 404


# -- terminate -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_terminate_queued_job_ends_it_at_once(switchboard):
    alice = await switchboard.user("alice")
    job = await enqueue(alice)
    r = await alice.post(f"/api/v1/jobs/{job['id']}/terminate")
    assert r.status == 200, r.body
    assert r.body["state"] == "terminated"
    assert r.body["termination"] == {"reason": "user_terminated", "exit_status": None,
                                     "message": "terminated by alice"}
    assert r.body["terminated_at"] is not None
    events = await events_of(alice, job["id"])
    assert [(e["seq"], e["state"], e["reason"]) for e in events] == [
        (1, "queued", None), (2, "terminated", "user_terminated")]
    assert events[1]["job"] == job["id"]


@pytest.mark.parametrize("state", ["assigned", "initializing", "ready"])
@pytest_twisted.ensureDeferred
async def test_terminate_active_job_starts_termination(switchboard, state):
    alice = await switchboard.user("alice")
    job = await enqueue(alice)
    job_id = job["id"]
    await put_in(switchboard.store, job_id, state)
    before = await events_of(alice, job_id)
    assert before[-1]["state"] == state

    r = await alice.post(f"/api/v1/jobs/{job_id}/terminate")
    assert r.status == 200, r.body
    assert r.body["state"] == "terminating" and r.body["stage"] is None
    assert r.body["terminated_at"] is None
    events = await events_of(alice, job_id)
    assert len(events) == len(before) + 1
    assert events[-1]["state"] == "terminating"
    assert events[-1]["reason"] == "user_terminated"
    assert events[-1]["message"] == "terminated by alice"
    row = await switchboard.store.pool.fetchone(
        "SELECT termination_reason, terminating_at FROM jobs WHERE id = %s", (job_id,))
    assert row["termination_reason"] == "user_terminated" and row["terminating_at"]

    # Asking again changes nothing.
    r = await alice.post(f"/api/v1/jobs/{job_id}/terminate")
    assert r.status == 200 and r.body["state"] == "terminating"
    assert len(await events_of(alice, job_id)) == len(events)

    # The host reports the end; the first reason stands.
    assert await switchboard.store.transition(
        job_id, Status(State.TERMINATED, reason=Reason.WORKLOAD_EXITED), exit_status=0)
    r = await alice.get(f"/api/v1/jobs/{job_id}")
    assert r.body["state"] == "terminated"
    assert r.body["termination"]["reason"] == "user_terminated"
    assert r.body["termination"]["exit_status"] == 0

    # Terminating a terminated job is a no-op that shows it.
    r = await alice.post(f"/api/v1/jobs/{job_id}/terminate")
    assert r.status == 200 and r.body["state"] == "terminated"
    assert r.body["termination"]["reason"] == "user_terminated"
    assert len(await events_of(alice, job_id)) == len(events) + 1


@pytest_twisted.ensureDeferred
async def test_terminate_terminated_job_is_a_noop(switchboard):
    alice = await switchboard.user("alice")
    job = await enqueue(alice)
    first = await alice.post(f"/api/v1/jobs/{job['id']}/terminate")
    second = await switchboard.admin.post(f"/api/v1/jobs/{job['id']}/terminate")
    assert second.status == 200
    assert second.body == first.body  # still alice's message, same timestamps
    assert len(await events_of(alice, job["id"])) == 2


# -- events ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_events_one_per_transition_and_after(switchboard):
    alice = await switchboard.user("alice")
    job_id = (await enqueue(alice))["id"]
    store = switchboard.store
    steps = [Status(State.ASSIGNED), Status(State.INITIALIZING, stage=Stage.STARTING),
             Status(State.INITIALIZING, stage=Stage.FETCHING_IMAGE),
             Status(State.INITIALIZING, stage=Stage.BOOTING), Status(State.READY),
             Status(State.TERMINATING, reason=Reason.WORKLOAD_EXITED),
             Status(State.TERMINATED, reason=Reason.WORKLOAD_EXITED)]
    for status in steps:
        assert await store.transition(job_id, status, exit_status=(
            3 if status.state is State.TERMINATED else None))
    # Repeats are idempotent: no event.
    assert not await store.transition(job_id, Status(State.TERMINATED,
                                                     reason=Reason.WORKLOAD_EXITED))

    events = await events_of(alice, job_id)
    assert [e["seq"] for e in events] == list(range(1, 9))
    assert [(e["state"], e["stage"]) for e in events] == [
        ("queued", None), ("assigned", None), ("initializing", "starting"),
        ("initializing", "fetching_image"), ("initializing", "booting"), ("ready", None),
        ("terminating", None), ("terminated", None)]
    assert events[-1]["reason"] == "workload_exited" and events[-1]["exit_status"] == 3
    assert all(e["job"] == job_id for e in events)
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)

    assert [e["seq"] for e in await events_of(alice, job_id, after=3)] == [4, 5, 6, 7, 8]
    assert await events_of(alice, job_id, after=8) == []
    assert await events_of(alice, job_id, after=100) == []
    assert [e["seq"] for e in await events_of(alice, job_id, after=0)] == list(range(1, 9))

    shown = (await alice.get(f"/api/v1/jobs/{job_id}")).body
    assert shown["termination"] == {"reason": "workload_exited", "exit_status": 3,
                                    "message": None}
    for stamp in ("assigned_at", "started_at", "ready_at", "terminated_at"):
        assert shown[stamp] is not None, stamp


@pytest_twisted.ensureDeferred
async def test_watch_streams_events_live_until_terminated(switchboard):
    alice = await switchboard.user("alice")
    job_id = (await enqueue(alice))["id"]
    code, stream, _ = await watch(alice, job_id)
    assert code == 200
    assert await wait_for(lambda: stream.states == ["queued"]), stream.raw
    assert stream.raw.startswith(b": watching job events\n\n")

    store = switchboard.store
    latencies = []
    for status in (Status(State.ASSIGNED), Status(State.INITIALIZING, stage=Stage.STARTING),
                   Status(State.READY)):
        count = len(stream.events)
        started = reactor.seconds()
        assert await store.transition(job_id, status)
        assert await wait_for(lambda n=count: len(stream.events) > n, timeout=2), stream.raw
        latencies.append(stream.arrived[-1] - started)
        assert stream.events[-1]["state"] == status.state.value
    assert not stream.finished

    r = await alice.post(f"/api/v1/jobs/{job_id}/terminate")
    assert r.body["state"] == "terminating"
    assert await wait_for(lambda: stream.states[-1:] == ["terminating"], timeout=2)
    assert not stream.finished
    started = reactor.seconds()
    assert await store.transition(job_id, Status(State.TERMINATED,
                                                 reason=Reason.WORKLOAD_EXITED))
    assert await wait_for(lambda: stream.finished, timeout=2), "the stream did not end"
    latencies.append(stream.arrived[-1] - started)
    await stream.done

    assert stream.states == ["queued", "assigned", "initializing", "ready", "terminating",
                             "terminated"]
    assert stream.ids == [e["seq"] for e in stream.events] == list(range(1, 7))
    assert stream.events == await events_of(alice, job_id)
    assert max(latencies) < 1.0, latencies


@pytest_twisted.ensureDeferred
async def test_watch_after_skips_earlier_events(switchboard):
    alice = await switchboard.user("alice")
    job_id = (await enqueue(alice))["id"]
    await put_in(switchboard.store, job_id, "initializing")  # seqs 1..3
    code, stream, _ = await watch(alice, job_id, after=2)
    assert code == 200
    assert await wait_for(lambda: stream.events, timeout=2)
    assert stream.ids == [3] and stream.states == ["initializing"]
    await alice.post(f"/api/v1/jobs/{job_id}/terminate")
    await switchboard.store.transition(job_id, Status(State.TERMINATED,
                                                      reason=Reason.WORKLOAD_EXITED))
    await stream.done
    assert stream.ids == [3, 4, 5]


@pytest_twisted.ensureDeferred
async def test_watch_of_terminated_job_replays_and_ends(switchboard):
    alice = await switchboard.user("alice")
    job_id = (await enqueue(alice))["id"]
    await alice.post(f"/api/v1/jobs/{job_id}/terminate")
    code, stream, _ = await watch(alice, job_id)
    assert code == 200
    await stream.done
    assert stream.states == ["queued", "terminated"]
    code, stream, _ = await watch(alice, job_id, after=1)
    await stream.done
    assert stream.ids == [2]


@pytest_twisted.ensureDeferred
async def test_a_reconnecting_event_source_resumes_and_is_told_to_stop(switchboard):
    """A browser's EventSource reconnects with its first URL and the last id it saw as
    ``Last-Event-ID``: the stream goes on from there, and once everything of an ended job
    was sent, 204 stops it (it replayed every event every 3 s, without end)."""
    alice = await switchboard.user("alice")
    job_id = (await enqueue(alice))["id"]
    await put_in(switchboard.store, job_id, "initializing")  # seqs 1..3
    code, stream, _ = await watch(alice, job_id, last_event_id="2")
    assert code == 200
    assert await wait_for(lambda: stream.events, timeout=2)
    assert stream.ids == [3]
    await alice.post(f"/api/v1/jobs/{job_id}/terminate")
    await switchboard.store.transition(job_id, Status(State.TERMINATED,
                                                      reason=Reason.WORKLOAD_EXITED))
    await stream.done
    assert stream.ids == [3, 4, 5]
    # Reconnecting after the end: nothing more, ever.
    code, stream, _ = await watch(alice, job_id, after=0, last_event_id="5")
    assert (code, stream.raw) == (204, b"")
    # Reconnecting after a break before the end: the rest, then the stream ends.
    code, stream, _ = await watch(alice, job_id, after=0, last_event_id="3")
    assert code == 200
    await stream.done
    assert stream.ids == [4, 5]
    # ?after= alone (tml, and the console's first connection) is answered as before.
    code, stream, _ = await watch(alice, job_id, after=5)
    assert code == 200
    await stream.done
    assert stream.ids == []
    # A Last-Event-ID that is not one of ours is ignored.
    code, stream, _ = await watch(alice, job_id, after=4, last_event_id="x")
    assert code == 200
    await stream.done
    assert stream.ids == [5]


@pytest_twisted.ensureDeferred
async def test_watch_requires_read(switchboard):
    alice = await switchboard.user("alice")
    bob = await switchboard.user("bob")
    job_id = (await enqueue(alice))["id"]
    code, stream, _ = await watch(bob, job_id)
    assert code == 404
    assert json.loads(stream.raw)["error"]["code"] == "not_found"
    assert SECRET.encode() not in stream.raw
    code, _, _ = await watch(bob, "00000000-0000-0000-0000-000000000000")
    assert code == 404
    code, stream, _ = await watch(Client(switchboard.url), job_id)
    assert code == 401

    await alice.post(f"/api/v1/jobs/{job_id}/grants", {"user": "bob", "privilege": "read"})
    code, stream, _ = await watch(bob, job_id)
    assert code == 200
    assert await wait_for(lambda: stream.states == ["queued"])
    await alice.post(f"/api/v1/jobs/{job_id}/terminate")
    await stream.done
    assert stream.states == ["queued", "terminated"]


# -- timeouts --------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def fast_switchboard(migrated_database, tmp_path):
    running = await start_switchboard(migrated_database, tmp_path, timeout_interval=0.1)
    try:
        yield running
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_queue_timeout_ends_queued_job(fast_switchboard):
    sb = fast_switchboard
    alice = await sb.user("alice")
    started = reactor.seconds()
    job = await enqueue(alice, queue_timeout=1)
    keep = await enqueue(alice)  # default queue timeout: stays queued

    async def state() -> dict:
        return (await alice.get(f"/api/v1/jobs/{job['id']}")).body

    ended = None
    while reactor.seconds() - started < 3:
        ended = await state()
        if ended["state"] == "terminated":
            break
        await sleep(0.05)
    elapsed = reactor.seconds() - started
    assert ended["state"] == "terminated", ended
    assert 0.9 <= elapsed <= 2.2, elapsed
    assert ended["termination"]["reason"] == "queue_timeout"
    events = await events_of(alice, job["id"])
    assert [(e["state"], e["reason"]) for e in events] == [
        ("queued", None), ("terminated", "queue_timeout")]
    assert (await alice.get(f"/api/v1/jobs/{keep['id']}")).body["state"] == "queued"


@pytest_twisted.ensureDeferred
async def test_execution_timeout_stops_assigned_job(fast_switchboard):
    sb = fast_switchboard
    alice = await sb.user("alice")
    job = await enqueue(alice, timeout=1, queue_timeout=60)
    # Time spent queued does not count.
    await sleep(1.2)
    assert (await alice.get(f"/api/v1/jobs/{job['id']}")).body["state"] == "queued"
    started = reactor.seconds()
    await put_in(sb.store, job["id"], "assigned")

    events: list[dict] = []
    while reactor.seconds() - started < 3:
        events = await events_of(alice, job["id"])
        if events[-1]["state"] == "terminating":
            break
        await sleep(0.05)
    elapsed = reactor.seconds() - started
    assert events[-1]["state"] == "terminating", events
    assert events[-1]["reason"] == "execution_timeout"
    assert 0.9 <= elapsed <= 2.2, elapsed
    # The enforcer leaves a terminating job for its host to finish.
    await sleep(0.3)
    assert len(await events_of(alice, job["id"])) == len(events)
