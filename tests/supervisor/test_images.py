"""The supervisor's image fetcher against a real image store, in-process.

The store (``treadmill.imagestore``) requires capability tokens; a small token
service on loopback plays the switchboard's ``GET /api/v1/registry/token``: it
grants ``pull`` to the host token (as an HTTP Basic password, any user name)
and everything to a pusher, so the fetcher's whole token flow runs against
the store's real challenges. The cache mount tests point ``cache_mount`` at
the store's root, which has the layout a site image cache shares over NFS.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Site

pytest.importorskip("treadmill.imagestore.service")

from tests.imagestore.support import Keys, RunningStore, start_store
from treadmill.common.captoken import Access
from treadmill.images import format as fmt
from treadmill.images.oci import RegistryClient, RegistryError
from treadmill.supervisor.blobcache import blob_path
from treadmill.supervisor.fetch import FetchedImage, ImageFetcher, ImageFetchError, http_url_for

HOST_TOKEN = "tmh_host-token-for-tests"
PUSHER = ("pusher", "tmt_pusher-secret")
DEAD_STORE = "http://127.0.0.1:9"  # nothing listens: refused at once


class TokenService(Resource):
    """The switchboard's registry token endpoint, reduced to two callers, and its list of
    registered stores (``GET /api/v1/stores``, host token only)."""

    isLeaf = True

    def __init__(self, keys: Keys) -> None:
        super().__init__()
        self.keys = keys
        self.host_users: list[str] = []
        self.host_repositories: set[str] | None = None  # None: any
        self.stores: dict[str, str] = {DEAD_STORE: "dead"}  # registered: URL -> service
        self.listed = 0

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        header = (request.getHeader(b"authorization") or b"").decode()
        if request.path == b"/api/v1/stores":
            if header != f"Bearer {HOST_TOKEN}":
                request.setResponseCode(401)
                return b'{"error": {"code": "unauthenticated", "message": "no"}}'
            self.listed += 1
            return json.dumps({"stores": [{"url": url, "service": service} for url, service
                                          in self.stores.items()]}).encode()
        scheme, _, value = header.partition(" ")
        user, _, secret = (base64.b64decode(value).decode().partition(":")
                           if scheme == "Basic" else ("", "", ""))
        scopes = " ".join(s.decode() for s in request.args.get(b"scope", [])).split()
        granted = []
        if secret == HOST_TOKEN:
            self.host_users.append(user)
            for scope in scopes:
                _, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                if "pull" in actions.split(",") and (
                        self.host_repositories is None or name in self.host_repositories):
                    granted.append(Access("repository", name, ("pull",)))
        elif (user, secret) == PUSHER:
            for scope in scopes:
                _, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                granted.append(Access("repository", name, tuple(actions.split(","))))
        else:
            request.setResponseCode(401)
            return b'{"error": {"code": "unauthenticated", "message": "bad credentials"}}'
        token = self.keys.signer.sign(user or "anonymous", "treadmill-imagestore", granted, 300)
        return json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()


@dataclass
class Bed:
    store: RunningStore
    tokens: TokenService
    switchboard: str  # the token service's base URL (the trusted realm)
    root: Path
    tmp: Path
    fetchers: list[ImageFetcher] = field(default_factory=list)
    pushers: list[RegistryClient] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.store.url

    def fetcher(self, name: str = "local", **kw: Any) -> ImageFetcher:
        kw.setdefault("cache_mount", None)
        kw.setdefault("token", HOST_TOKEN)
        kw.setdefault("trusted_realms", [self.switchboard])
        kw.setdefault("switchboard", self.switchboard)
        fetcher = ImageFetcher(reactor, local_dir=str(self.tmp / name), backoff=0.01,
                               retries=2, timeout=5.0, retry_time=0.2, **kw)
        self.fetchers.append(fetcher)
        return fetcher

    def pusher(self) -> RegistryClient:
        client = RegistryClient(reactor, self.url, credentials=PUSHER,
                                trusted_realms=[self.switchboard], backoff=0.01)
        self.pushers.append(client)
        return client

    async def push_qemu(self, repo: str, disks: list[bytes], kernel: bytes | None = None,
                        tag: str = "v1") -> tuple[str, dict[str, bytes]]:
        """Push a QEMU image; return its digest and its layers' bytes by digest."""
        client = self.pusher()
        await client.push_bytes(repo, fmt.EMPTY_BLOB)
        blobs = [await client.push_bytes(repo, data) for data in disks]
        kernel_blob = await client.push_bytes(repo, kernel) if kernel is not None else None
        manifest = fmt.build_qemu_manifest(blobs, kernel=kernel_blob)
        digest = await client.put_manifest(repo, tag, fmt.manifest_bytes(manifest))
        layers = {fmt.digest_of(d): d for d in [*disks, *([kernel] if kernel else [])]}
        return digest, layers

    def image(self, digest: str, name: str | None = "lab/tiny", stores: Any = None
              ) -> dict[str, Any]:
        return {"digest": digest, "name": name,
                "stores": [self.url] if stores is None else stores}


@pytest_twisted.async_yield_fixture
async def bed(tmp_path: Path) -> AsyncIterator[Bed]:
    keys = Keys(tmp_path)
    tokens = TokenService(keys)
    port = reactor.listenTCP(0, Site(tokens), interface="127.0.0.1")
    switchboard = f"http://127.0.0.1:{port.getHost().port}"
    store = await start_store(tmp_path / "store", keys,
                              realm=f"{switchboard}/api/v1/registry/token")
    tokens.stores[store.url] = "treadmill-imagestore"
    testbed = Bed(store, tokens, switchboard, tmp_path / "store", tmp_path)
    try:
        yield testbed
    finally:
        for client in testbed.pushers:
            await client.close()
        await store.stop()
        await port.stopListening()


def qcow2(size: int, seed: int) -> bytes:
    return b"QFI\xfb" + bytes((i * seed + i // 7) % 256 for i in range(size - 4))


async def fails(d: Any) -> ImageFetchError:
    with pytest.raises(ImageFetchError) as info:
        await d
    return info.value


def local_blobs(directory: Path) -> set[str]:
    base = directory / "blobs" / "sha256"
    if not base.exists():
        return set()
    return {"sha256:" + p.name for p in base.glob("*/*") if not p.name.startswith(".")}


# -- from a store ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fetch_from_a_store_with_the_host_token(bed: Bed) -> None:
    base, top = qcow2(70_000, 3), qcow2(9_000, 5)
    digest, layers = await bed.push_qemu("lab/tiny", [base, top], kernel=b"vmlinuz")
    fetcher = bed.fetcher()
    fetched = await fetcher.fetch(bed.image(digest, name="Lab/Tiny"))  # repository: lowercased
    assert isinstance(fetched, FetchedImage)
    assert fetched.digest == digest and fetched.image.kind == "qemu"
    assert [d.digest for d in fetched.image.qcow2] == [fmt.digest_of(base), fmt.digest_of(top)]
    assert set(fetched.layers) == set(layers)
    for layer, data in layers.items():
        path = Path(fetched.path(layer))
        assert path == Path(blob_path(str(bed.tmp / "local"), layer))
        assert path.read_bytes() == data
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
        assert fetched.sources[layer] == bed.url
    assert Path(fetched.path(fetched.image.top)).read_bytes() == top
    # The manifest is kept too, so a later job needs no store for it.
    assert (Path(blob_path(str(bed.tmp / "local"), digest)).read_bytes() == fetched.manifest)
    # The host token went to the trusted realm as a Basic password.
    assert bed.tokens.host_users and set(bed.tokens.host_users) == {"host"}
    assert fetcher.downloaded_bytes == sum(len(d) for d in layers.values())
    assert fetcher.layer_sources == {"store": len(layers)}  # the metrics' misses
    assert fetcher.manifest_bytes == len(fetched.manifest)
    assert not list((bed.tmp / "local").rglob("*.part"))


@pytest_twisted.ensureDeferred
async def test_blobs_already_local_are_reused_without_any_store(bed: Bed) -> None:
    digest, layers = await bed.push_qemu("lab/tiny", [qcow2(20_000, 3)])
    first = await bed.fetcher().fetch(bed.image(digest))
    # A new fetcher (a restarted supervisor) verifies the local files and reuses them,
    # even when the store is unreachable.
    fetcher = bed.fetcher()
    again = await fetcher.fetch(bed.image(digest, stores=[DEAD_STORE]))
    assert again.paths == first.paths and set(again.sources.values()) == {"local"}
    assert fetcher.downloaded_bytes == 0 and fetcher.manifest_bytes == 0
    assert fetcher.layer_sources == {"local": len(layers)}  # the metrics' local hits
    # A corrupt local blob is noticed, deleted and downloaded again.
    [layer] = layers
    path = Path(first.path(layer))
    path.chmod(0o644)
    path.write_bytes(b"X" * len(layers[layer]))
    fresh = bed.fetcher()
    fixed = await fresh.fetch(bed.image(digest))
    assert Path(fixed.path(layer)).read_bytes() == layers[layer]
    assert fixed.sources[layer] == bed.url and fresh.downloaded_bytes == len(layers[layer])


@pytest_twisted.ensureDeferred
async def test_an_unreachable_store_is_skipped_for_the_next(bed: Bed) -> None:
    digest, _ = await bed.push_qemu("lab/tiny", [qcow2(5_000, 3)])
    fetched = await bed.fetcher().fetch(bed.image(digest, stores=[DEAD_STORE, bed.url]))
    assert set(fetched.sources.values()) == {bed.url}


# -- from the cache mount ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fetch_from_the_cache_mount_in_place(bed: Bed) -> None:
    digest, layers = await bed.push_qemu("lab/tiny", [qcow2(30_000, 3), qcow2(4_000, 9)])
    fetcher = bed.fetcher(cache_mount=str(bed.root))
    # No store at all, and no name: the mount is addressed by digest alone.
    fetched = await fetcher.fetch(bed.image(digest, name=None, stores=[]))
    for layer, data in layers.items():
        assert fetched.path(layer) == blob_path(str(bed.root), layer)
        assert Path(fetched.path(layer)).read_bytes() == data
    assert set(fetched.sources.values()) == {"cache"}
    assert fetcher.downloaded_bytes == 0 and local_blobs(bed.tmp / "local") == set()
    assert fetcher.can_fetch({"digest": digest, "stores": []})


@pytest_twisted.ensureDeferred
async def test_a_corrupt_blob_in_the_mount_is_detected(bed: Bed) -> None:
    base, top = qcow2(30_000, 3), qcow2(4_000, 9)
    digest, _ = await bed.push_qemu("lab/tiny", [base, top])
    mount = bed.tmp / "mount"
    shutil.copytree(bed.root, mount)
    bad = Path(blob_path(str(mount), fmt.digest_of(top)))
    bad.chmod(0o644)
    bad.write_bytes(b"Y" * len(top))  # same size, other bytes
    # With a store to fall back on, the layer comes from there.
    fetcher = bed.fetcher(cache_mount=str(mount))
    fetched = await fetcher.fetch(bed.image(digest))
    assert fetched.sources[fmt.digest_of(base)] == "cache"
    assert fetched.sources[fmt.digest_of(top)] == bed.url
    assert Path(fetched.path(fmt.digest_of(top))).read_bytes() == top
    # Without one, the job's image is invalid, and the message says where and what.
    error = await fails(bed.fetcher("other", cache_mount=str(mount)).fetch(
        bed.image(digest, stores=[])))
    assert error.code == "image_invalid"
    assert str(bad) in error.message and fmt.digest_of(top) in error.message
    assert "has digest" in error.message


@pytest_twisted.ensureDeferred
async def test_a_mount_that_is_not_a_store_root_falls_back_to_the_stores(bed: Bed) -> None:
    digest, _ = await bed.push_qemu("lab/tiny", [qcow2(3_000, 3)])
    empty = bed.tmp / "not-mounted"
    empty.mkdir()
    fetched = await bed.fetcher(cache_mount=str(empty)).fetch(bed.image(digest))
    assert set(fetched.sources.values()) == {bed.url}
    error = await fails(bed.fetcher("other", cache_mount=str(empty)).fetch(
        bed.image(digest, stores=[])))
    assert error.code == "image_not_found" and "not mounted?" in error.message


@pytest_twisted.ensureDeferred
async def test_the_mount_is_verified_once_per_run(bed: Bed, monkeypatch: Any) -> None:
    digest, layers = await bed.push_qemu("lab/tiny", [qcow2(10_000, 3)])
    fetcher = bed.fetcher(cache_mount=str(bed.root))
    opened: list[str] = []
    real_open = open

    def counting_open(path: Any, *args: Any, **kw: Any) -> Any:
        opened.append(str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr("builtins.open", counting_open)
    [layer] = layers
    path = blob_path(str(bed.root), layer)
    fetched = await fetcher.fetch(bed.image(digest, stores=[]))
    fetcher.release(fetched)
    await fetcher.fetch(bed.image(digest, stores=[]))
    assert opened.count(path) == 1  # hashed the first time only


# -- failures ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_missing_image_is_image_not_found(bed: Bed) -> None:
    await bed.push_qemu("lab/tiny", [qcow2(3_000, 3)])
    missing = "sha256:" + "0" * 64
    error = await fails(bed.fetcher().fetch(bed.image(missing)))
    assert error.code == "image_not_found"
    assert bed.url in error.message and missing in error.message
    assert "MANIFEST_UNKNOWN" in error.message
    # No store and no mount.
    error = await fails(bed.fetcher().fetch(bed.image(missing, stores=[])))
    assert error.code == "image_not_found"
    assert "no cache mount is configured and the job lists no image store" in error.message
    # A repository the host may not pull.
    digest, _ = await bed.push_qemu("lab/tiny", [qcow2(3_000, 4)], tag="v2")
    bed.tokens.host_repositories = {"lab/other"}
    error = await fails(bed.fetcher("x").fetch(bed.image(digest)))
    assert error.code == "image_not_found" and "access refused" in error.message
    # A digest-only job with stores but no cache mount: stores need a repository.
    error = await fails(bed.fetcher("y").fetch(bed.image(digest, name=None)))
    assert error.code == "image_not_found" and "by digest only" in error.message
    # Not even a digest.
    error = await fails(bed.fetcher().fetch(bed.image("latest")))
    assert error.code == "image_invalid"


@pytest_twisted.ensureDeferred
async def test_the_host_token_goes_only_to_a_trusted_realm(bed: Bed) -> None:
    digest, _ = await bed.push_qemu("lab/tiny", [qcow2(3_000, 3)])
    # Without a switchboard to ask (a bare fetcher), the trusted realm prefixes decide.
    fetcher = bed.fetcher(trusted_realms=["http://switchboard.example"], switchboard=None)
    error = await fails(fetcher.fetch(bed.image(digest)))
    assert error.code == "image_not_found" and "not a trusted token service" in error.message
    assert bed.tokens.host_users == []
    # With one, only its token endpoint: a store pointing elsewhere gets refused unasked.
    bed.store.service.auth.realm = "http://127.0.0.1:9/api/v1/registry/token"
    error = await fails(bed.fetcher().fetch(bed.image(digest)))
    assert "no token was requested" in error.message, error.message
    assert bed.tokens.host_users == []


@pytest_twisted.ensureDeferred
async def test_unregistered_stores_are_never_contacted(bed: Bed) -> None:
    """A job start naming a store the switchboard does not list: refused unasked, even
    when it is the only one; a registered store after it serves the image."""
    from tests.images.ocifake import FakeRegistry, listen

    digest, _ = await bed.push_qemu("lab/tiny", [qcow2(3_000, 3)])
    rogue, port = listen(FakeRegistry(require_auth=True,
                                      realm=f"{bed.switchboard}/api/v1/registry/token"))
    try:
        fetcher = bed.fetcher()
        error = await fails(fetcher.fetch(bed.image(digest, stores=[rogue.url])))
        assert error.code == "image_not_found"
        assert f"{rogue.url} is not registered" in error.message
        fetched = await fetcher.fetch(bed.image(digest, stores=[rogue.url + "/", bed.url]))
        assert set(fetched.sources.values()) == {bed.url}
        assert rogue.requests == [] and rogue.token_requests == []
        assert bed.tokens.listed == 1  # the list is kept for stores_ttl
        # Registered afterwards: used once the list is older than stores_ttl.
        bed.tokens.stores[rogue.url] = "fake-store"
        fetcher.stores_ttl = 0
        await fails(fetcher.fetch(bed.image(fmt.digest_of(b"absent"), stores=[rogue.url])))
        assert bed.tokens.listed >= 2 and rogue.requests
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_store_client_made_before_any_fetch_asks_for_the_registered_service(
        bed: Bed) -> None:
    """``registry_client`` (snapshots) looks the store's service up before a token, and
    gets none for a store that is not registered."""
    from tests.images.ocifake import FakeRegistry, listen

    digest, _ = await bed.push_qemu("lab/tiny", [qcow2(3_000, 3)])
    fetcher = bed.fetcher()
    client = fetcher.registry_client(bed.url)
    try:
        assert (await client.get_manifest("lab/tiny", digest)).digest == digest
        assert client.service == "treadmill-imagestore" and bed.tokens.listed == 1
    finally:
        await client.close()
    rogue, port = listen(FakeRegistry(require_auth=True,
                                      realm=f"{bed.switchboard}/api/v1/registry/token"))
    client = fetcher.registry_client(rogue.url)
    try:
        with pytest.raises(RegistryError, match="not registered"):
            await client.push_bytes("lab/snap", b"disk")
        assert rogue.token_requests == [] and set(rogue.authorizations) == {""}
        assert bed.tokens.host_users == ["host"]  # the one token, for the real store
    finally:
        await client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_without_the_switchboards_list_no_store_is_contacted(bed: Bed) -> None:
    digest, _ = await bed.push_qemu("lab/tiny", [qcow2(3_000, 3)])
    fetcher = bed.fetcher(switchboard=DEAD_STORE)  # nothing listens there
    error = await fails(fetcher.fetch(bed.image(digest)))
    assert error.code == "image_not_found"
    assert "not registered" in error.message and "cannot list them" in error.message
    assert bed.tokens.host_users == []
    # A wrong host token: the switchboard refuses the listing, same outcome.
    error = await fails(bed.fetcher(token="tmh_wrong").fetch(bed.image(digest)))
    assert "cannot list them" in error.message and "HTTP 401" in error.message


@pytest_twisted.ensureDeferred
async def test_a_non_treadmill_manifest_is_image_invalid(bed: Bed) -> None:
    client = bed.pusher()
    repo = "lab/plain"
    config = await client.push_bytes(repo, b'{"architecture":"amd64","os":"linux"}')
    layer = await client.push_bytes(repo, b"a tar layer")
    manifest = {"schemaVersion": 2, "mediaType": fmt.OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config.digest, "size": config.size},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": layer.digest, "size": layer.size}]}
    digest = await client.put_manifest(repo, "v1", json.dumps(manifest).encode())
    error = await fails(bed.fetcher().fetch(bed.image(digest, name="lab/plain")))
    assert error.code == "image_invalid"
    assert "not a valid Treadmill image" in error.message and digest in error.message
    assert bed.url in error.message


@pytest_twisted.ensureDeferred
async def test_a_corrupt_blob_in_the_store_is_image_invalid(bed: Bed) -> None:
    top = qcow2(4_000, 9)
    digest, _ = await bed.push_qemu("lab/tiny", [qcow2(5_000, 3), top])
    bad = Path(blob_path(str(bed.root), fmt.digest_of(top)))
    bad.chmod(0o644)
    bad.write_bytes(b"Z" * len(top))
    fetcher = bed.fetcher()
    error = await fails(fetcher.fetch(bed.image(digest)))
    assert error.code == "image_invalid"
    assert fmt.digest_of(top) in error.message and bed.url in error.message
    # Nothing half-written stays, and nothing stays pinned.
    local = bed.tmp / "local"
    assert fmt.digest_of(top) not in local_blobs(local)
    assert not list(local.rglob("*.part"))
    assert not fetcher._pins


# -- the local directory's size limit ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_least_recently_used_blobs_go_first_never_the_current_jobs(bed: Bed) -> None:
    images = {}
    for name, seed in (("a", 3), ("b", 5), ("c", 7)):
        images[name] = await bed.push_qemu(f"lab/{name}", [qcow2(10_000, seed)])
    # Room for about two images (10 kB of layer plus a small manifest each).
    fetcher = bed.fetcher(local_limit=25_000)
    local = bed.tmp / "local"

    async def use(name: str) -> FetchedImage:
        digest, _ = images[name]
        fetched = await fetcher.fetch(bed.image(digest, name=f"lab/{name}"))
        fetcher.release(fetched)  # the job ended
        return fetched

    def held(name: str) -> bool:
        digest, layers = images[name]
        return set(layers) | {digest} <= local_blobs(local)

    await use("a")
    await use("b")
    await use("a")  # a is used again: b is now the least recently used
    await use("c")
    assert held("a") and held("c") and not held("b")

    # A job's blobs are never collected while it runs, even over the limit.
    fetcher.local_limit = 0
    digest, layers = images["b"]
    current = await fetcher.fetch(bed.image(digest, name="lab/b"))
    assert local_blobs(local) == set(layers) | {digest}
    assert all(os.path.exists(p) for p in current.paths.values())
    fetcher.release(current)
    await fetcher.collect()
    assert local_blobs(local) == set()


@pytest_twisted.ensureDeferred
async def test_stale_partial_downloads_are_removed(bed: Bed) -> None:
    fetcher = bed.fetcher()
    part = Path(blob_path(str(bed.tmp / "local"), "sha256:" + "ab" * 32))
    part.parent.mkdir(parents=True)
    stale = part.with_name(f".{part.name}.x.part")
    fresh = part.with_name(f".{part.name}.y.part")
    stale.write_bytes(b"old")
    fresh.write_bytes(b"new")
    os.utime(stale, (0, 0))
    await fetcher.collect()
    assert not stale.exists() and fresh.exists()


@pytest_twisted.ensureDeferred
async def test_a_cancelled_fetch_leaves_nothing_pinned(bed: Bed) -> None:
    digest, _ = await bed.push_qemu("lab/tiny", [qcow2(200_000, 3)])
    fetcher = bed.fetcher()
    d: Deferred[FetchedImage] = Deferred.fromCoroutine(fetcher.fetch(bed.image(digest)))
    d.cancel()
    with pytest.raises(Exception):  # noqa: B017 - CancelledError or a wrapped one
        await d
    assert not fetcher._pins
    # The fetcher still works afterwards (its lock was released).
    fetched = await fetcher.fetch(bed.image(digest))
    assert fetched.digest == digest


def test_the_trusted_realm_is_the_switchboards_http_url() -> None:
    assert http_url_for("ws://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert http_url_for("wss://sb.example.org/prefix/") == "https://sb.example.org/prefix"


def test_the_fetcher_never_shows_the_token(tmp_path: Path) -> None:
    fetcher = ImageFetcher(reactor, cache_mount=None, local_dir=str(tmp_path), token=HOST_TOKEN)
    assert HOST_TOKEN not in repr(fetcher)
    assert not fetcher.can_fetch({"digest": "sha256:" + "0" * 64, "stores": []})
    assert not (tmp_path / "blobs").exists()  # nothing happens before a fetch
