"""The OCI client (treadmill/images/oci.py) against a real little server on loopback."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred

from tests.images.ocifake import SECRET, USER, FakeRegistry, digest_of, listen
from tests.util.waiting import eventually, sleep
from treadmill.images import format as fmt
from treadmill.images.oci import (
    BlobSource,
    DigestMismatch,
    RegistryClient,
    RegistryError,
    RegistryUnreachable,
    _Slice,
    file_blob,
    parse_challenge,
    parse_reference,
    repository_of,
)

REPO = "alice/demo"
OCI_JSON = "application/vnd.oci.image.manifest.v1+json"


@pytest_twisted.async_yield_fixture
async def fake() -> AsyncIterator[FakeRegistry]:
    registry, port = listen()
    yield registry
    await port.stopListening()


@pytest_twisted.async_yield_fixture
async def clients():
    made: list[RegistryClient] = []

    def make(url: str, **kw) -> RegistryClient:
        kw.setdefault("backoff", 0.01)
        client = RegistryClient(reactor, url, **kw)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def blob_file(tmp_path: Path, size: int, name: str = "blob.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes((i * 7 + i // 251) % 256 for i in range(size)))
    return path


# -- uploads -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_small_blob_monolithic_then_skipped(fake, clients, tmp_path):
    client = clients(fake.url)
    path = blob_file(tmp_path, 500)
    seen: list[tuple[int, int]] = []
    blob, uploaded = await client.push_file(REPO, path, progress=lambda d, t: seen.append((d, t)))
    assert uploaded and blob == fmt.Blob(digest_of(path.read_bytes()), 500)
    assert fake.blobs[blob.digest] == path.read_bytes()
    assert fake.count("PATCH") == 0 and fake.count("PUT", "digest=") == 1
    assert seen[-1] == (500, 500)
    assert await client.blob_size(REPO, blob.digest) == 500
    # Pushed again: HEAD finds it, nothing is uploaded.
    posts = fake.count("POST")
    _, uploaded = await client.push_file(REPO, path, blob)
    assert not uploaded and fake.count("POST") == posts
    assert await client.blob_size(REPO, "sha256:" + "0" * 64) is None


@pytest_twisted.ensureDeferred
async def test_chunked_upload(fake, clients, tmp_path):
    client = clients(fake.url, chunk_size=1000)
    path = blob_file(tmp_path, 5500)
    seen: list[int] = []
    blob, _ = await client.push_file(REPO, path, progress=lambda d, t: seen.append(d))
    assert fake.blobs[blob.digest] == path.read_bytes()
    assert fake.count("PATCH") == 6
    assert seen == sorted(seen) and seen[-1] == 5500
    assert fake.uploads == {}


@pytest_twisted.ensureDeferred
async def test_empty_and_bytes_blobs(fake, clients):
    client = clients(fake.url, chunk_size=4)
    assert await client.push_bytes(REPO, b"") == fmt.Blob(digest_of(b""), 0)
    assert await client.push_bytes(REPO, fmt.EMPTY_BLOB) == fmt.Blob(fmt.EMPTY_DIGEST, 2)
    assert fake.blobs[fmt.EMPTY_DIGEST] == b"{}"
    blob = await client.push_bytes(REPO, b"0123456789")  # three chunks
    assert fake.blobs[blob.digest] == b"0123456789"


@pytest_twisted.ensureDeferred
async def test_resume_after_connection_dropped_mid_chunk(fake, clients, tmp_path):
    """The store kept 300 bytes of the third chunk and dropped the connection."""
    retries: list[str] = []
    client = clients(fake.url, chunk_size=1000, on_retry=retries.append)
    path = blob_file(tmp_path, 5500)
    patches = 0

    def progress(done: int, total: int) -> None:
        nonlocal patches
        if fake.count("PATCH") == 2 and patches == 0:
            fake.drop_patch_after = 300
            patches = 1

    blob, _ = await client.push_file(REPO, path, progress=progress)
    assert fake.blobs[blob.digest] == path.read_bytes()
    assert len(retries) == 1 and "closed" in retries[0]
    # The status was asked, and the next chunk started at 2300.
    status = [i for i, (m, uri) in enumerate(fake.requests) if m == "GET" and "uploads" in uri]
    assert len(status) == 1
    # The request after the status query: a PATCH from 2300 (not 2000).
    assert fake.requests[status[0] + 1][0] == "PATCH"
    assert fake.count("PATCH") == 7  # 0,1000, (2000 dropped), 2300,3300,4300,5300


@pytest_twisted.ensureDeferred
async def test_resume_after_connection_dropped_while_sending(fake, clients, tmp_path):
    client = clients(fake.url, chunk_size=200_000)
    path = blob_file(tmp_path, 500_000)
    fake.abort_body_after = 100_000  # mid-way through the first PATCH body
    blob, _ = await client.push_file(REPO, path)
    assert fake.abort_body_after is None
    assert fake.blobs[blob.digest] == path.read_bytes()
    assert fake.count("GET", "/uploads/") == 1


@pytest_twisted.ensureDeferred
async def test_resume_of_a_monolithic_upload(fake, clients, tmp_path):
    client = clients(fake.url, chunk_size=1_000_000)
    path = blob_file(tmp_path, 300_000)
    fake.abort_body_after = 50_000
    blob, _ = await client.push_file(REPO, path)
    assert fake.blobs[blob.digest] == path.read_bytes()


@pytest_twisted.ensureDeferred
async def test_retry_on_server_errors_then_give_up(fake, clients, tmp_path):
    client = clients(fake.url, chunk_size=100, retries=3)
    path = blob_file(tmp_path, 350)
    fake.fail_status = [503, 500]
    blob, _ = await client.push_file(REPO, path)
    assert fake.blobs[blob.digest] == path.read_bytes()
    fake.fail_status = [500] * 5  # (503 is retried for a time instead: test_503_*)
    with pytest.raises(RegistryError) as info:
        await client.push_file(REPO, blob_file(tmp_path, 351, "other.bin"))
    assert info.value.status == 500
    assert len(fake.fail_status) == 2  # three tries in all


@pytest_twisted.ensureDeferred
async def test_503_is_retried_with_backoff_then_succeeds(fake, clients, tmp_path):
    retries: list[str] = []
    client = clients(fake.url, retries=2, backoff=0.02, max_backoff=0.05, retry_time=5,
                     on_retry=retries.append)
    data = fmt.manifest_bytes({"schemaVersion": 2, "layers": []})
    await client.put_manifest(REPO, "v1", data, media_type=OCI_JSON)
    fake.unavailable = 4  # more failures than retries: 503 is bounded by time, not count
    got = await client.get_manifest(REPO, "v1")
    assert got.data == data and fake.unavailable == 0
    assert len(retries) == 4 and all("HTTP 503" in r or "starting" in r for r in retries)
    # Uploads too (a HEAD, then the upload session) come through an outage.
    fake.unavailable = 3
    path = blob_file(tmp_path, 300)
    blob, uploaded = await client.push_file(REPO, path)
    assert uploaded and fake.blobs[blob.digest] == path.read_bytes()
    # A caller with another store to try asks for one attempt: no retry at all.
    fake.unavailable = 1
    with pytest.raises(RegistryError) as info:
        await client.get_manifest(REPO, "v1", retries=1)
    assert info.value.status == 503 and "giving up" not in info.value.message


def _release(fake: FakeRegistry) -> None:
    for request in fake.held:
        if request.channel is not None:  # else the client closed it
            request.channel.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_a_request_without_an_answer_in_time_is_retried(fake, clients, tmp_path):
    retries: list[str] = []
    client = clients(fake.url, timeout=0.3, on_retry=retries.append)
    fake.hold = 1
    try:
        blob, uploaded = await client.push_file(REPO, blob_file(tmp_path, 300))
    finally:
        _release(fake)
    assert uploaded and blob.digest in fake.blobs
    assert len(retries) == 1 and "timed out" in retries[0], retries


@pytest.mark.parametrize("while_sending", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_cancelled_request_is_cancelled_not_a_timeout_to_retry(
        fake, clients, tmp_path, while_sending: bool):
    """``tml image push`` interrupted (SIGINT) cancels the push, waiting for an answer or
    sending a body: it used to read the cancelled request as 'timed out' (or 'sending the
    body failed'), retry it and finish the push."""
    retries: list[str] = []
    client = clients(fake.url, on_retry=retries.append, chunk_size=64 << 20)
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(16 << 20))
    if while_sending:
        fake.stall_body_after = 1 << 20
        await client.push_file(REPO, blob_file(tmp_path, 300))  # the HEAD goes through
        fake.requests.clear()
    else:
        fake.hold = -1
    pushing = Deferred.fromCoroutine(client.push_file(REPO, path))
    try:
        async def held() -> bool:
            return len(fake.held) == 1

        await eventually(held, timeout=10)
        pushing.cancel()
        with pytest.raises(CancelledError):
            await pushing.addTimeout(5, reactor)
        await sleep(0.2)  # a retry would come after its backoff (0.01 s)
        # Held: the first HEAD; while sending: HEAD, POST and the PUT that never ended.
        assert (retries, len(fake.requests)) == ([], 2 if while_sending else 1)
    finally:
        _release(fake)


@pytest_twisted.ensureDeferred
async def test_503_forever_fails_within_the_bound(fake, clients):
    retries: list[str] = []
    client = clients(fake.url, retries=2, backoff=0.02, max_backoff=0.1, retry_time=0.6,
                     on_retry=retries.append)
    fake.unavailable = -1
    started = reactor.seconds()
    with pytest.raises(RegistryError) as info:
        await client.get_manifest(REPO, "v1")
    took = reactor.seconds() - started
    assert 0.3 < took < 2.0, took
    assert info.value.status == 503
    assert "still unavailable after" in info.value.message and "giving up" in info.value.message
    assert len(retries) >= 4  # the delays are capped at max_backoff: many tries in the time
    delays = [float(r.split("retrying in ")[1].split(" s")[0]) for r in retries]
    assert all(0.01 <= d <= 0.1 for d in delays), delays
    assert len(set(delays)) > 1  # jitter


def test_backoff_is_capped_and_jittered():
    client = RegistryClient(reactor, "http://127.0.0.1:9", backoff=0.5, max_backoff=4)
    for failures in range(1, 20):
        exact = min(4.0, 0.5 * 2 ** (failures - 1))
        samples = {client._delay(failures) for _ in range(20)}
        assert all(exact / 2 <= d <= exact for d in samples) and len(samples) > 1


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_retried_for_a_bounded_time(clients):
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.protocol import Factory

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    url = f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    client = clients(url, retries=2, backoff=0.02, max_backoff=0.05, retry_time=0.4)
    started = reactor.seconds()
    with pytest.raises(RegistryUnreachable, match=r"connection refused.*giving up"):
        await client.blob_size(REPO, fmt.EMPTY_DIGEST)
    assert 0.2 < reactor.seconds() - started < 2.0


@pytest_twisted.ensureDeferred
async def test_digest_mismatch_on_upload_is_not_retried(fake, clients, tmp_path):
    client = clients(fake.url)
    path = blob_file(tmp_path, 100)
    wrong = fmt.Blob("sha256:" + "1" * 64, 100)
    with pytest.raises(RegistryError) as info:
        await client.push_file(REPO, path, wrong)
    assert info.value.code == "DIGEST_INVALID"
    assert fake.count("PUT") == 1


@pytest_twisted.ensureDeferred
async def test_unreachable(clients):
    from twisted.internet.endpoints import TCP4ServerEndpoint

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        __import__("twisted.internet.protocol", fromlist=["Factory"]).Factory())
    url = f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    client = clients(url, retries=2, retry_time=0.1)
    with pytest.raises(RegistryUnreachable, match="connection refused"):
        await client.blob_size(REPO, fmt.EMPTY_DIGEST)


# -- token flow ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_token_flow(fake, clients, tmp_path):
    fake.require_auth = True
    client = clients(fake.url, chunk_size=100, credentials=(USER, SECRET),
                     trusted_realms=[fake.url + "/"])
    blob, _ = await client.push_file(REPO, blob_file(tmp_path, 450))
    assert blob.digest in fake.blobs
    [req] = fake.token_requests  # one token, reused for every request
    assert req["service"] == "fake-store"
    assert req["scopes"] == [f"repository:{REPO}:pull,push"]
    assert req["authorization"].startswith("Basic ")
    # Another repository needs another token.
    await client.push_bytes("alice/other", b"x")
    assert len(fake.token_requests) == 2


@pytest_twisted.ensureDeferred
async def test_token_flow_with_lazy_credentials(fake, clients):
    fake.require_auth = True
    asked = []

    async def credentials() -> tuple[str, str]:
        asked.append(1)
        return USER, SECRET

    client = clients(fake.url, credentials=credentials, trusted_realms=[fake.url])
    await client.push_bytes(REPO, b"abc")
    assert asked == [1]


@pytest_twisted.ensureDeferred
async def test_credentials_never_go_to_an_untrusted_realm(fake, clients):
    fake.require_auth = True
    client = clients(fake.url, credentials=(USER, SECRET),
                     trusted_realms=["http://switchboard.example/api/v1/registry/token"])
    with pytest.raises(RegistryError, match="not a trusted token service") as info:
        await client.push_bytes(REPO, b"abc")
    assert info.value.status == 401
    assert fake.token_requests == []
    # A realm that merely starts with the trusted prefix's text is not under it.
    client = clients(fake.url, credentials=(USER, SECRET), trusted_realms=[fake.url + "/tok"])
    with pytest.raises(RegistryError, match="not a trusted token service"):
        await client.push_bytes(REPO, b"abc")
    assert fake.token_requests == []


@pytest_twisted.ensureDeferred
async def test_the_client_asks_for_its_operation_never_the_challenges_scope(fake, clients,
                                                                            tmp_path):
    fake.require_auth = True
    fake.challenge_scope = "repository:alice/fw:pull,push,delete registry:catalog:*"
    client = clients(fake.url, credentials=(USER, SECRET), service="fake-store",
                     realm=fake.realm)
    await client.push_bytes(REPO, b"abc")
    data = fmt.manifest_bytes({"schemaVersion": 2, "layers": []})
    await client.put_manifest(REPO, "v1", data, media_type=OCI_JSON)
    other = clients(fake.url, credentials=(USER, SECRET), service="fake-store",
                    realm=fake.realm)
    await other.get_manifest(REPO, "v1")
    await other.pull_blob(REPO, digest_of(b"abc"), tmp_path / "abc")
    asked = [(r["service"], r["scopes"]) for r in fake.token_requests]
    assert asked == [("fake-store", [f"repository:{REPO}:pull,push"]),
                     ("fake-store", [f"repository:{REPO}:pull"])]


@pytest.mark.parametrize("hostile", ["service", "realm", "realm-prefix"])
@pytest_twisted.ensureDeferred
async def test_a_challenge_naming_another_service_or_realm_is_refused(fake, clients, hostile):
    fake.require_auth = True
    if hostile == "service":
        fake.challenge_service = "real-store"
    elif hostile == "realm":
        fake.challenge_realm = fake.url + "/elsewhere"
    else:
        fake.challenge_realm = fake.realm + "?service=real-store"
    client = clients(fake.url, credentials=(USER, SECRET), service="fake-store",
                     realm=fake.realm)
    with pytest.raises(RegistryError, match="no token was requested") as info:
        await client.get_manifest(REPO, "v1")
    assert info.value.status == 401
    assert fake.token_requests == []
    # Not even anonymously.
    client = clients(fake.url, service="fake-store", realm=fake.realm)
    with pytest.raises(RegistryError, match="no token was requested"):
        await client.get_manifest(REPO, "v1")
    assert fake.token_requests == []


@pytest_twisted.ensureDeferred
async def test_a_redirect_elsewhere_carries_no_token(fake, clients, tmp_path):
    """A store may send blob reads elsewhere (a CDN); its token does not follow."""
    other, port = listen(FakeRegistry())
    try:
        other.blobs[digest_of(b"abc")] = b"abc"
        fake.require_auth = True
        client = clients(fake.url, credentials=(USER, SECRET), service="fake-store",
                         realm=fake.realm)
        await client.push_bytes(REPO, b"abc")
        fake.redirect_blobs = other.url
        await client.pull_blob(REPO, digest_of(b"abc"), tmp_path / "abc")
        assert (tmp_path / "abc").read_bytes() == b"abc"
        assert other.requests and other.authorizations == [""] * len(other.requests)
        assert any(a.startswith("Bearer ") for a in fake.authorizations)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_wrong_credentials(fake, clients):
    fake.require_auth = True
    client = clients(fake.url, credentials=(USER, "nope"), trusted_realms=[fake.url])
    with pytest.raises(RegistryError, match="wrong credentials") as info:
        await client.push_bytes(REPO, b"abc")
    assert info.value.status == 401


@pytest_twisted.ensureDeferred
async def test_premade_token(fake, clients):
    fake.require_auth = True
    fake.tokens["premade"] = {REPO}
    client = clients(fake.url, token="premade")
    await client.push_bytes(REPO, b"abc")
    assert fake.token_requests == []
    with pytest.raises(RegistryError, match="refused the token"):
        await client.push_bytes("alice/elsewhere", b"abc")
    # Anonymous: the token endpoint is asked without credentials, and says no.
    client = clients(fake.url)
    with pytest.raises(RegistryError, match="no credentials"):
        await client.push_bytes(REPO, b"abcd")


def test_parse_challenge():
    scheme, params = parse_challenge(
        'Bearer realm="https://sb.example/api/v1/registry/token",service="store",'
        'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"')
    assert scheme == "bearer"
    assert params == {"realm": "https://sb.example/api/v1/registry/token", "service": "store",
                      "scope": "repository:a/b:pull,push repository:c:pull",
                      "error": "insufficient_scope"}
    assert parse_challenge('Basic realm="x\\"y"') == ("basic", {"realm": 'x"y'})


# -- downloads ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pull_blob(fake, clients, tmp_path):
    data = os.urandom(300_000)
    fake.blobs[digest_of(data)] = data
    client = clients(fake.url)
    seen: list[int] = []
    dest = tmp_path / "out" / "blob"
    blob = await client.pull_blob(REPO, digest_of(data), dest, size=len(data),
                                  progress=lambda d, t: seen.append(d))
    assert blob == fmt.Blob(digest_of(data), len(data))
    assert dest.read_bytes() == data
    assert seen[-1] == len(data)
    assert os.listdir(dest.parent) == ["blob"]


@pytest.mark.parametrize("no_range", [False, True], ids=["range", "restart"])
@pytest_twisted.ensureDeferred
async def test_pull_blob_resumes(fake, clients, tmp_path, no_range):
    data = os.urandom(400_000)
    fake.blobs[digest_of(data)] = data
    fake.drop_get_after = 100_000
    fake.no_range = no_range
    client = clients(fake.url)
    dest = tmp_path / "blob"
    await client.pull_blob(REPO, digest_of(data), dest, size=len(data))
    assert dest.read_bytes() == data
    assert fake.count("GET", "/blobs/") == 2


@pytest_twisted.ensureDeferred
async def test_pull_blob_digest_mismatch(fake, clients, tmp_path):
    data = b"firmware" * 1000
    digest = digest_of(data)
    fake.blobs[digest] = data
    fake.corrupt.add(digest)
    client = clients(fake.url)
    dest = tmp_path / "fw.bin"
    with pytest.raises(DigestMismatch, match="has digest"):
        await client.pull_blob(REPO, digest, dest, size=len(data))
    assert os.listdir(tmp_path) == []  # no file, no temporary left behind
    with pytest.raises(DigestMismatch):
        await client.get_blob(REPO, digest)


@pytest_twisted.ensureDeferred
async def test_pull_blob_larger_than_announced(fake, clients, tmp_path):
    data = b"x" * 5000
    fake.blobs[digest_of(data)] = data
    client = clients(fake.url)
    with pytest.raises(DigestMismatch, match="larger than"):
        await client.pull_blob(REPO, digest_of(data), tmp_path / "b", size=4000)
    assert os.listdir(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_pull_missing_blob(fake, clients, tmp_path):
    client = clients(fake.url)
    with pytest.raises(RegistryError) as info:
        await client.pull_blob(REPO, "sha256:" + "2" * 64, tmp_path / "b")
    assert info.value.status == 404 and info.value.code == "BLOB_UNKNOWN"
    assert os.listdir(tmp_path) == []


# -- manifests --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_manifest_round_trip_and_validation(fake, clients):
    client = clients(fake.url)
    kernel = await client.push_bytes(REPO, b"kernel")
    disk = await client.push_bytes(REPO, b"QFI\xfbdisk")
    manifest = fmt.build_qemu_manifest([disk], kernel=kernel, cmdline="quiet")
    data = fmt.manifest_bytes(manifest)
    # The empty config blob is missing: the store refuses.
    with pytest.raises(RegistryError) as info:
        await client.put_manifest(REPO, "v1", data)
    assert info.value.code == fmt.MANIFEST_BLOB_UNKNOWN
    await client.push_bytes(REPO, fmt.EMPTY_BLOB)
    digest = await client.put_manifest(REPO, "v1", data)
    assert digest == digest_of(data)
    for ref in ("v1", digest):
        got = await client.get_manifest(REPO, ref)
        assert (got.data, got.media_type, got.digest) == (data, fmt.OCI_MANIFEST, digest)
        assert fmt.parse_image(got.json()).kernel is not None
    bad = dict(manifest, layers=[dict(manifest["layers"][0], annotations={
        fmt.ANN_LOWER: "/var/lib/base.qcow2"}), *manifest["layers"][1:]])
    with pytest.raises(RegistryError) as info:
        await client.put_manifest(REPO, "v2", fmt.manifest_bytes(bad))
    assert info.value.code == fmt.DIGEST_INVALID


@pytest_twisted.ensureDeferred
async def test_manifest_digest_checked(fake, clients):
    client = clients(fake.url)
    body = json.dumps({"schemaVersion": 2, "mediaType": fmt.OCI_MANIFEST}).encode()
    digest = await client.put_manifest(REPO, "t", body)
    fake.corrupt.add(digest)
    with pytest.raises(DigestMismatch):
        await client.get_manifest(REPO, digest)
    with pytest.raises(RegistryError) as info:
        await client.get_manifest(REPO, "missing")
    assert info.value.status == 404 and info.value.code == "MANIFEST_UNKNOWN"


# -- helpers ----------------------------------------------------------------------------------


def test_repository_and_reference():
    assert repository_of("Team/Debian-12") == "team/debian-12"
    for bad in ("a..b", "-a", "a/", "a b", "x" * 256, "a/-b"):
        with pytest.raises(ValueError):
            repository_of(bad)
    assert parse_reference("team/debian") == ("team/debian", "latest")
    assert parse_reference("team/debian:v1.2") == ("team/debian", "v1.2")
    with pytest.raises(ValueError):
        parse_reference("debian:bad tag")
    with pytest.raises(ValueError):
        parse_reference(":v1")


@pytest_twisted.ensureDeferred
async def test_file_blob_and_slices(tmp_path):
    path = blob_file(tmp_path, 10_000)
    blob = await file_blob(reactor, path)
    assert blob == fmt.Blob(digest_of(path.read_bytes()), 10_000)
    reads: list[int] = []
    with open(path, "rb") as f:
        s = _Slice(f, 1000, 500, reads.append)
        assert s.seek(0, os.SEEK_END) == 500 and s.tell() == 500
        s.seek(0)
        assert s.read(300) == path.read_bytes()[1000:1300]
        assert s.read() == path.read_bytes()[1300:1500]
        assert s.read() == b""
    assert reads == [300, 200]
    source = BlobSource.from_file(path, blob)
    assert source.producer(9000, 1000).length == 1000
