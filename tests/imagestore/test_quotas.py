"""Quotas and upload hygiene: namespace byte limits, open sessions per subject, expiry.

The accounting (``treadmill.imagestore.quota``) is tested on its own, then
through a real store over loopback: who is refused, with which code, what
stays stored, what frees space, and what a restart rebuilds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from tests.imagestore.support import (
    OCI_MANIFEST,
    Keys,
    Registry,
    RunningStore,
    digest_of,
    parse_response,
    start_store,
)
from tests.util.raw import raw_request
from tests.util.running import stopping
from treadmill.imagestore.errors import OCIError
from treadmill.imagestore.gc import SharedExclusiveLock
from treadmill.imagestore.quota import TOP_LEVEL, Ledger, QuotaConfig, namespace_of
from treadmill.imagestore.service import ImageStoreConfig, ImageStoreService, _Periodic
from treadmill.imagestore.storage import Storage
from treadmill.imagestore.tap import _namespace_sizes
from treadmill.imagestore.uploads import Upload, Uploads

D1, D2, D3 = (digest_of(bytes([i])) for i in range(3))


# -- the ledger ------------------------------------------------------------------------


def test_namespaces() -> None:
    assert namespace_of("alice/fw") == "alice"
    assert namespace_of("alice/fw/qemu") == "alice"
    assert namespace_of("fw") == TOP_LEVEL
    config = QuotaConfig(namespace_bytes=100, top_level_bytes=0, namespaces={"ci": 5})
    assert config.limit("alice") == 100 and config.limit("ci") == 5
    assert config.limit(TOP_LEVEL) == 0


def test_a_blob_counts_once_per_namespace() -> None:
    ledger = Ledger(QuotaConfig(namespace_bytes=1000))
    ledger.linked("alice/a", "blob", D1, 300)
    ledger.linked("alice/b", "blob", D1, 300)  # shared inside alice: once
    ledger.linked("alice/a", "blob", D1, 300)  # linking again changes nothing
    ledger.linked("bob/x", "blob", D1, 300)  # bob pays for it too
    ledger.linked("alice/a", "manifest", D2, 50)
    assert ledger.stored("alice") == 350 and ledger.stored("bob") == 300
    ledger.unlinked("alice/a", "blob", D1)
    assert ledger.stored("alice") == 350  # still linked in alice/b
    ledger.unlinked("alice/b", "blob", D1)
    ledger.unlinked("alice/b", "blob", D1)  # twice: no harm
    assert ledger.stored("alice") == 50 and ledger.stored("bob") == 300
    ledger.unlinked("alice/a", "manifest", D2)
    ledger.unlinked("bob/x", "blob", D1)
    assert ledger.usage() == {}


def test_checks_and_upload_reservations() -> None:
    ledger = Ledger(QuotaConfig(namespace_bytes=1000))
    ledger.linked("alice/a", "blob", D1, 600)
    ledger.check("alice/b", 400, "an upload")  # exactly at the limit: fine
    with pytest.raises(OCIError) as e:
        ledger.check("alice/b", 401, "an upload")
    assert e.value.code == "DENIED" and e.value.status == 403
    assert "for namespace alice: 600 bytes" in e.value.message
    assert "of 1000 (1000 B) allowed" in e.value.message and "401 bytes" in e.value.message
    assert e.value.detail == {"namespace": "alice", "used": 600, "limit": 1000,
                              "requested": 401}
    ledger.check("alice/b", 10_000, "mounting", D1)  # already charged: free
    ledger.check("bob/x", 1000, "an upload")  # another namespace

    ledger.reserve_upload("u1", "alice/b", 300)
    ledger.reserve_upload("u1", "alice/b", 100)
    assert ledger.uploading("alice") == 400 and ledger.used("alice") == 1000
    with pytest.raises(OCIError):
        ledger.reserve_upload("u2", "alice/c", 1)
    assert ledger.used("alice") == 1000  # a refused reservation charges nothing
    ledger.set_upload("u1", "alice/b", 250)  # what the write really stored
    assert ledger.used("alice") == 850
    ledger.drop_upload("u1")
    assert ledger.used("alice") == 600 and ledger.uploading("alice") == 0
    # A pending link (mount, manifest) of a digest the namespace holds reserves nothing.
    assert ledger.reserve_upload("m1", "alice/b", 600, "mounting", D1) is False
    assert ledger.reserve_upload("m2", "alice/b", 400, "mounting", D3) is True
    assert ledger.used("alice") == 1000
    ledger.drop_upload("m2")
    assert ledger.refusals == 2


def test_sessions_without_bytes_next_to_ones_with_bytes() -> None:
    """Empty sessions of a namespace survive the others' coming and going (a session
    opened, then a monolithic upload dropped, then the session's first chunk)."""
    ledger = Ledger(QuotaConfig(namespace_bytes=1000))
    ledger.set_upload("empty", "alice/a", 0)
    ledger.set_upload("full", "alice/a", 100)
    ledger.drop_upload("full")
    assert ledger.usage() == {}
    ledger.reserve_upload("empty", "alice/a", 300)
    assert ledger.uploading("alice") == 300
    ledger.set_upload("other", "alice/b", 0)
    ledger.set_upload("empty", "alice/a", 0)
    ledger.reserve_upload("other", "alice/b", 10)
    ledger.drop_upload("other")
    ledger.drop_upload("empty")
    ledger.drop_upload("never")
    assert ledger.usage() == {} and ledger.used("alice") == 0


def test_ledger_agrees_with_a_recount() -> None:
    """Random link, unlink and upload operations: the running sums always equal a recount
    from scratch, and no upload reservation takes a namespace over its limit."""
    import random

    rng = random.Random(12)
    ledger = Ledger(QuotaConfig(namespace_bytes=5000, namespaces={"b": 0}))
    repos = ["a/x", "a/y", "b/x", "top"]
    digests = {digest_of(bytes([i])): rng.randrange(0, 700) for i in range(12)}
    links: set[tuple[str, str, str]] = set()
    uploads: dict[str, tuple[str, int]] = {}
    for _ in range(3000):
        op = rng.randrange(5)
        repo = rng.choice(repos)
        digest = rng.choice(list(digests))
        uid = f"u{rng.randrange(6)}"
        if op == 0:
            kind = rng.choice(["blob", "manifest"])
            ledger.linked(repo, kind, digest, digests[digest])
            links.add((repo, kind, digest))
        elif op == 1 and links:
            repo, kind, digest = rng.choice(sorted(links))
            ledger.unlinked(repo, kind, digest)
            links.discard((repo, kind, digest))
        elif op == 2:
            size = rng.choice([0, 0, rng.randrange(1, 400)])  # empty sessions are common
            ledger.set_upload(uid, repo, size)
            uploads[uid] = (namespace_of(repo), size)
        elif op == 3 and uid in uploads:
            ns, size = uploads[uid]
            adding = rng.randrange(0, 400)
            repo = "top" if ns == TOP_LEVEL else f"{ns}/x"
            try:
                ledger.reserve_upload(uid, repo, adding)
            except OCIError:
                assert ns == "a"
            else:
                uploads[uid] = (ns, size + adding)
        elif op == 4:
            ledger.drop_upload(uid)
            uploads.pop(uid, None)
        for ns in ("a", "b", TOP_LEVEL):
            stored = sum(digests[d] for d in {d for r, _k, d in links if namespace_of(r) == ns})
            uploading = sum(size for n, size in uploads.values() if n == ns)
            assert (ledger.stored(ns), ledger.uploading(ns)) == (stored, uploading)
        if op == 3:
            assert ledger.used("a") <= 5000 or uploads.get(uid, ("", 0))[0] != "a"


def test_zero_means_unlimited() -> None:
    ledger = Ledger(QuotaConfig(namespace_bytes=0, namespaces={"ci": 10}))
    ledger.check("alice/a", 10 ** 15, "an upload")
    ledger.check("fw", 10 ** 15, "an upload")  # top level: unlimited by default
    with pytest.raises(OCIError):
        ledger.check("ci/a", 11, "an upload")


def test_namespace_overrides_setting() -> None:
    assert _namespace_sizes({"alice": "2G", "ci": 0}) == {"alice": 2 * 1024 ** 3, "ci": 0}
    assert _namespace_sizes("alice=1K, bob=5") == {"alice": 1024, "bob": 5}
    for bad in ({"alice/x": 1}, {"Alice": 1}, {"_x": 1}, {"alice": "lots"},
                {"alice": -1}, "alice", ["alice"]):
        with pytest.raises(ValueError):
            _namespace_sizes(bad)


def test_session_limit_and_retry_after_on_a_clock(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(10_000)
    uploads = Uploads(clock, Storage(str(tmp_path)), None, SharedExclusiveLock(),
                      max_age=3600.0, per_subject=2)
    for i, updated in enumerate((9_000.0, 9_500.0)):
        uploads.active[f"u{i}"] = Upload(f"u{i}", "alice/a", "/x", size=0, started=updated,
                                         updated=updated, subject="alice")
    uploads.check_sessions("bob")
    uploads.check_sessions(None)
    with pytest.raises(OCIError) as e:
        uploads.check_sessions("alice")
    assert e.value.code == "TOOMANYREQUESTS" and e.value.status == 429
    # The oldest idle session expires at 9000 + 3600 = 12600, 2600 s from now, and is
    # removed by the next expiry run, at most 900 s later.
    assert e.value.headers["Retry-After"] == "3500"
    assert "alice has 2 of the 2 allowed" in e.value.message
    uploads.active["u0"].gone = True
    uploads.check_sessions("alice")
    assert uploads.refused_sessions == 1


def test_periodic_work_runs_on_its_interval() -> None:
    clock = Clock()
    calls: list[float] = []
    periodic = _Periodic(clock, 900.0, lambda: calls.append(clock.seconds()), "test")
    periodic.startService()
    clock.pump([300.0] * 7)
    assert calls == [900.0, 1800.0]  # not at start, then every interval
    periodic.stopService()


def test_hygiene_is_on_by_default(tmp_path: Path) -> None:
    """A store built with the defaults collects garbage hourly and expires idle uploads
    every quarter hour (after one hour idle)."""
    service = ImageStoreService(Clock(), ImageStoreConfig(root=str(tmp_path),
                                                          auth_disabled=True))
    gc = service.getServiceNamed("gc")
    expiry = service.getServiceNamed("upload-expiry")
    assert gc.interval == 3600 and gc.fn == service.collector.collect
    assert expiry.interval == 900 and service.uploads.max_age == 3600
    assert service.ledger is not None and service.storage.ledger is service.ledger


# -- through a real store ---------------------------------------------------------------


def client(store: RunningStore, keys: Keys, subject: str, *repos: str) -> Registry:
    token = keys.token(*[("repository", r, ["pull", "push", "delete"]) for r in repos],
                       subject=subject)
    return store.registry.with_token(token)


def stored_uploads(store: RunningStore) -> list[str]:
    return os.listdir(store.storage.uploads)


async def chunked(store: RunningStore, method: str, target: str, token: str,
                  chunks: list[bytes]) -> tuple[int, bytes]:
    """Send a body of no length (``Transfer-Encoding: chunked``) in ``chunks``, raw; return
    the status and the response."""
    head = (f"{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for chunk in chunks)
    return await raw_request(store.port, head.encode() + body + b"0\r\n\r\n")


async def start(tmp_path: Path, keys: Keys, **quota: Any) -> RunningStore:
    settings = {"namespace_bytes": 1000, **quota}
    return await start_store(tmp_path / "store", keys, quota=QuotaConfig(**settings))


@pytest_twisted.ensureDeferred
async def test_monolithic_uploads_over_the_quota(tmp_path: Path, keys: Keys) -> None:
    async with stopping(await start(tmp_path, keys)) as store:
        alice = client(store, keys, "alice", "alice/fw")
        await alice.push_blob("alice/fw", b"a" * 600)
        big = b"b" * 401
        r = await alice.request("POST", f"/v2/alice/fw/blobs/uploads/?digest={digest_of(big)}",
                                big)
        assert r.code == 403 and r.error == "DENIED", (r.code, r.body)
        message = r.json["errors"][0]["message"]
        assert "namespace alice: 600 bytes" in message and "of 1000" in message
        assert "401 bytes" in message
        # Nothing of it was stored, no session is left, alice's blob is intact.
        assert not store.storage.has_blob(digest_of(big))
        assert stored_uploads(store) == []
        assert store.service.ledger.used("alice") == 600
        r = await alice.request("GET", f"/v2/alice/fw/blobs/{digest_of(b'a' * 600)}")
        assert r.code == 200 and r.body == b"a" * 600
        # Exactly up to the limit is fine; another namespace is unaffected.
        await alice.push_blob("alice/fw", b"c" * 400)
        bob = client(store, keys, "bob", "bob/fw")
        await bob.push_blob("bob/fw", b"d" * 1000)
        # A body without Content-Length (chunked) is refused at the batch that crosses.
        body = b"e" * 10
        status, raw = await chunked(store, "POST",
                                    f"/v2/alice/fw/blobs/uploads/?digest={digest_of(body)}",
                                    alice.token, [body])
        assert status == 403 and parse_response(raw).error == "DENIED", raw
        assert stored_uploads(store) == [] and not store.storage.has_blob(digest_of(body))
        assert store.service.ledger.used("alice") == 1000
        # A session started with a first chunk: refused, and no unknown session stays,
        # with a length or without.
        r = await alice.request("POST", "/v2/alice/fw/blobs/uploads/", b"f")
        assert r.code == 403 and r.error == "DENIED" and r.header("location") is None
        status, raw = await chunked(store, "POST", "/v2/alice/fw/blobs/uploads/", alice.token,
                                    [body])
        assert status == 403 and parse_response(raw).error == "DENIED", raw
        assert stored_uploads(store) == [] and store.service.uploads.active == {}
        assert store.service.ledger.used("alice") == 1000


@pytest_twisted.ensureDeferred
async def test_chunked_upload_stays_resumable_after_a_refusal(tmp_path: Path,
                                                              keys: Keys) -> None:
    async with stopping(await start(tmp_path, keys)) as store:
        alice = client(store, keys, "alice", "alice/fw", "alice/old")
        old = await alice.push_blob("alice/old", b"o" * 600)
        r = await alice.request("POST", "/v2/alice/fw/blobs/uploads/")
        location = r.header("location")
        r = await alice.request("PATCH", location, b"x" * 300,
                                {"content-range": "0-299"})
        assert r.code == 202 and r.header("range") == "0-299"
        # A chunk with Content-Length is refused before its bytes are accepted.
        r = await alice.request("PATCH", location, b"y" * 200, {"content-range": "300-499"})
        assert r.code == 403 and r.error == "DENIED"
        assert "namespace alice: 900 bytes" in r.json["errors"][0]["message"]
        # ... and so is a last chunk sent with the PUT.
        data = b"x" * 300 + b"y" * 200
        r = await alice.request("PUT", f"{location}?digest={digest_of(data)}", b"y" * 200)
        assert r.code == 403 and r.error == "DENIED"
        # A chunked-encoding body with no length: refused at the crossing batch.
        status, raw = await chunked(store, "PATCH", location, alice.token, [b"y" * 200])
        assert status == 403 and parse_response(raw).error == "DENIED", raw
        # What was received stays.
        r = await alice.request("GET", location)
        assert r.code == 204 and r.header("range") == "0-299"
        # Deleting content frees space at once; the session resumes where it was.
        r = await alice.request("DELETE", f"/v2/alice/old/blobs/{old}")
        assert r.code == 202
        assert store.service.ledger.used("alice") == 300
        r = await alice.request("PATCH", location, b"y" * 200, {"content-range": "300-499"})
        assert r.code == 202 and r.header("range") == "0-499"
        r = await alice.request("PUT", f"{location}?digest={digest_of(data)}")
        assert r.code == 201
        # The committed blob is charged once, the session no more.
        assert store.service.ledger.used("alice") == 500
        assert store.service.ledger.uploading("alice") == 0


def manifest_of(config: str, size: int) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config, "size": size}, "layers": []}


@pytest_twisted.ensureDeferred
async def test_mounts_and_manifests_are_charged(tmp_path: Path, keys: Keys) -> None:
    async with stopping(await start(tmp_path, keys)) as store:
        ledger = store.service.ledger
        bob = client(store, keys, "bob", "bob/fw")
        shared = await bob.push_blob("bob/fw", b"s" * 500)
        alice = client(store, keys, "alice", "alice/fw", "alice/copy", "bob/fw")
        config = await alice.push_blob("alice/fw", b"{" + b" " * 598 + b"}")
        # Mounting bob's blob would charge alice 500 more bytes: refused.
        r = await alice.request("POST", f"/v2/alice/fw/blobs/uploads/?mount={shared}"
                                        f"&from=bob/fw")
        assert r.code == 403 and r.error == "DENIED"
        assert not store.storage.blob_linked("alice/fw", shared)
        # Mounting a blob alice already pays for, into another of her repositories: free.
        r = await alice.request("POST", f"/v2/alice/copy/blobs/uploads/?mount={config}"
                                        f"&from=alice/fw")
        assert r.code == 201
        assert ledger.used("alice") == 600
        # A manifest is charged its own bytes (its blobs are already in the repository).
        manifest = manifest_of(config, 600)
        r = await alice.push_manifest("alice/fw", "v1", manifest)
        assert r.code == 201, r.body
        used = ledger.used("alice")
        assert 600 < used < 1000
        filler = await alice.push_blob("alice/fw", b"f" * (1000 - used))
        # Another manifest (the same one would be free: it is charged already).
        manifest = {**manifest, "annotations": {"copy": "yes"}}
        r = await alice.push_manifest("alice/copy", "v1", manifest)
        assert r.code == 403 and r.error == "DENIED"
        assert store.storage.read_tag("alice/copy", "v1") is None
        # Deleting the manifest frees its bytes; then the tag can go elsewhere.
        digest = store.storage.read_tag("alice/fw", "v1")
        r = await alice.request("DELETE", f"/v2/alice/fw/manifests/{digest}")
        assert r.code == 202
        assert ledger.used("alice") == 1000 - (used - 600)
        r = await alice.request("DELETE", f"/v2/alice/fw/blobs/{filler}")
        assert r.code == 202 and ledger.used("alice") == 600
        r = await alice.push_manifest("alice/copy", "v1", manifest)
        assert r.code == 201
        assert ledger.stored("bob") == 500  # bob paid for his blob all along


@pytest_twisted.ensureDeferred
async def test_garbage_collection_frees_quota(tmp_path: Path, keys: Keys) -> None:
    """Layers of a deleted image are freed when garbage collection deletes them."""
    async with stopping(await start(tmp_path, keys)) as store:
        alice = client(store, keys, "alice", "alice/fw")
        digest, _manifest = await alice.push_image("alice/fw", "v1", [b"l" * 400])
        assert store.service.ledger.used("alice") > 800
        r = await alice.request("DELETE", f"/v2/alice/fw/manifests/{digest}")
        assert r.code == 202
        summary = await store.service.collect_garbage()
        assert summary["deleted"] == 3  # the manifest, its config and its layer
        assert store.service.ledger.used("alice") == 0
        await alice.push_blob("alice/fw", b"n" * 1000)


@pytest_twisted.ensureDeferred
async def test_top_level_repositories(tmp_path: Path, keys: Keys) -> None:
    async with stopping(await start(tmp_path, keys, top_level_bytes=100)) as store:
        admin = client(store, keys, "root", "fw", "tools")
        await admin.push_blob("fw", b"t" * 60)
        r = await admin.request("POST", f"/v2/tools/blobs/uploads/?digest="
                                        f"{digest_of(b'u' * 60)}", b"u" * 60)
        assert r.code == 403 and "the top-level repositories: 60 bytes" in r.body.decode()


@pytest_twisted.ensureDeferred
async def test_open_sessions_per_subject(tmp_path: Path, keys: Keys) -> None:
    async with stopping(await start(tmp_path, keys, uploads_per_subject=2)) as store:
        alice = client(store, keys, "alice", "alice/fw", "alice/other")
        locations = []
        for repo in ("alice/fw", "alice/other"):
            r = await alice.request("POST", f"/v2/{repo}/blobs/uploads/")
            assert r.code == 202
            locations.append(r.header("location"))
        for attempt in (
                alice.request("POST", "/v2/alice/fw/blobs/uploads/"),
                # A monolithic upload needs a session too; its body is not stored.
                alice.request("POST", f"/v2/alice/fw/blobs/uploads/?digest="
                                      f"{digest_of(b'm')}", b"m")):
            r = await attempt
            assert r.code == 429 and r.error == "TOOMANYREQUESTS", (r.code, r.body)
            assert 3600 < int(r.header("retry-after")) <= 3600 + 900
            assert "alice has 2 of the 2 allowed" in r.json["errors"][0]["message"]
        assert len(stored_uploads(store)) == 2
        # Another subject, even on the same repository, is not affected.
        other = client(store, keys, "bob", "alice/fw")
        r = await other.request("POST", "/v2/alice/fw/blobs/uploads/")
        assert r.code == 202
        # Finishing one (or cancelling it) frees a slot.
        r = await alice.request("PUT", f"{locations[0]}?digest={digest_of(b'z')}", b"z")
        assert r.code == 201
        r = await alice.request("POST", "/v2/alice/fw/blobs/uploads/")
        assert r.code == 202
        r = await alice.request("DELETE", r.header("location"))
        assert r.code == 204
        await alice.push_blob("alice/fw", b"fits")
    # After a restart, the sessions on disk still count (their subject is on disk).
    async with stopping(await start(tmp_path, keys, uploads_per_subject=2)) as store:
        alice = client(store, keys, "alice", "alice/fw")
        r = await alice.request("POST", "/v2/alice/fw/blobs/uploads/")
        assert r.code == 202
        r = await alice.request("POST", "/v2/alice/fw/blobs/uploads/")
        assert r.code == 429


@pytest_twisted.ensureDeferred
async def test_abandoned_uploads_expire_and_free_their_bytes(tmp_path: Path,
                                                             keys: Keys) -> None:
    """The periodic expiry (every second with a 1 s max_age) removes idle sessions,
    frees their bytes and their session slot, without a restart."""
    quota = QuotaConfig(namespace_bytes=1000, uploads_per_subject=1)
    async with stopping(await start_store(tmp_path / "store", keys, upload_max_age=1.0,
                                          quota=quota)) as store:
        ledger = store.service.ledger
        alice = client(store, keys, "alice", "alice/fw")
        r = await alice.request("POST", "/v2/alice/fw/blobs/uploads/")
        r = await alice.request("PATCH", r.header("location"), b"a" * 900)
        assert r.code == 202 and ledger.uploading("alice") == 900
        r = await alice.request("POST", "/v2/alice/fw/blobs/uploads/")
        assert r.code == 429 and int(r.header("retry-after")) == 2
        deadline = reactor.seconds() + 5
        while stored_uploads(store) and reactor.seconds() < deadline:
            await deferLater(reactor, 0.1, lambda: None)
        assert stored_uploads(store) == []
        assert ledger.used("alice") == 0
        await alice.push_blob("alice/fw", b"b" * 1000)


@pytest_twisted.ensureDeferred
async def test_quota_state_survives_a_restart(tmp_path: Path, keys: Keys) -> None:
    async with stopping(await start(tmp_path, keys)) as store:
        alice = client(store, keys, "alice", "alice/fw", "alice/b")
        await alice.push_image("alice/fw", "v1", [b"l" * 300])
        layer = digest_of(b"l" * 300)
        r = await alice.request("POST", f"/v2/alice/b/blobs/uploads/?mount={layer}"
                                        f"&from=alice/fw")
        assert r.code == 201
        r = await alice.request("POST", "/v2/alice/b/blobs/uploads/")
        location = r.header("location")
        await alice.request("PATCH", location, b"p" * 200)
        before = store.service.ledger.usage()
        assert before["alice"]["uploading"] == 200
    async with stopping(await start(tmp_path, keys)) as store:
        assert store.service.ledger.usage() == before
        used = before["alice"]["stored"] + 200
        alice = client(store, keys, "alice", "alice/fw", "alice/b")
        r = await alice.request("PATCH", location, b"q" * (1001 - used))
        assert r.code == 403 and f"alice: {used} bytes" in r.json["errors"][0]["message"]
        # The session resumes (re-hashed) and commits within the quota.
        r = await alice.request("PUT", f"{location}?digest={digest_of(b'p' * 200)}")
        assert r.code == 201
        assert store.service.ledger.uploading("alice") == 0
        assert store.service.ledger.stored("alice") == used


@pytest_twisted.ensureDeferred
async def test_a_cache_has_no_byte_quota(tmp_path: Path, keys: Keys) -> None:
    from tests.imagestore.support import CACHE_SERVICE, start_cache

    async with stopping(await start_store(tmp_path / "upstream", keys)) as upstream:
        async with stopping(await start_cache(tmp_path / "cache", keys, [upstream.url],
                                              quota=QuotaConfig(namespace_bytes=10))) as cache:
            assert cache.service.ledger is None and cache.storage.ledger is None
            token = keys.repo("lab/fw", "pull", "push", audience=CACHE_SERVICE)
            await cache.registry.with_token(token).push_blob("lab/fw", b"x" * 100)


@pytest_twisted.ensureDeferred
async def test_a_known_size_is_refused_before_any_byte_is_stored(tmp_path: Path,
                                                                 keys: Keys) -> None:
    """With Content-Length, none of a big chunk is written; without it, the batches that
    fit are written and the one that crosses the limit is refused: never over the limit."""
    limit = 4 * 1024 * 1024
    async with stopping(await start(tmp_path, keys, namespace_bytes=limit)) as store:
        ledger = store.service.ledger
        alice = client(store, keys, "alice", "alice/fw")
        r = await alice.request("POST", "/v2/alice/fw/blobs/uploads/")
        location = r.header("location")
        big = os.urandom(limit + 2 * 1024 * 1024)
        r = await alice.request("PATCH", location, big)
        assert r.code == 403 and r.error == "DENIED"
        r = await alice.request("GET", location)
        assert r.header("range") == "0-0" and ledger.used("alice") == 0
        upload_id = location.rsplit("/", 1)[1]
        assert os.path.getsize(os.path.join(store.storage.uploads, upload_id, "data")) == 0

        status, _raw = await chunked(store, "PATCH", location, alice.token,
                                     [big[i:i + 64 * 1024] for i in range(0, len(big), 64 * 1024)])
        assert status == 403
        r = await alice.request("GET", location)
        received = int(r.header("range").split("-")[1]) + 1 if r.header("range") != "0-0" \
            else 0
        assert received <= limit and ledger.used("alice") == received
        assert os.path.getsize(os.path.join(store.storage.uploads, upload_id, "data")) \
            == received


@pytest_twisted.ensureDeferred
async def test_concurrent_uploads_never_exceed_the_limit(tmp_path: Path, keys: Keys) -> None:
    """Eight uploads of 300 bytes at once, each fitting alone, into 1000 bytes: three get
    through, whatever the order; the namespace never holds more than its limit."""
    from twisted.internet.defer import Deferred, gatherResults

    async with stopping(await start(tmp_path, keys, uploads_per_subject=0)) as store:
        alice = client(store, keys, "alice", "alice/fw")
        blobs = [bytes([i]) * 300 for i in range(8)]
        results = await gatherResults([Deferred.fromCoroutine(
            alice.request("POST", f"/v2/alice/fw/blobs/uploads/?digest={digest_of(b)}", b))
            for b in blobs])
        codes = sorted(r.code for r in results)
        assert codes == [201] * 3 + [403] * 5, codes
        stored = [b for b in blobs if store.storage.has_blob(digest_of(b))]
        assert len(stored) == 3 and store.service.ledger.used("alice") == 900
        assert stored_uploads(store) == []


@pytest_twisted.ensureDeferred
async def test_concurrent_manifests_and_mounts_never_exceed_the_limit(tmp_path: Path,
                                                                      keys: Keys) -> None:
    from twisted.internet.defer import Deferred, gatherResults

    async with stopping(await start(tmp_path, keys, uploads_per_subject=0,
                                    namespaces={"bob": 0})) as store:
        ledger = store.service.ledger
        alice = client(store, keys, "alice", "alice/fw", "bob/fw")
        config = await alice.push_blob("alice/fw", b"{}")
        manifests = [{**manifest_of(config, 2), "annotations": {"n": str(i) * 150}}
                     for i in range(8)]
        room = 1000 - ledger.used("alice")
        results = await gatherResults([Deferred.fromCoroutine(
            alice.push_manifest("alice/fw", f"v{i}", m)) for i, m in enumerate(manifests)])
        assert {r.code for r in results} == {201, 403}
        assert ledger.used("alice") <= 1000
        # Each manifest costs the same: exactly as many as fit got through.
        size = len(json.dumps(manifests[0]).encode())
        assert sum(r.code == 201 for r in results) == room // size
        bob = client(store, keys, "bob", "bob/fw")
        blobs = [await bob.push_blob("bob/fw", bytes([i]) * 300) for i in range(8)]
        before = ledger.used("alice")
        results = await gatherResults([Deferred.fromCoroutine(
            alice.request("POST", f"/v2/alice/fw/blobs/uploads/?mount={d}&from=bob/fw"))
            for d in blobs])
        mounted = sum(r.code == 201 for r in results)
        assert mounted == (1000 - before) // 300
        assert ledger.used("alice") == before + 300 * mounted <= 1000


@pytest_twisted.ensureDeferred
async def test_a_failing_charge_answers_instead_of_hanging(tmp_path: Path, keys: Keys,
                                                          monkeypatch: Any) -> None:
    """Whatever goes wrong while charging a batch, the request gets an answer and the
    session stays usable (a bug here once left the request waiting forever)."""
    async with stopping(await start(tmp_path, keys)) as store:
        alice = client(store, keys, "alice", "alice/fw")
        r = await alice.request("POST", "/v2/alice/fw/blobs/uploads/")
        location = r.header("location")
        ledger = store.service.ledger

        def broken(*args: Any, **kwargs: Any) -> bool:
            raise RuntimeError("accounting bug")

        monkeypatch.setattr(ledger, "reserve_upload", broken)
        r = await alice.request("PATCH", location, b"x" * 100)
        assert r.code == 500 and r.error == "BLOB_UPLOAD_INVALID", (r.code, r.body)
        monkeypatch.undo()
        r = await alice.request("PATCH", location, b"x" * 100)
        assert r.code == 202 and r.header("range") == "0-99"
        r = await alice.request("PUT", f"{location}?digest={digest_of(b'x' * 100)}")
        assert r.code == 201 and ledger.used("alice") == 100
