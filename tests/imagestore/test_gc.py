"""Garbage collection removes exactly the blobs no manifest references."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.imagestore.support import OCI_INDEX, OCI_MANIFEST, RunningStore, digest_of, start_store


def age(store: RunningStore, digest: str, seconds: float = 7200.0) -> None:
    """Make a blob look committed ``seconds`` ago."""
    then = time.time() - seconds
    os.utime(store.storage.blob_path(digest), (then, then))


@pytest_twisted.ensureDeferred
async def test_gc_removes_only_unreferenced_blobs(open_store: RunningStore) -> None:
    reg = open_store.registry
    storage = open_store.storage
    kept_image, kept_manifest = await reg.push_image("lab/a", "v1", [b"shared", b"only a"])
    gone_image, _ = await reg.push_image("lab/b", "v1", [b"shared", b"only b"],
                                                     config=b'{"b": 1}')
    child, child_manifest = await reg.push_image("lab/multi", "amd64", [b"multi layer"])
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [{"mediaType": OCI_MANIFEST, "digest": child,
                            "size": len(json.dumps(child_manifest).encode())}]}
    r = await reg.push_manifest("lab/multi", "latest", index, OCI_INDEX)
    index_digest = r.header("docker-content-digest")
    # The child stays referenced by the index even without its own tag.
    r = await reg.request("DELETE", "/v2/lab/multi/manifests/amd64")
    assert r.code == 202
    orphan = await reg.push_blob("lab/a", b"uploaded, never referenced")
    r = await reg.request("DELETE", f"/v2/lab/b/manifests/{gone_image}")
    assert r.code == 202

    r = await reg.request("POST", "/admin/gc")
    assert r.code == 200, r.body
    summary = r.json
    gone = {orphan, gone_image, digest_of(b"only b"), digest_of(b'{"b": 1}')}
    assert summary["deleted"] == len(gone)
    for digest in gone:
        assert not storage.has_blob(digest), digest
    kept = {kept_image, digest_of(b"shared"), digest_of(b"only a"),
            kept_manifest["config"]["digest"], child, index_digest, digest_of(b"multi layer")}
    for digest in kept:
        assert storage.has_blob(digest), digest
    # Dangling repository links went with the blobs.
    assert not os.path.exists(os.path.join(storage.repo_path("lab/a"), "_blobs", orphan[7:]))
    r = await reg.request("HEAD", f"/v2/lab/a/blobs/{orphan}")
    assert r.code == 404
    # What remains still pulls.
    for path in ("/v2/lab/a/manifests/v1", f"/v2/lab/multi/manifests/{child}",
                 "/v2/lab/multi/manifests/latest", f"/v2/lab/b/blobs/{digest_of(b'shared')}"):
        r = await reg.request("GET", path)
        assert r.code == 200, path
    # Nothing left to collect.
    r = await reg.request("POST", "/admin/gc")
    assert r.json["deleted"] == 0


@pytest_twisted.ensureDeferred
async def test_grace_protects_recent_and_seen_blobs(tmp_path: Path) -> None:
    store = await start_store(tmp_path / "store", None, gc_grace=3600.0)
    try:
        reg = store.registry
        fresh = await reg.push_blob("lab/a", b"fresh")
        old = await reg.push_blob("lab/a", b"old")
        old_seen = await reg.push_blob("lab/a", b"old but seen")
        for digest in (old, old_seen):
            age(store, digest)
        r = await reg.request("HEAD", f"/v2/lab/a/blobs/{old_seen}")
        assert r.code == 200
        summary = await store.service.collect_garbage()  # as from the manhole
        assert summary["deleted"] == 1
        assert not store.storage.has_blob(old)
        assert store.storage.has_blob(fresh) and store.storage.has_blob(old_seen)
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_requests_racing_a_sweep_keep_their_blobs(open_store: RunningStore) -> None:
    """Between the candidate scan and the sweep, a manifest PUT, a re-upload
    and a HEAD each make a candidate blob safe; an untouched one goes."""
    reg = open_store.registry
    config = await reg.push_blob("lab/a", b"{}")
    referenced = await reg.push_blob("lab/a", b"referenced during gc")
    reuploaded = await reg.push_blob("lab/a", b"re-uploaded during gc")
    headed = await reg.push_blob("lab/a", b"checked during gc")
    untouched = await reg.push_blob("lab/a", b"untouched")
    for digest in (config, referenced, reuploaded, headed, untouched):
        age(open_store, digest)
    collector = open_store.service.collector

    async def race() -> None:
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": "x", "digest": config, "size": 2},
                    "layers": [{"mediaType": "x", "digest": referenced, "size": 20}]}
        r = await reg.push_manifest("lab/a", "v1", manifest)
        assert r.code == 201, r.body
        await reg.push_blob("lab/other", b"re-uploaded during gc")
        r = await reg.request("HEAD", f"/v2/lab/a/blobs/{headed}")
        assert r.code == 200

    collector.before_sweep = race
    summary = await collector.collect()
    assert summary["candidates"] == 5
    assert summary["deleted"] == 1
    assert not open_store.storage.has_blob(untouched)
    for digest in (config, referenced, reuploaded, headed):
        assert open_store.storage.has_blob(digest), digest


@pytest_twisted.ensureDeferred
async def test_manifest_put_waits_for_a_sweep_batch(open_store: RunningStore) -> None:
    reg = open_store.registry
    config = await reg.push_blob("lab/a", b"{}")
    lock = open_store.service.lock
    await lock.acquire(exclusive=True)  # as a sweep batch would
    from twisted.internet.defer import Deferred

    put = Deferred.fromCoroutine(reg.push_manifest("lab/a", "v1", {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "x", "digest": config, "size": 2}, "layers": []}))
    await deferLater(reactor, 0.2, lambda: None)
    assert not put.called
    lock.release(exclusive=True)
    r = await put
    assert r.code == 201


@pytest_twisted.ensureDeferred
async def test_periodic_gc(tmp_path: Path) -> None:
    store = await start_store(tmp_path / "store", None, gc_interval=0.2)
    try:
        orphan = await store.registry.push_blob("lab/a", b"orphan")
        age(store, orphan)
        deadline = reactor.seconds() + 5
        # (A run deletes the blob before it counts itself: wait for both.)
        while (store.storage.has_blob(orphan) or store.service.collector.runs < 1) \
                and reactor.seconds() < deadline:
            await deferLater(reactor, 0.1, lambda: None)
        assert not store.storage.has_blob(orphan)
        assert store.service.collector.runs >= 1
    finally:
        await store.stop()
