"""The image cache pulls through from its upstream stores (real stores on loopback)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.imagestore.support import (
    CACHE_SERVICE,
    Keys,
    Pair,
    RunningStore,
    count_requests,
    digest_of,
    start_cache,
    start_store,
)
from tests.util.waiting import within

LAYERS = [b"layer one " * 300, b"layer two " * 500]


def blob_file(store: RunningStore, digest: str) -> bytes:
    with open(store.storage.blob_path(digest), "rb") as f:
        return f.read()


@pytest_twisted.ensureDeferred
async def test_pull_through_by_tag_and_digest(stores: Pair) -> None:
    manifest_digest, manifest = await stores.up.push_image("lab/fw", "v1", LAYERS)
    upstream_manifest = blob_file(stores.upstream, manifest_digest)
    log = count_requests(stores.upstream)
    cache = stores.cache.storage

    r = await stores.client.request("GET", "/v2/lab/fw/manifests/v1")
    assert r.code == 200, r.body
    assert r.body == upstream_manifest
    assert r.header("docker-content-digest") == manifest_digest
    assert r.header("content-type") == "application/vnd.oci.image.manifest.v1+json"
    # Committed into the ordinary layout: blob, manifest link, tag.
    assert cache.read_tag("lab/fw", "v1") == manifest_digest
    assert cache.manifest_media_type("lab/fw", manifest_digest) is not None
    assert blob_file(stores.cache, manifest_digest) == upstream_manifest

    # By digest, and again by tag: served from the cache.
    before = len(log)
    r = await stores.client.request("GET", f"/v2/lab/fw/manifests/{manifest_digest}")
    assert r.code == 200 and r.body == upstream_manifest
    r = await stores.client.request("HEAD", "/v2/lab/fw/manifests/v1")
    assert r.code == 200 and r.header("docker-content-digest") == manifest_digest
    assert len(log) == before

    # Blobs: fetched on first use, byte-identical, read-only, linked into the repository.
    for desc in [manifest["config"], *manifest["layers"]]:
        digest = desc["digest"]
        assert not cache.has_blob(digest)
        r = await stores.client.request("GET", f"/v2/lab/fw/blobs/{digest}")
        assert r.code == 200, r.body
        assert r.body == blob_file(stores.upstream, digest)
        assert digest_of(r.body) == digest
        assert blob_file(stores.cache, digest) == r.body
        assert os.stat(cache.blob_path(digest)).st_mode & 0o777 == 0o440
        assert cache.blob_linked("lab/fw", digest)
    before = len(log)
    layer = manifest["layers"][1]["digest"]
    r = await stores.client.request("GET", f"/v2/lab/fw/blobs/{layer}",
                                    headers={"range": "bytes=10-19"})
    assert r.code == 206 and r.body == LAYERS[1][10:20]
    r = await stores.client.request("HEAD", f"/v2/lab/fw/blobs/{layer}")
    assert r.code == 200 and r.header("content-length") == str(len(LAYERS[1]))
    assert len(log) == before, log[before:]
    # Nothing is left behind in the scratch directory.
    assert os.listdir(cache.tmp) == []

    # A manifest by digest that was never fetched by tag.
    other_digest, _ = await stores.up.push_image("lab/fw", "v2", [b"other layer"])
    r = await stores.client.request("GET", f"/v2/lab/fw/manifests/{other_digest}")
    assert r.code == 200 and digest_of(r.body) == other_digest
    assert cache.read_tag("lab/fw", "v2") is None

    # What no upstream has: the ordinary 404s, nothing committed.
    r = await stores.client.request("GET", "/v2/lab/fw/manifests/nope")
    assert r.code == 404 and r.error == "MANIFEST_UNKNOWN"
    missing = digest_of(b"not anywhere")
    r = await stores.client.request("GET", f"/v2/lab/fw/blobs/{missing}")
    assert r.code == 404 and r.error == "BLOB_UNKNOWN"
    r = await stores.client.request("HEAD", f"/v2/lab/fw/manifests/{missing}")
    assert r.code == 404
    # The cache checks tokens as a store does.
    r = await stores.cache.registry.request("GET", "/v2/lab/fw/manifests/v1")
    assert r.code == 401


@pytest_twisted.ensureDeferred
async def test_tags_are_refreshed_from_upstream(stores: Pair) -> None:
    first, _ = await stores.up.push_image("lab/fw", "latest", [b"first"])
    r = await stores.client.request("GET", "/v2/lab/fw/manifests/latest")
    assert r.header("docker-content-digest") == first
    second, _ = await stores.up.push_image("lab/fw", "latest", [b"second"])
    # Within cache.tag_refresh the cached tag is served...
    r = await stores.client.request("GET", "/v2/lab/fw/manifests/latest")
    assert r.header("docker-content-digest") == first
    # ...then the upstream is asked again and the tag follows it.
    config = stores.cache.service.cache.config
    config.tag_refresh = 0.0
    r = await stores.client.request("GET", "/v2/lab/fw/manifests/latest")
    assert r.code == 200 and r.header("docker-content-digest") == second
    assert stores.cache.storage.read_tag("lab/fw", "latest") == second
    # An upstream that is gone: the cached tag is served.
    await stores.upstream.stop()
    for upstream_client in stores.cache.service.cache.pull.clients:
        await upstream_client.close()
    r = await stores.client.request("GET", "/v2/lab/fw/manifests/latest")
    assert r.code == 200 and r.header("docker-content-digest") == second


@pytest_twisted.ensureDeferred
async def test_concurrent_misses_fetch_once(stores: Pair) -> None:
    manifest_digest, manifest = await stores.up.push_image("lab/fw", "v1", LAYERS)
    layer = manifest["layers"][0]["digest"]
    log = count_requests(stores.upstream)
    cache = stores.cache.service.cache
    client = cache.pull.clients[0]
    original = client.pull_blob
    gate: Deferred[None] = Deferred()
    calls: list[str] = []

    async def gated(repo: str, digest: str, dest: Any, **kw: Any) -> Any:
        calls.append(digest)
        await gate
        return await original(repo, digest, dest, **kw)

    client.pull_blob = gated  # type: ignore[method-assign]

    async def get(path: str) -> Any:
        return await stores.client.request("GET", path)

    gets = [Deferred.fromCoroutine(get(f"/v2/lab/fw/blobs/{layer}")) for _ in range(6)]
    gets += [Deferred.fromCoroutine(get("/v2/lab/fw/manifests/v1")) for _ in range(3)]
    # Wait until all six blob requests are waiting on the one fetch.
    for _ in range(200):
        if cache.pins[layer] == 6 and calls:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert cache.pins[layer] == 6 and calls == [layer]
    # A client that goes away stops waiting; the fetch goes on for the others.
    gone = gets.pop(0)
    gone.cancel()
    gone.addErrback(lambda _: None)
    for _ in range(200):
        if cache.pins[layer] == 5:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert cache.pins[layer] == 5
    gate.callback(None)
    responses = [await d for d in gets]
    for r in responses[:5]:
        assert r.code == 200 and r.body == LAYERS[0]
    for r in responses[5:]:
        assert r.code == 200 and r.header("docker-content-digest") == manifest_digest
    assert calls == [layer]
    blob_gets = [entry for entry in log if entry == ("GET", f"/v2/lab/fw/blobs/{layer}")]
    assert len(blob_gets) == 1, log
    manifest_gets = [entry for entry in log if entry[1].startswith("/v2/lab/fw/manifests/")]
    assert len(manifest_gets) == 1, log
    assert cache.pull.blob_fetches == 1 and cache.pins[layer] == 0


@pytest_twisted.ensureDeferred
async def test_a_blob_cached_for_one_repository_is_linked_to_another_only_if_upstream_has_it(
        stores: Pair) -> None:
    keys = stores.keys
    await stores.up.push_blob("lab/fw", b"shared bytes")
    digest = digest_of(b"shared bytes")
    r = await stores.client.request("GET", f"/v2/lab/fw/blobs/{digest}")
    assert r.code == 200
    other = stores.cache.registry.with_token(keys.repo("lab/other", "pull",
                                                       audience=CACHE_SERVICE))
    log = count_requests(stores.upstream)
    r = await other.request("GET", f"/v2/lab/other/blobs/{digest}")
    assert r.code == 404 and r.error == "BLOB_UNKNOWN"
    assert not stores.cache.storage.blob_linked("lab/other", digest)
    upstream_other = stores.upstream.registry.with_token(keys.repo("lab/other", "push"))
    await upstream_other.push_blob("lab/other", b"shared bytes")
    r = await other.request("GET", f"/v2/lab/other/blobs/{digest}")
    assert r.code == 200 and r.body == b"shared bytes"
    # Confirmed with a HEAD; the bytes were not downloaded again.
    assert [m for m, uri in log if uri == f"/v2/lab/other/blobs/{digest}"] == ["HEAD", "HEAD"]


class _Failing(Resource):
    """An upstream that answers ``status`` (500) to everything."""

    isLeaf = True

    def __init__(self, status: int = 500) -> None:
        super().__init__()
        self.requests = 0
        self.status = status

    def render(self, request: Any) -> bytes:
        self.requests += 1
        request.setResponseCode(self.status)
        return b"broken"


@pytest_twisted.ensureDeferred
async def test_unavailable_upstreams_get_upstream_retries_attempts_each(
        tmp_path: Path, keys: Keys) -> None:
    """Upstreams answering 503 get ``cache.upstream_retries`` attempts each, then the
    client gets its 503 and Retry-After: not the minute registry clients wait for a
    store that has no other to try."""
    unavailable = [_Failing(503), _Failing(503)]
    ports = [reactor.listenTCP(0, Site(u), interface="127.0.0.1") for u in unavailable]
    urls = [f"http://127.0.0.1:{p.getHost().port}" for p in ports]
    cache = await start_cache(tmp_path / "cache", keys, urls,
                              {"upstream_retries": 3, "upstream_backoff": 0.01})
    client = cache.registry.with_token(keys.repo("lab/fw", "pull", audience=CACHE_SERVICE))
    try:
        for n, path in enumerate((f"/v2/lab/fw/blobs/{digest_of(b'x')}",
                                  "/v2/lab/fw/manifests/v1"), start=1):
            r = await within(Deferred.fromCoroutine(client.request("GET", path)), 20.0)
            assert r.code == 503 and r.error == "UNAVAILABLE", (path, r.code, r.body)
            assert r.header("retry-after") == "3"
            assert [u.requests for u in unavailable] == [3 * n, 3 * n]
    finally:
        await cache.stop()
        for port in ports:
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_upstream_down_answers_503_then_recovers(tmp_path: Path, keys: Keys) -> None:
    failing = _Failing()
    failing_port = reactor.listenTCP(0, Site(failing), interface="127.0.0.1")
    failing_url = f"http://127.0.0.1:{failing_port.getHost().port}"
    upstream = await start_store(tmp_path / "upstream", keys)
    up = upstream.registry.with_token(keys.repo("lab/fw", "pull", "push"))
    manifest_digest, manifest = await up.push_image("lab/fw", "v1", LAYERS)
    port = upstream.port
    cache = await start_cache(tmp_path / "cache", keys, [failing_url, upstream.url])
    client = cache.registry.with_token(keys.repo("lab/fw", "pull", audience=CACHE_SERVICE))
    try:
        # The first upstream answers 500: the next one is tried.
        r = await client.request("GET", "/v2/lab/fw/manifests/v1")
        assert r.code == 200 and failing.requests == 1
        await upstream.stop()
        # A stopped listener leaves established connections open; a dead process
        # would not: drop the cache's idle keep-alive connections to it.
        for upstream_client in cache.service.cache.pull.clients:
            await upstream_client.close()
        layer = manifest["layers"][0]["digest"]
        for path in (f"/v2/lab/fw/blobs/{layer}", "/v2/lab/fw/manifests/v2",
                     f"/v2/lab/fw/manifests/{digest_of(b'x')}"):
            r = await client.request("GET", path)
            assert r.code == 503, (path, r.code, r.body)
            assert r.error == "UNAVAILABLE"
            assert r.header("retry-after") == "3"
            message = r.json["errors"][0]["message"]
            assert upstream.url in message and failing_url in message, message
            assert "connection refused" in message and "500" in message, message
        assert not cache.storage.has_blob(layer)
        # What the cache holds is still served.
        r = await client.request("GET", f"/v2/lab/fw/manifests/{manifest_digest}")
        assert r.code == 200
        # The upstream comes back (same root and port): the cache recovers.
        upstream = await start_store(tmp_path / "upstream", keys,
                                     listen=[f"tcp:{port}:interface=127.0.0.1"])
        r = await client.request("GET", f"/v2/lab/fw/blobs/{layer}")
        assert r.code == 200 and r.body == LAYERS[0]
    finally:
        await cache.stop()
        await upstream.stop()
        await failing_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_corrupt_upstream_content_is_refused_and_not_committed(stores: Pair) -> None:
    manifest_digest, manifest = await stores.up.push_image("lab/fw", "v1", LAYERS)
    layer = manifest["layers"][1]["digest"]
    # Flip bytes of the layer on the upstream's disk (same size).
    path = stores.upstream.storage.blob_path(layer)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"CORRUPT")
    r = await stores.client.request("GET", f"/v2/lab/fw/blobs/{layer}")
    assert r.code == 502, r.body
    assert r.error == "UNAVAILABLE"
    assert "does not match its digest" in r.json["errors"][0]["message"]
    cache = stores.cache.storage
    assert not cache.has_blob(layer) and not cache.blob_linked("lab/fw", layer)
    assert os.listdir(cache.tmp) == []
    # A corrupt manifest too.
    path = stores.upstream.storage.blob_path(manifest_digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b" ")
    r = await stores.client.request("GET", f"/v2/lab/fw/manifests/{manifest_digest}")
    assert r.code == 502 and r.error == "UNAVAILABLE", r.body
    assert not cache.has_blob(manifest_digest)


@pytest_twisted.ensureDeferred
async def test_pushes_to_a_cache_work_as_to_a_store(stores: Pair) -> None:
    pusher = stores.cache.registry.with_token(
        stores.keys.repo("lab/fw", "pull", "push", audience=CACHE_SERVICE))
    digest, _ = await pusher.push_image("lab/fw", "local", [b"made on site"])
    r = await stores.client.request("GET", "/v2/lab/fw/manifests/local")
    assert r.code == 200 and r.header("docker-content-digest") == digest
    assert stores.cache.service.cache.total_bytes > 0


@pytest_twisted.ensureDeferred
async def test_a_plain_store_has_no_cache_api(store: RunningStore) -> None:
    for method, path in (("POST", "/cache/leases"), ("GET", "/cache/replicate/x"),
                         ("POST", "/admin/evict")):
        r = await store.registry.request(method, path, b"{}")
        assert r.code == 404 and r.error == "UNSUPPORTED", (path, r.body)
