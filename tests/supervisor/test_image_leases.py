"""The supervisor's image fetcher leases each job's image on a real image cache.

An upstream image store and an image cache (cache mode, pulling through from
it) run in this process; the fetcher reads the cache's root as its mount. A
stand-in for the switchboard's registry token endpoint parses scopes with the
switchboard's own code (so a scope it does not hand out, like
``cache:leases:lease``, is refused as the real one refuses it) and grants the
host token ``pull`` on its job's repository with the subject ``host:<name>``,
to which the cache binds the lease.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import Site

pytest.importorskip("treadmill.imagestore.service")

from tests.imagestore.support import (
    CACHE_SERVICE,
    Keys,
    RunningStore,
    start_cache,
    start_store,
)
from tests.util.waiting import eventually as until
from treadmill.common.captoken import Access
from treadmill.common.config import ConfigError
from treadmill.images import format as fmt
from treadmill.images.oci import RegistryClient
from treadmill.supervisor import tap
from treadmill.supervisor.fetch import ImageFetcher
from treadmill.switchboard import repositories as policy

HOST_TOKENS = {"tmh_host-one-token": "host-1", "tmh_host-two-token": "host-2"}
PUSHER = ("pusher", "tmt_pusher-secret")
DEAD = "http://127.0.0.1:9"  # nothing listens: refused at once
REPO = "lab/fw"


class TokenService(Resource):
    """The switchboard's ``GET /api/v1/registry/token`` for hosts and one pusher."""

    isLeaf = True

    def __init__(self, keys: Keys) -> None:
        super().__init__()
        self.keys = keys
        self.asked: list[str] = []

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        values = [s.decode() for s in request.args.get(b"scope", [])]
        self.asked += values
        try:
            scopes = policy.parse_scopes(values)
        except policy.ScopeError as e:
            request.setResponseCode(400)
            return json.dumps({"error": {"code": "bad_request", "message": str(e)}}).encode()
        _, _, value = (request.getHeader(b"authorization") or b"").decode().partition(" ")
        user, _, secret = base64.b64decode(value).decode().partition(":")
        if secret in HOST_TOKENS:
            subject = f"host:{HOST_TOKENS[secret]}"
            granted = [a for s in scopes if (a := policy.access(
                s, policy.host_actions(s, frozenset({REPO})))) is not None]
        elif (user, secret) == PUSHER:
            subject, granted = user, [Access(s.type, s.name, s.actions) for s in scopes]
        else:
            request.setResponseCode(401)
            return b'{"error": {"code": "unauthenticated", "message": "bad credentials"}}'
        service = (request.args.get(b"service") or [b""])[0].decode()
        token = self.keys.signer.sign(subject, service, granted, 300)
        return json.dumps({"token": token, "expires_in": 300}).encode()


@dataclass
class Site_:
    keys: Keys
    tokens: TokenService
    realm: str  # the trusted realm (the switchboard's URL)
    upstream: RunningStore
    cache: RunningStore
    tmp: Path
    fetchers: list[ImageFetcher] = field(default_factory=list)

    def fetcher(self, name: str = "local", token: str = "tmh_host-one-token",
                **kw: Any) -> ImageFetcher:
        kw.setdefault("cache_url", self.cache.url)
        kw.setdefault("cache_mount", self.cache.config.root)
        fetcher = ImageFetcher(reactor, local_dir=str(self.tmp / name), token=token,
                               trusted_realms=[self.realm], backoff=0.01, retries=2,
                               timeout=5.0, lease_ttl=3.0, lease_wait=10.0, **kw)
        self.fetchers.append(fetcher)
        return fetcher

    async def push(self, disks: list[bytes]) -> tuple[str, dict[str, bytes]]:
        """Push a QEMU image to the upstream store (the cache has none of it)."""
        client = RegistryClient(reactor, self.upstream.url, credentials=PUSHER,
                                trusted_realms=[self.realm], backoff=0.01)
        try:
            await client.push_bytes(REPO, fmt.EMPTY_BLOB)
            blobs = [await client.push_bytes(REPO, data) for data in disks]
            data = fmt.manifest_bytes(fmt.build_qemu_manifest(blobs))
            digest = await client.put_manifest(REPO, "v1", data)
        finally:
            await client.close()
        return digest, {fmt.digest_of(d): d for d in disks}

    def image(self, digest: str, stores: list[str] | None = None) -> dict[str, Any]:
        return {"digest": digest, "name": "Lab/FW",
                "stores": [self.upstream.url] if stores is None else stores}

    def lease_file(self, lease_id: str) -> Path:
        return Path(self.cache.config.root) / "cache" / "leases" / f"{lease_id}.json"

    def lease(self, lease_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.lease_file(lease_id).read_text())
        except FileNotFoundError:
            return None

    async def listed(self) -> list[dict[str, Any]]:
        """``GET /cache/leases`` with a lease token."""
        token = self.keys.token(("cache", "leases", ["lease"]), audience=CACHE_SERVICE)
        r = await self.cache.registry.request("GET", "/cache/leases", token=token)
        assert r.code == 200, r.body
        return r.json["leases"]


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Path) -> AsyncIterator[Site_]:
    keys = Keys(tmp_path)
    tokens = TokenService(keys)
    port = reactor.listenTCP(0, Site(tokens), interface="127.0.0.1")
    realm = f"http://127.0.0.1:{port.getHost().port}"
    token_url = f"{realm}/api/v1/registry/token"
    upstream = await start_store(tmp_path / "upstream", keys, realm=token_url)
    cache = await start_cache(tmp_path / "cache", keys, [upstream.url], realm=token_url)
    running = Site_(keys, tokens, realm, upstream, cache, tmp_path)
    try:
        yield running
    finally:
        for fetcher in running.fetchers:
            await fetcher.close()
        await cache.stop()
        await upstream.stop()
        await port.stopListening()


def qcow2(size: int, seed: int) -> bytes:
    return b"QFI\xfb" + bytes((i * seed + i // 7) % 256 for i in range(size - 4))


@pytest_twisted.ensureDeferred
async def test_the_lease_pulls_the_image_in_is_renewed_and_deleted(site: Site_) -> None:
    digest, layers = await site.push([qcow2(60_000, 3), qcow2(7_000, 5)])
    assert not Path(site.cache.storage.blob_path(digest)).exists()
    fetcher = site.fetcher()
    site.tokens.asked.clear()
    fetched = await fetcher.fetch(site.image(digest))
    # The lease pulled the whole image into the cache; it was read from the mount.
    assert set(fetched.sources.values()) == {"cache"} and fetcher.downloaded_bytes == 0
    for layer, data in layers.items():
        assert Path(fetched.path(layer)).read_bytes() == data
    lease_id = fetcher.lease_id(digest)
    assert fetched.lease == lease_id and lease_id.endswith(digest[7:])
    assert fetcher.leases == {lease_id: 1}
    [listed] = await site.listed()
    assert listed["lease"] == lease_id and listed["digests"] == [digest]
    assert listed["repository"] == REPO
    first = site.lease(lease_id)
    assert first is not None and first["owner"] == "host:host-1"
    # Only the repository's pull was asked for (the switchboard refuses cache scopes).
    assert site.tokens.asked and all(s == f"repository:{REPO}:pull"
                                     for s in " ".join(site.tokens.asked).split())

    # Renewed every ttl/3 (1 s) while held.
    await until(lambda: (site.lease(lease_id) or first)["expires_at"] > first["expires_at"])
    renewed = site.lease(lease_id)
    assert renewed is not None and renewed["created_at"] == first["created_at"]

    # A second job of the same image shares it; the last release deletes it.
    again = await fetcher.fetch(site.image(digest))
    assert again.lease == lease_id and fetcher.leases == {lease_id: 2}
    fetcher.release(fetched)
    await deferLater(reactor, 0.1, lambda: None)
    assert site.lease(lease_id) is not None
    fetcher.release(again)
    await until(lambda: site.lease(lease_id) is None)
    assert await site.listed() == [] and fetcher.leases == {}


@pytest_twisted.ensureDeferred
async def test_without_the_cache_the_fetch_comes_from_the_stores(site: Site_) -> None:
    digest, layers = await site.push([qcow2(20_000, 7)])
    fetcher = site.fetcher(cache_url=DEAD)
    with capturedLogs() as events:
        fetched = await fetcher.fetch(site.image(digest))
    assert set(fetched.sources.values()) == {site.upstream.url}
    [warning] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert f"cannot take lease {fetcher.lease_id(digest)} on the image cache {DEAD}" in warning
    assert "connection refused" in warning and "the job's stores for the rest" in warning
    assert fetcher.downloaded_bytes == sum(len(d) for d in layers.values())
    assert await site.listed() == []
    fetcher.release(fetched)
    assert fetcher.leases == {}

    # A cache that refuses (the host may not pull the repository there): the same.
    site.cache.service.api.auth.realm = f"{DEAD}/api/v1/registry/token"  # untrusted realm
    other = site.fetcher("other")
    with capturedLogs() as events:
        fetched = await other.fetch(site.image(digest))
    assert set(fetched.sources.values()) == {site.upstream.url}
    assert any("not a trusted token service" in formatEvent(e) for e in events
               if e["log_level"] == LogLevel.warn)
    assert await site.listed() == []
    other.release(fetched)


@pytest_twisted.ensureDeferred
async def test_a_restarted_supervisor_renews_the_same_lease(site: Site_) -> None:
    digest, _ = await site.push([qcow2(9_000, 3)])
    image = site.image(digest)
    first = site.fetcher()
    fetched = await first.fetch(image)
    lease_id = fetched.lease
    assert lease_id is not None
    created = site.lease(lease_id)
    assert created is not None
    # The supervisor stops: the job's VM goes on, so its lease stays.
    await first.close()
    first.release(fetched)
    await deferLater(reactor, 0.1, lambda: None)
    assert site.lease(lease_id) == created

    # The next start adopts the job: the same lease id is renewed, not duplicated.
    restarted = site.fetcher("local")
    pinned = list(fetched.layers)
    restarted.pin(pinned, image=image)
    await until(lambda: (site.lease(lease_id) or created)["expires_at"] > created["expires_at"])
    renewed = site.lease(lease_id)
    assert renewed is not None and renewed["created_at"] == created["created_at"]
    assert [le["lease"] for le in await site.listed()] == [lease_id]
    assert restarted.pinned(pinned[0]) and restarted.leases == {lease_id: 1}

    # Another host leases the same image under its own id.
    other = site.fetcher("other", token="tmh_host-two-token")
    assert other.lease_id(digest) != lease_id
    held = await other.fetch(image)
    assert sorted(le["lease"] for le in await site.listed()) == sorted(
        [lease_id, other.lease_id(digest)])

    # The adopted job ends: its lease goes.
    restarted.release_digests(pinned)
    await until(lambda: site.lease(lease_id) is None)
    assert not restarted.pinned(pinned[0]) and restarted.leases == {}
    other.release(held)
    await until(lambda: site.lease(other.lease_id(digest)) is None)


def test_the_cache_url_setting() -> None:
    base = ("--switchboard-url", "wss://sb.example.org", "--switchboard-token", "t",
            "--state-dir", "/x")
    parsed = tap.Options()
    parsed.parseOptions([*base, "--images-cache-mount", "/mnt/cache",
                         "--images-cache-url", "https://cache.example.org:8081/"])
    config = tap.config_from(parsed.values)
    assert config.images_cache_url == "https://cache.example.org:8081"
    assert config.image_fetcher(reactor).cache_url == "https://cache.example.org:8081"
    for argv, message in (([*base, "--images-cache-url", "https://cache.example.org"],
                           "needs images.cache_mount"),
                          ([*base, "--images-cache-mount", "/m", "--images-cache-url", "nfs://x"],
                           "--images-cache-url")):
        with pytest.raises(ConfigError) as raised:
            tap.Options().parseOptions(argv)
        assert message in str(raised.value)
