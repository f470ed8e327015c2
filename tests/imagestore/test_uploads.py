"""Uploads: streaming with backpressure, resuming, verification, atomic commits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater
from zope.interface import implementer

from tests.imagestore.support import (
    Keys,
    RunningStore,
    digest_of,
    parse_response,
    slow_disk,
    start_store,
)
from tests.util.raw import abandoned, raw_connect
from treadmill.imagestore.uploads import HIGH_WATER, LOW_WATER, BodySink, Upload


def blob_files(store: RunningStore) -> list[str]:
    found = []
    for directory, _dirs, files in os.walk(store.storage.blobs):
        found.extend(os.path.join(directory, f) for f in files)
    return found


async def wait_for_range(store: RunningStore, location: str, expected: str,
                         timeout: float = 10.0) -> None:
    """Poll the upload status until its Range is ``expected``."""
    deadline = reactor.seconds() + timeout
    while True:
        r = await store.registry.request("GET", location)
        if r.header("range") == expected or reactor.seconds() > deadline:
            assert r.header("range") == expected, (r.code, r.header("range"))
            return
        await deferLater(reactor, 0.05, lambda: None)


# -- BodySink: backpressure without a network -------------------------------------


@implementer(IPushProducer)
class FakeProducer:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        assert not self.paused
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


def test_sink_pauses_the_transport_while_the_disk_lags() -> None:
    producer = FakeProducer()
    sink = BodySink(producer)
    batches: list[tuple[list[bytes], Deferred[int]]] = []

    def append(chunks: list[bytes]) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        batches.append((chunks, d))
        return d

    upload = Upload("u", "lab/fw", "/nonexistent", size=0, started=0, updated=0)
    upload.holder = sink
    chunk = b"x" * 65536
    # Before the upload is known, chunks wait in memory, within bounds too.
    for _ in range(HIGH_WATER // len(chunk) + 1):
        sink.write(chunk)
    assert producer.paused
    sink.attach(upload, append)
    assert len(batches) == 1  # one batch in flight at a time
    sink.write(chunk)  # a chunk that was already on its way
    assert len(batches) == 1
    # The disk catches up: the transport resumes below the low-water mark.
    chunks, d = batches.pop()
    d.callback(sum(len(c) for c in chunks))
    assert sink._queued < LOW_WATER
    assert not producer.paused
    assert len(batches) == 1
    sink.finish()
    chunks, d = batches.pop()
    d.callback(sum(len(c) for c in chunks))
    results: list[object] = []
    sink.result().addBoth(results.append)
    assert results == [upload]
    assert sink.written == sink.received == (HIGH_WATER // len(chunk) + 2) * len(chunk)
    assert upload.holder is sink  # until the handler releases it
    sink.release()
    assert upload.holder is None


def test_sink_refused_drops_the_body_and_resumes() -> None:
    from treadmill.imagestore.errors import OCIError

    producer = FakeProducer()
    sink = BodySink(producer)
    for _ in range(100):
        sink.write(b"y" * 65536)
    assert producer.paused
    sink.fail(OCIError("UNAUTHORIZED", "no"))
    assert not producer.paused and sink._queued == 0
    sink.write(b"more")  # dropped
    sink.finish()
    results: list[object] = []
    sink.result().addErrback(lambda f: results.append(f.value.code))
    assert results == ["UNAUTHORIZED"]


# -- over the network ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_resume_after_dropped_connection(open_store: RunningStore) -> None:
    reg = open_store.registry
    data = os.urandom(2 * 1024 * 1024 + 123)
    r = await reg.request("POST", "/v2/lab/fw/blobs/uploads/")
    location = r.header("location")
    # A PATCH announcing the whole blob, cut off after 700 000 bytes.
    await abandoned(open_store.port, (
        f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(data)}\r\nContent-Range: 0-{len(data) - 1}\r\n\r\n".encode()
    ) + data[:700_000], after=0.2)
    # The bytes that arrived are kept; the client carries on from there.
    await wait_for_range(open_store, location, "0-699999")
    r = await reg.request("PATCH", location, data[700_000:1_500_000],
                          {"content-range": f"700000-{1_500_000 - 1}"})
    assert r.code == 202 and r.header("range") == "0-1499999"
    r = await reg.request("PUT", f"{location}?digest={digest_of(data)}", data[1_500_000:])
    assert r.code == 201, r.body
    r = await reg.request("GET", f"/v2/lab/fw/blobs/{digest_of(data)}")
    assert r.body == data


@pytest_twisted.ensureDeferred
async def test_second_writer_is_refused_while_the_first_sends(open_store: RunningStore) -> None:
    reg = open_store.registry
    r = await reg.request("POST", "/v2/lab/fw/blobs/uploads/")
    location = r.header("location")
    proto = await raw_connect(open_store.port)
    proto.transport.write(
        f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode()
        + b"a" * 500)
    await deferLater(reactor, 0.1, lambda: None)
    r = await reg.request("PATCH", location, b"b" * 10)
    assert r.code == 416 and r.error == "BLOB_UPLOAD_INVALID"
    proto.transport.write(b"a" * 500)
    await deferLater(reactor, 0.1, lambda: None)
    proto.transport.loseConnection()
    raw = await proto.closed
    assert parse_response(raw).code == 202
    r = await reg.request("PATCH", location, b"b" * 10)
    assert r.code == 202 and r.header("range") == "0-1009"


@pytest_twisted.ensureDeferred
async def test_resume_after_store_restart(tmp_path: Path) -> None:
    root = tmp_path / "store"
    data = os.urandom(1024 * 1024 + 7)
    store = await start_store(root, None)
    try:
        r = await store.registry.request("POST", "/v2/lab/fw/blobs/uploads/")
        location = r.header("location")
        r = await store.registry.request("PATCH", location, data[:600_000])
        assert r.header("range") == "0-599999"
    finally:
        await store.stop()
    # A new process: the session is found on disk and its hash recomputed.
    store = await start_store(root, None)
    try:
        reg = store.registry
        r = await reg.request("GET", location)
        assert r.code == 204 and r.header("range") == "0-599999"
        await reg.complete_upload(location, data, 600_000)
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_wrong_digest_leaves_nothing(open_store: RunningStore) -> None:
    reg = open_store.registry
    data = os.urandom(50_000)
    claimed = digest_of(b"something else")
    r = await reg.request("POST", f"/v2/lab/fw/blobs/uploads/?digest={claimed}", data)
    assert r.code == 400 and r.error == "DIGEST_INVALID"
    r = await reg.request("POST", "/v2/lab/fw/blobs/uploads/")
    location = r.header("location")
    await reg.request("PATCH", location, data)
    r = await reg.request("PUT", f"{location}?digest={claimed}")
    assert r.code == 400 and r.error == "DIGEST_INVALID"
    for digest in (claimed, digest_of(data)):
        r = await reg.request("HEAD", f"/v2/lab/fw/blobs/{digest}")
        assert r.code == 404
    assert blob_files(open_store) == []
    assert os.listdir(open_store.storage.uploads) == []
    r = await reg.request("GET", location)
    assert r.code == 404


@pytest_twisted.ensureDeferred
async def test_truncated_upload_leaves_nothing_visible(open_store: RunningStore) -> None:
    data = os.urandom(400_000)
    digest = digest_of(data)
    await abandoned(open_store.port, f"POST /v2/lab/fw/blobs/uploads/?digest={digest} HTTP/1.1"
                    f"\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                    + data[:200_000])
    # And a chunked upload whose final PUT is cut short.
    r = await open_store.registry.request("POST", "/v2/lab/fw/blobs/uploads/")
    location = r.header("location")
    await abandoned(open_store.port, f"PUT {location}?digest={digest} HTTP/1.1\r\nHost: x\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:300_000])
    await wait_for_range(open_store, location, "0-299999")  # resumable, not visible
    r = await open_store.registry.request("HEAD", f"/v2/lab/fw/blobs/{digest}")
    assert r.code == 404
    assert blob_files(open_store) == []
    # The aborted monolithic upload is gone; the chunked session remains.
    assert os.listdir(open_store.storage.uploads) == [location.rsplit("/", 1)[1]]


@pytest_twisted.ensureDeferred
async def test_concurrent_uploads_of_one_blob(open_store: RunningStore) -> None:
    reg = open_store.registry
    data = os.urandom(3 * 1024 * 1024)
    digest = digest_of(data)
    locations = []
    for _ in range(3):
        r = await reg.request("POST", "/v2/lab/fw/blobs/uploads/")
        locations.append(r.header("location"))
    patched = await gatherResults([Deferred.fromCoroutine(reg.request("PATCH", loc, data))
                                   for loc in locations])
    assert [r.code for r in patched] == [202] * 3
    done = await gatherResults([
        Deferred.fromCoroutine(reg.request("PUT", f"{loc}?digest={digest}"))
        for loc in locations])
    assert [r.code for r in done] == [201] * 3
    # Plus a monolithic one, and one in another repository.
    await reg.push_blob("lab/fw", data)
    await reg.push_blob("lab/other", data)
    assert blob_files(open_store) == [open_store.storage.blob_path(digest)]
    with open(open_store.storage.blob_path(digest), "rb") as f:
        assert f.read() == data
    assert os.listdir(open_store.storage.uploads) == []
    for name in ("lab/fw", "lab/other"):
        r = await reg.request("GET", f"/v2/{name}/blobs/{digest}")
        assert r.body == data


@pytest_twisted.ensureDeferred
async def test_expired_uploads_are_removed(tmp_path: Path, keys: Keys) -> None:
    root = tmp_path / "store"
    store = await start_store(root, None)
    try:
        r = await store.registry.request("POST", "/v2/lab/fw/blobs/uploads/")
        old = r.header("docker-upload-uuid")
        await store.registry.request("PATCH", r.header("location"), b"old")
    finally:
        await store.stop()
    upload_dir = root / "uploads" / old
    for name in ("data", "state.json", ""):
        os.utime(upload_dir / name if name else upload_dir, (1_000_000, 1_000_000))
    (root / "uploads" / "junk").mkdir()
    store = await start_store(root, None, upload_max_age=3600.0)
    try:
        assert os.listdir(root / "uploads") == []
        r = await store.registry.request("GET", f"/v2/lab/fw/blobs/uploads/{old}")
        assert r.code == 404
        r = await store.registry.request("POST", "/v2/lab/fw/blobs/uploads/")
        fresh = r.header("docker-upload-uuid")
        assert await store.service.uploads.expire() == 0
        assert os.listdir(root / "uploads") == [fresh]
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_slow_disk_pauses_the_client(open_store: RunningStore, monkeypatch) -> None:
    """With a disk slower than the network, the queue stays bounded: TCP backpressure."""
    seen = slow_disk(open_store, monkeypatch)
    data = os.urandom(24 * 1024 * 1024)
    digest = await open_store.registry.push_blob("lab/fw", data)
    assert digest == digest_of(data)
    assert seen.pauses >= 1
    assert seen.peak <= HIGH_WATER + 256 * 1024, seen.peak


@pytest_twisted.ensureDeferred
async def test_client_gone_during_commit(open_store: RunningStore, monkeypatch) -> None:
    """A commit runs to its end even if its client leaves; nobody writes meanwhile."""
    import time as _time

    uploads = open_store.service.uploads
    original = uploads._commit

    def slow_commit(upload: Upload, digest: str) -> bool:
        _time.sleep(0.3)
        return original(upload, digest)

    monkeypatch.setattr(uploads, "_commit", slow_commit)
    data = os.urandom(500_000)
    digest = digest_of(data)
    r = await open_store.registry.request("POST", "/v2/lab/fw/blobs/uploads/")
    location = r.header("location")
    await abandoned(open_store.port, f"PUT {location}?digest={digest} HTTP/1.1\r\nHost: x\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n".encode() + data)  # the commit sleeps
    r = await open_store.registry.request("PATCH", location, b"appended too late")
    assert r.code == 404 and r.error == "BLOB_UPLOAD_UNKNOWN"
    r = await open_store.registry.request("GET", f"/v2/lab/fw/blobs/{digest}")
    assert r.code == 200 and r.body == data
