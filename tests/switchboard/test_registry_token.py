"""The registry token endpoint: the access each kind of caller gets."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.support import Client, RunningSwitchboard
from tests.switchboard.support import basic, grants
from treadmill.common.captoken import CapabilityError, CapabilityVerifier, parse_jwks
from treadmill.switchboard import credentials

DIGEST = "sha256:" + "d" * 64


@pytest_twisted.ensureDeferred
async def test_users_get_their_namespace_and_catalogue_images(
        switchboard: RunningSwitchboard) -> None:
    await switchboard.register_store("http://s.example", "store-1")
    alice = await switchboard.user("alice")
    bob = await switchboard.user("bob")
    r = await alice.post("/api/v1/images", {"name": "Alice/Demo", "digest": DIGEST,
                                            "stores": ["http://s.example"]})
    assert r.status == 201
    await alice.post("/api/v1/images/alice/demo/grants", {"user": "bob", "privilege": "use"})
    status, got = await grants(switchboard, alice, "repository:alice/fw:pull,push,delete",
                               "repository:alice/demo:pull,push", "repository:bob/x:pull",
                               "repository:fresh/new:push", "repository:alice:*")
    assert status == 200
    assert got == {"alice/fw": ("pull", "push", "delete"), "alice/demo": ("pull", "push"),
                   "alice": ("pull", "push", "delete")}  # No repository is open to all.
    status, got = await grants(switchboard, bob, "repository:alice/demo:pull,push",
                               "repository:alice:pull", "repository:alice/demo:*")
    assert got == {"alice/demo": ("pull",)}
    status, got = await grants(switchboard, switchboard.admin, "repository:alice/fw:delete",
                               "registry:catalog:*", "repository:demo:*")
    assert got == {"alice/fw": ("delete",), "catalog": ("*",),
                   "demo": ("pull", "push", "delete")}
    status, got = await grants(switchboard, None, "repository:alice/demo:pull")
    assert status == 200 and got == {}


@pytest_twisted.ensureDeferred
async def test_basic_credentials_with_a_token_or_a_password(
        switchboard: RunningSwitchboard) -> None:
    await switchboard.register_store("http://s.example", "store-1")
    alice = await switchboard.user("alice")
    await switchboard.store.update_user(
        "alice", password_hash=credentials.hash_password_sync("alice's password"))
    for secret in (alice.token, "alice's password"):
        status, got = await grants(switchboard, None, "repository:alice/x:push",
                                   headers=basic("alice", secret))
        assert (status, got) == (200, {"alice/x": ("push",)})
    for user, secret in (("alice", "wrong"), ("bob", alice.token), ("alice", "tmu_" + "x" * 43)):
        status, body = await grants(switchboard, None, "repository:alice/x:push",
                                    headers=basic(user, secret))
        assert status == 401, (user, body)


@pytest_twisted.ensureDeferred
async def test_a_host_may_pull_only_its_jobs_image(switchboard: RunningSwitchboard) -> None:
    await switchboard.register_store("http://s.example", "store-1")
    admin = switchboard.admin
    r = await admin.post("/api/v1/images", {"name": "fw/Blinky", "digest": DIGEST,
                                            "stores": ["http://s.example"]})
    assert r.status == 201
    host = await admin.post("/api/v1/hosts", {"name": "board-1", "tags": ["b"]})
    token = host.body["token"]
    status, got = await grants(switchboard, None, "repository:fw/blinky:pull",
                               headers={"authorization": f"Bearer {token}"})
    assert got == {}  # No job on the host yet.
    job = (await admin.post("/api/v1/jobs", {"image": "fw/Blinky", "tags": ["b"]})).body
    host_id = (await switchboard.store.host_by_token(credentials.token_hash(token)))["id"]
    await switchboard.store.pool.execute("UPDATE jobs SET host_id = %s, state = 'assigned' "
                                         "WHERE id = %s", (host_id, job["id"]))
    status, got = await grants(switchboard, None, "repository:fw/blinky:pull,push",
                               "repository:other:pull",
                               headers={"authorization": f"Bearer {token}"})
    assert (status, got) == (200, {"fw/blinky": ("pull",)})


@pytest.mark.parametrize("query", [
    "scope=repository:x:pull",  # no service
    "service=bad%20service&scope=repository:x:pull",
    "service=s&scope=repository:UPPER:pull",
    "service=s&scope=repository:../etc:pull",
    "service=s&scope=repository:x:fly",
    "service=s&scope=repository:x:*,fly",
    "service=s&scope=repository:x:",
    "service=s&scope=nonsense",
    "service=s&scope=%FF",
    "service=s&" + "&".join(f"scope=repository:r{i}:pull" for i in range(33)),
])
@pytest_twisted.ensureDeferred
async def test_malformed_requests(switchboard: RunningSwitchboard, query: str) -> None:
    r = await switchboard.admin.get(f"/api/v1/registry/token?{query}")
    assert r.status == 400 and r.error == "bad_request", r.body


@pytest_twisted.ensureDeferred
async def test_tokens_only_for_registered_services_with_their_audience(
        switchboard: RunningSwitchboard) -> None:
    """An unknown service gets a 400 and no token, whoever asks; a registered one gets a
    token whose audience is that service alone, which no other service accepts."""
    admin = switchboard.admin
    alice = await switchboard.user("alice")
    host = (await admin.post("/api/v1/hosts", {"name": "h"})).body["token"]
    callers: list[tuple[Client | None, dict[str, str]]] = [
        (None, {}), (alice, {}), (admin, {}), (None, basic("alice", alice.token)),
        (None, {"authorization": f"Bearer {host}"})]
    for client, headers in callers:
        status, body = await grants(switchboard, client, "repository:alice/fw:pull",
                                    service="evil-store", headers=headers)
        assert status == 400 and "evil-store" in body["error"]["message"], body
        assert "token" not in body
    r = await admin.post("/api/v1/stores", {"url": "https://A.example/", "service": "store-a"})
    assert r.status == 201, r.body
    assert (r.body["url"], r.body["service"], r.body["cache"]) == (
        "https://a.example", "store-a", False)
    await admin.post("/api/v1/stores", {"url": "https://b.example", "service": "store-b"})
    status, got = await grants(switchboard, alice, "repository:alice/fw:pull",
                               service="store-a")
    assert (status, got) == (200, {"alice/fw": ("pull",)})
    r = await alice.get("/api/v1/registry/token?service=store-a&scope=repository:alice/fw:pull")
    keys = parse_jwks((await Client(switchboard.url).get(
        "/.well-known/treadmill/capability-keys")).body)
    claims = CapabilityVerifier(keys, "treadmill", "store-a", reactor).verify_any(r.body["token"])
    assert claims.audience == ("store-a",)
    with pytest.raises(CapabilityError) as refused:
        CapabilityVerifier(keys, "treadmill", "store-b", reactor).verify_any(r.body["token"])
    assert refused.value.reason == "wrong_audience"
    # Unregistered again: no more tokens for it.
    assert (await admin.delete("/api/v1/stores/store-a")).status == 204
    status, _ = await grants(switchboard, alice, "repository:alice/fw:pull", service="store-a")
    assert status == 400


@pytest_twisted.ensureDeferred
async def test_listing_stores_needs_a_user_or_a_host(switchboard: RunningSwitchboard) -> None:
    admin = switchboard.admin
    await switchboard.register_store("https://a.example", "store-a", cache=True)
    host = (await admin.post("/api/v1/hosts", {"name": "h"})).body["token"]
    alice = await switchboard.user("alice")
    for client in (alice, Client(switchboard.url, host)):
        r = await client.get("/api/v1/stores")
        assert r.status == 200, r.body
        assert [(s["url"], s["service"], s["cache"]) for s in r.body["stores"]] == [
            ("https://a.example", "store-a", True)]
    for token in (None, "tmh_" + "x" * 43, "tmu_" + "x" * 43, "junk"):
        r = await Client(switchboard.url, token).get("/api/v1/stores")
        assert r.status == 401, (token, r.body)


@pytest_twisted.ensureDeferred
async def test_catalogue_and_job_starts_name_only_registered_stores(
        switchboard: RunningSwitchboard) -> None:
    admin = switchboard.admin
    await switchboard.register_store("https://a.example", "store-a")
    await switchboard.register_store("https://b.example/prefix", "store-b")
    for body in ({"stores": ["https://evil.example"]},
                 {"stores": ["https://a.example", "https://a.example.evil.example"]},
                 {"stores": ["https://b.example"]}):
        r = await admin.post("/api/v1/images", {"name": "img", "digest": DIGEST, **body})
        assert r.status == 400 and "registered" in r.body["error"]["message"], r.body
    assert (await admin.get("/api/v1/images")).body["images"] == []
    r = await admin.post("/api/v1/images", {"name": "img", "digest": DIGEST, "stores": [
        "https://A.example/", "https://b.example/prefix/"]})
    assert r.status == 201 and r.body["stores"] == ["https://a.example",
                                                    "https://b.example/prefix"], r.body
    r = await admin.put("/api/v1/images/img", {"stores": ["https://evil.example"]})
    assert r.status == 400, r.body
    assert (await admin.get("/api/v1/images/img")).body["stores"] == [
        "https://a.example", "https://b.example/prefix"]
    job = (await admin.post("/api/v1/jobs", {"image": "img"})).body
    start = await switchboard.store.job_start(job["id"])
    assert start["image_stores"] == ["https://a.example", "https://b.example/prefix"]
    # A store unregistered after the job was enqueued never reaches the host.
    assert (await admin.delete("/api/v1/stores/store-a")).status == 204
    start = await switchboard.store.job_start(job["id"])
    assert start["image_stores"] == ["https://b.example/prefix"]
    # ... and one smuggled into the database directly neither.
    await switchboard.store.pool.execute(
        "UPDATE jobs SET image_stores = %s WHERE id = %s",
        (["https://evil.example", "https://b.example/prefix"], job["id"]))
    start = await switchboard.store.job_start(job["id"])
    assert start["image_stores"] == ["https://b.example/prefix"]
