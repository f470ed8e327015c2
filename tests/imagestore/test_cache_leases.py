"""Leases and LRU eviction in the image cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.imagestore.support import (
    CACHE_SERVICE,
    Keys,
    Pair,
    Registry,
    RunningStore,
    digest_of,
    pair,
    start_cache,
    start_store,
)
from tests.util.waiting import eventually

BLOBS = [bytes([i]) * 1000 for i in range(1, 4)]  # A, B, C


def lease_token(keys: Keys, **kw: str) -> str:
    return keys.token(("cache", "leases", ["lease"]), audience=CACHE_SERVICE, **kw)


def gc_token(keys: Keys) -> str:
    return keys.token(("registry", "gc", ["*"]), audience=CACHE_SERVICE)


async def lease(reg: Registry, body: dict, token: str) -> tuple[int, dict]:
    r = await reg.request("POST", "/cache/leases", json.dumps(body).encode(),
                          {"content-type": "application/json"}, token=token)
    return r.code, (r.json if r.body else {})


async def pause() -> None:
    await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_lru_evicts_the_least_recently_used_unleased_blob(stores: Pair) -> None:
    keys, cache = stores.keys, stores.cache
    a, b, c = [await stores.up.push_blob("lab/fw", data) for data in BLOBS]
    for digest in (a, b, c, a):  # last use: B, C, A
        r = await stores.client.request("GET", f"/v2/lab/fw/blobs/{digest}")
        assert r.code == 200
        await pause()
    code, body = await lease(cache.registry, {"digests": [b], "holder": "host-1/job-7",
                                              "ttl": 600}, lease_token(keys))
    assert code == 201 and body["state"] == "ready" and body["missing"] == [], body
    assert body["holder"] == "host-1/job-7" and 590 < body["expires_in"] <= 600

    state = cache.service.cache
    state.config.max_bytes = 2500
    r = await cache.registry.request("POST", "/admin/evict", token=gc_token(keys))
    assert r.code == 200, r.body
    summary = r.json
    assert summary["evicted"] == 1 and summary["freed_bytes"] == 1000, summary
    assert summary["total_bytes"] == 2000 and summary["protected"] == 1
    storage = cache.storage
    assert storage.has_blob(a) and storage.has_blob(b) and not storage.has_blob(c)
    assert not os.path.exists(os.path.join(storage.repo_path("lab/fw"), "_blobs", c[7:]))

    # A later miss fetches it again; that commit takes the cache over its bound,
    # and the eviction that follows takes A (B is leased, C just used).
    r = await stores.client.request("GET", f"/v2/lab/fw/blobs/{c}")
    assert r.code == 200 and r.body == BLOBS[2]
    await eventually(lambda: not storage.has_blob(a))  # The eviction runs in a thread.
    assert not storage.has_blob(a) and storage.has_blob(b) and storage.has_blob(c)
    assert state.total_bytes == 2000 and state.evicted_blobs == 2


@pytest_twisted.ensureDeferred
async def test_leases_fetch_survive_a_restart_and_protect_what_they_reference(
        tmp_path: Path, keys: Keys) -> None:
    stores = await pair(tmp_path, keys)
    cache = stores.cache
    try:
        image, manifest = await stores.up.push_image("lab/fw", "v1", [b"L1" * 700, b"L2" * 900])
        needed = [image, manifest["config"]["digest"],
                  *(layer["digest"] for layer in manifest["layers"])]
        loose, other = (await stores.up.push_blob("lab/fw", b"loose" * 100),
                        await stores.up.push_blob("lab/fw", b"other" * 100))
        for digest in (loose, other):
            assert (await stores.client.request("GET", f"/v2/lab/fw/blobs/{digest}")).code == 200
        # A supervisor's lease by a repository pull token: the cache fetches the
        # image (manifest and every blob) before the supervisor opens it over NFS.
        pull = keys.repo("lab/fw", "pull", audience=CACHE_SERVICE)
        code, body = await lease(cache.registry, {
            "lease": "job-42", "holder": "host-1", "digests": [image],
            "repository": "lab/fw", "ttl": 600, "wait": 10}, pull)
        assert code == 201, body
        assert body["lease"] == "job-42" and body["state"] == "ready", body
        for digest in needed:
            assert cache.storage.has_blob(digest), digest
        # And one for a loose blob, with the cache's lease token.
        code, body = await lease(cache.registry, {"digests": [loose], "holder": "host-2"},
                                 lease_token(keys))
        assert code == 201
        loose_lease = body["lease"]
        lease_file = os.path.join(cache.storage.cache, "leases", "job-42.json")
        assert json.loads(Path(lease_file).read_text())["digests"] == [image]

        await cache.stop()
        cache = await start_cache(tmp_path / "cache", keys, [stores.upstream.url])
        r = await cache.registry.request("GET", "/cache/leases/job-42", token=pull)
        assert r.code == 200 and r.json["state"] == "ready", r.body
        r = await cache.registry.request("GET", "/cache/leases", token=lease_token(keys))
        assert sorted(le["lease"] for le in r.json["leases"]) == sorted(["job-42", loose_lease])

        # Garbage collection spares the leased loose blob and takes the other one.
        r = await cache.registry.request("POST", "/admin/gc", token=gc_token(keys))
        assert r.code == 200
        assert cache.storage.has_blob(loose) and not cache.storage.has_blob(other)
        # Eviction down to nothing: everything leased stays.
        cache.service.cache.config.max_bytes = 1
        r = await cache.registry.request("POST", "/admin/evict", token=gc_token(keys))
        assert r.code == 200 and r.json["evicted"] == 0, r.body
        for digest in [*needed, loose]:
            assert cache.storage.has_blob(digest), digest

        # Released: evicted. The manifest and its tag stay "partial"; a later
        # pull fetches what is missing again.
        r = await cache.registry.request("DELETE", "/cache/leases/job-42", token=pull)
        assert r.code == 204
        r = await cache.registry.request("GET", "/cache/leases/job-42", token=pull)
        assert r.code == 401  # a repository token cannot tell a gone lease from another's
        r = await cache.registry.request("GET", "/cache/leases/job-42", token=lease_token(keys))
        assert r.code == 404 and r.error == "LEASE_UNKNOWN"
        assert not os.path.exists(lease_file)
        r = await cache.registry.request("POST", "/admin/evict", token=gc_token(keys))
        assert r.json["evicted"] == len(needed), r.body
        links = os.path.join(cache.storage.repo_path("lab/fw"), "_manifests")
        assert os.listdir(links) == [image[7:]]
        assert not cache.storage.has_blob(image)
        client = cache.registry.with_token(pull)
        r = await client.request("GET", f"/v2/lab/fw/manifests/{image}")
        assert r.code == 200 and r.header("docker-content-digest") == image
        layer = manifest["layers"][0]["digest"]
        r = await client.request("GET", f"/v2/lab/fw/blobs/{layer}")
        assert r.code == 200 and r.body == b"L1" * 700
    finally:
        await cache.stop()
        await stores.upstream.stop()


@pytest_twisted.ensureDeferred
async def test_lease_renewal_expiry_and_refusals(stores: Pair) -> None:
    keys, reg = stores.keys, stores.cache.registry
    state = stores.cache.service.cache
    digest = await stores.up.push_blob("lab/fw", b"bytes")
    body = {"lease": "job-1", "holder": "host-a", "digests": [digest], "ttl": 60}

    # No token, or the wrong one: 401 with the scopes to ask for.
    r = await reg.request("POST", "/cache/leases", json.dumps(body).encode())
    assert r.code == 401 and 'scope="cache:leases:lease"' in r.header("www-authenticate")
    code, _ = await lease(reg, {**body, "repository": "lab/fw"},
                          keys.repo("lab/other", "pull", audience=CACHE_SERVICE))
    assert code == 401
    code, _ = await lease(reg, body, keys.repo("lab/fw", "pull", audience=CACHE_SERVICE))
    assert code == 401
    code, _ = await lease(reg, body, keys.token(("cache", "leases", ["lease"])))  # wrong aud
    assert code == 401

    code, created = await lease(reg, body, lease_token(keys))
    assert code == 201 and created["state"] == "incomplete" and created["missing"] == [digest]
    # Renewal: the same id and holder; a longer ttl than cache.lease_max is shortened.
    state.config.lease_max = 300
    code, renewed = await lease(reg, {"lease": "job-1", "holder": "host-a", "ttl": 10_000},
                                lease_token(keys))
    assert code == 200 and renewed["digests"] == [digest], renewed
    assert 290 < renewed["expires_in"] <= 300
    code, conflict = await lease(reg, {**body, "holder": "host-b"}, lease_token(keys))
    assert code == 409 and conflict["errors"][0]["code"] == "LEASE_CONFLICT"

    # A lease made with a repository token is its subject's alone.
    mine = keys.repo("lab/fw", "pull", audience=CACHE_SERVICE, subject="bob")
    code, _ = await lease(reg, {"lease": "bobs", "holder": "h", "digests": [digest],
                                "repository": "lab/fw", "fetch": False}, mine)
    assert code == 201
    theirs = keys.repo("lab/fw", "pull", audience=CACHE_SERVICE, subject="carol")
    r = await reg.request("DELETE", "/cache/leases/bobs", token=theirs)
    assert r.code == 403 and r.error == "DENIED"
    code, _ = await lease(reg, {"lease": "bobs", "holder": "h", "repository": "lab/fw",
                                "fetch": False}, theirs)
    assert code == 403
    r = await reg.request("GET", "/cache/leases/job-1", token=mine)
    assert r.code == 401  # made with the cache token: not a repository lease
    r = await reg.request("GET", "/cache/leases", token=mine)
    assert r.code == 401

    # Malformed requests.
    for bad, error in (({**body, "digests": ["sha256:xyz"]}, "DIGEST_INVALID"),
                       ({**body, "holder": ""}, "REQUEST_INVALID"),
                       ({**body, "lease": "../x"}, "REQUEST_INVALID"),
                       ({**body, "ttl": -1}, "REQUEST_INVALID"),
                       ({**body, "fetch": True}, "REQUEST_INVALID"),
                       ({"holder": "h"}, "REQUEST_INVALID")):
        code, answer = await lease(reg, bad, lease_token(keys))
        assert code == 400 and answer["errors"][0]["code"] == error, (bad, answer)

    # Replication needs its own grant.
    r = await reg.request("POST", "/cache/replicate", b"{}", token=lease_token(keys))
    assert r.code == 401 and 'scope="cache:replicate:*"' in r.header("www-authenticate")
    r = await reg.request("GET", "/cache/replicate/nope")
    assert r.code == 401

    # Expiry: the maintenance removes expired leases, from memory and disk.
    for name in ("job-1", "bobs"):
        state.leases.leases[name].expires_at = state.now() - 1
    assert digest not in state.protection()
    await state.maintain()
    assert state.leases.leases == {}
    assert os.listdir(state.leases.directory) == []
    r = await reg.request("DELETE", "/cache/leases/job-1", token=lease_token(keys))
    assert r.code == 404 and r.error == "LEASE_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_leases_of_one_repository_token_subject_are_bounded(stores: Pair) -> None:
    """Anyone who may pull one repository may lease: without a bound, one subject could
    pin any cached blob it knows the digest of under ever more lease files, for up to
    cache.lease_max each, and keep the cache over its size for good."""
    keys, reg = stores.keys, stores.cache.registry
    state = stores.cache.service.cache
    assert state.leases_per_owner == 64
    state.leases_per_owner = 3
    digest = await stores.up.push_blob("lab/fw", b"bytes")
    bob = keys.repo("lab/fw", "pull", audience=CACHE_SERVICE, subject="bob")
    carol = keys.repo("lab/fw", "pull", audience=CACHE_SERVICE, subject="carol")

    def body(lease_id: str) -> dict:
        return {"lease": lease_id, "holder": "h", "digests": [digest], "repository": "lab/fw",
                "fetch": False}

    for n in range(3):
        code, _ = await lease(reg, body(f"bob-{n}"), bob)
        assert code == 201
    r = await reg.request("POST", "/cache/leases", json.dumps(body("bob-3")).encode(),
                          {"content-type": "application/json"}, token=bob)
    assert r.code == 429 and r.error == "TOOMANYREQUESTS", (r.code, r.body)
    assert r.header("retry-after") and "bob" in r.json["errors"][0]["message"]
    assert sorted(os.listdir(state.leases.directory)) == [f"bob-{n}.json" for n in range(3)]
    # Renewing one of them, another subject and the cache's lease token are not refused.
    code, _ = await lease(reg, body("bob-0"), bob)
    assert code == 200
    code, _ = await lease(reg, body("carol-0"), carol)
    assert code == 201
    code, _ = await lease(reg, {**body("ops-1"), "repository": None}, lease_token(keys))
    assert code == 201
    # Once one has gone, bob may lease again.
    r = await reg.request("DELETE", "/cache/leases/bob-1", token=bob)
    assert r.code == 204
    code, _ = await lease(reg, body("bob-3"), bob)
    assert code == 201


@pytest_twisted.ensureDeferred
async def test_a_lease_fetch_reports_what_upstream_lacks(stores: Pair) -> None:
    missing = digest_of(b"nowhere")
    code, body = await lease(stores.cache.registry, {
        "holder": "h", "digests": [missing], "repository": "lab/fw", "wait": 10},
        lease_token(stores.keys))
    assert code == 201 and body["state"] == "failed", body
    assert body["missing"] == [missing] and "BLOB_UNKNOWN" in body["error"]


@pytest_twisted.ensureDeferred
async def test_the_last_use_index_survives_a_restart(tmp_path: Path, keys: Keys) -> None:
    upstream = await start_store(tmp_path / "upstream", keys)
    up = upstream.registry.with_token(keys.repo("lab/fw", "pull", "push"))
    cache: RunningStore = await start_cache(tmp_path / "cache", keys, [upstream.url])
    try:
        client = cache.registry.with_token(keys.repo("lab/fw", "pull", audience=CACHE_SERVICE))
        a, b = [await up.push_blob("lab/fw", data) for data in BLOBS[:2]]
        for digest in (a, b, a):
            assert (await client.request("GET", f"/v2/lab/fw/blobs/{digest}")).code == 200
            await pause()
        # B was committed after A, but A was used last.
        os.utime(cache.storage.blob_path(b), (1, 2**31))
        await cache.stop()
        usage = json.loads((Path(cache.storage.cache) / "usage.json").read_text())
        assert set(usage["last_use"]) == {a[7:], b[7:]}
        cache = await start_cache(tmp_path / "cache", keys, [upstream.url],
                                  {"max_bytes": 1500})
        # (Eviction also starts by itself when a started cache is over its bound.)
        r = await cache.registry.request("POST", "/admin/evict", token=gc_token(keys))
        assert r.code == 200 and r.json["total_bytes"] == 1000
        assert cache.service.cache.evicted_blobs == 1
        assert cache.storage.has_blob(a) and not cache.storage.has_blob(b)
    finally:
        await cache.stop()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_periodic_maintenance(tmp_path: Path, keys: Keys) -> None:
    upstream = await start_store(tmp_path / "upstream", keys)
    cache = await start_cache(tmp_path / "cache", keys, [upstream.url],
                              {"maintenance_interval": 0.05})
    try:
        state = cache.service.cache
        digest = await upstream.registry.with_token(
            keys.repo("lab/fw", "push")).push_blob("lab/fw", b"x" * 100)
        code, body = await lease(cache.registry, {"digests": [digest], "holder": "h"},
                                 lease_token(keys))
        assert code == 201
        state.leases.leases[body["lease"]].expires_at = state.now() - 1
        client = cache.registry.with_token(keys.repo("lab/fw", "pull", audience=CACHE_SERVICE))
        assert (await client.request("GET", f"/v2/lab/fw/blobs/{digest}")).code == 200
        state.config.max_bytes = 10
        usage = Path(state.storage.cache) / "usage.json"
        await eventually(lambda: not state.leases.leases and usage.exists()
                         and not cache.storage.has_blob(digest))
        assert state.leases.leases == {} and usage.exists()
        assert not cache.storage.has_blob(digest)
    finally:
        await cache.stop()
        await upstream.stop()
