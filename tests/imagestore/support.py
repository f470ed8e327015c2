"""Helpers for image store tests: an in-process store, tokens, a small registry client."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import Agent

from tests.util.captokens import ISSUER, SigningKey
from tests.util.raw import raw_request
from treadmill.common.captoken import Access
from treadmill.imagestore.service import ImageStoreConfig, ImageStoreService

SERVICE = "treadmill-imagestore"
REALM = "http://127.0.0.1:9/api/v1/registry/token"  # nothing listens: refused at once
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Keys(SigningKey):
    """The switchboard's key, and tokens for an image store's repositories."""

    def signed_at(self, when: float, *access: tuple[str, str, list[str]], ttl: float = 60.0,
                  audience: str = SERVICE, issuer: str = ISSUER) -> str:
        """A token signed as if the time were ``when`` (to make expired ones)."""
        return self.sign("alice", audience, [Access(t, n, tuple(a)) for t, n, a in access], ttl,
                         issued_at=when, issuer=issuer)

    def token(self, *access: tuple[str, str, list[str]] | Access, subject: str = "alice",
              audience: str = SERVICE, ttl: float = 300.0) -> str:
        entries = [a if isinstance(a, Access) else Access(a[0], a[1], tuple(a[2]))
                   for a in access]
        return self.sign(subject, audience, entries, ttl)

    def repo(self, name: str, *actions: str, **kw: Any) -> str:
        return self.token(("repository", name, list(actions)), **kw)


@dataclass
class Response:
    code: int
    headers: Any
    body: bytes
    length: Any = None

    def header(self, name: str) -> str | None:
        if name.lower() == "content-length":
            # Twisted's client moves Content-Length out of the headers.
            return None if not isinstance(self.length, int) else str(self.length)
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode() if values else None

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str | None:
        try:
            return self.json["errors"][0]["code"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None


@dataclass
class Registry:
    """A small OCI registry client over real HTTP."""

    url: str
    token: str | None = None

    def with_token(self, token: str | None) -> Registry:
        return Registry(self.url, token)

    async def request(self, method: str, path: str, data: Any = None,
                      headers: dict[str, str] | None = None, token: str | None = None,
                      ) -> Response:
        all_headers = dict(headers or {})
        bearer = token if token is not None else self.token
        if bearer:
            all_headers["authorization"] = f"Bearer {bearer}"
        url = path if path.startswith("http") else self.url + path
        if method == "HEAD":
            return await self._raw_head(url, all_headers)
        client = HTTPClient(Agent(reactor))
        response = await client.request(method, url, data=data, headers=all_headers,
                                        allow_redirects=False)
        body = await response.content()
        return Response(response.code, response.headers, body, response.length)

    async def complete_upload(self, location: str, data: bytes, offset: int) -> None:
        """Send ``data[offset:]`` to the upload session at ``location``, commit it as
        ``data`` and check that the blob reads back."""
        r = await self.request("PATCH", location, data[offset:],
                               {"content-range": f"{offset}-{len(data) - 1}"})
        assert r.code == 202, r.body
        r = await self.request("PUT", f"{location}?digest={digest_of(data)}")
        assert r.code == 201, r.body
        blobs = location.split("/blobs/uploads/")[0] + "/blobs/"
        r = await self.request("GET", blobs + digest_of(data))
        assert r.body == data

    async def _raw_head(self, url: str, headers: dict[str, str]) -> Response:
        """HEAD over a raw socket: Twisted's client hides a HEAD's Content-Length."""
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"HEAD {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        _status, raw = await raw_request(parts.port or 80,
                                         ("\r\n".join(lines) + "\r\n\r\n").encode())
        return parse_response(raw, head=True)

    async def push_blob(self, name: str, data: bytes) -> str:
        digest = digest_of(data)
        r = await self.request("POST", f"/v2/{name}/blobs/uploads/?digest={digest}", data,
                               {"content-type": "application/octet-stream"})
        assert r.code == 201, (r.code, r.body)
        return digest

    async def push_manifest(self, name: str, reference: str, manifest: dict[str, Any],
                            media_type: str = OCI_MANIFEST) -> Response:
        body = json.dumps(manifest).encode()
        return await self.request("PUT", f"/v2/{name}/manifests/{reference}", body,
                                  {"content-type": media_type})

    async def push_image(self, name: str, tag: str, layers: list[bytes],
                         config: bytes = b'{"architecture":"amd64","os":"linux"}',
                         ) -> tuple[str, dict[str, Any]]:
        """Push blobs and a manifest; return the manifest's digest and content."""
        config_digest = await self.push_blob(name, config)
        descriptors = []
        for layer in layers:
            descriptors.append({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                "digest": await self.push_blob(name, layer),
                                "size": len(layer)})
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": config_digest, "size": len(config)},
                    "layers": descriptors}
        r = await self.push_manifest(name, tag, manifest)
        assert r.code == 201, (r.code, r.body)
        return r.header("docker-content-digest") or "", manifest


@dataclass
class RunningStore:
    service: ImageStoreService
    url: str
    keys: Keys | None
    config: ImageStoreConfig
    registry: Registry = field(init=False)

    def __post_init__(self) -> None:
        self.registry = Registry(self.url)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def storage(self) -> Any:
        return self.service.storage

    async def stop(self) -> None:
        if self.service.running:
            await self.service.stopService()


async def start_store(root: Path, keys: Keys | None, **overrides: Any) -> RunningStore:
    """An image store in this process on a free loopback port."""
    settings: dict[str, Any] = {"listen": ["tcp:0:interface=127.0.0.1"], "realm": REALM,
                                "access_log": False, "gc_grace": 0.0}
    if keys is not None:
        settings["keys_file"] = str(keys.keys_file)
    else:
        settings["auth_disabled"] = True
    settings.update(overrides)
    config = ImageStoreConfig(root=str(root), **settings)
    service = ImageStoreService(reactor, config)
    service.startService()
    await service.ready()
    port = service.ports()[0].getHost().port
    return RunningStore(service, f"http://127.0.0.1:{port}", keys, config)


def _tar_gz(files: dict[str, bytes]) -> tuple[bytes, bytes]:
    """A deterministic gzipped tar of ``files``; return (compressed, uncompressed)."""
    import gzip
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 1700000000
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), tar_bytes


def build_oci_layout(directory: Path, tag: str) -> dict[str, bytes]:
    """An OCI image layout with a config and two layers; return its blobs by digest."""
    layers = [_tar_gz({"etc/motd": b"hello from treadmill\n"}),
              _tar_gz({"boot/firmware.bin": bytes(range(256)) * 64})]
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest_of(raw) for _, raw in layers]},
    }).encode()
    blobs: dict[str, bytes] = {digest_of(config): config}
    layer_descriptors = []
    for compressed, _raw in layers:
        blobs[digest_of(compressed)] = compressed
        layer_descriptors.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                  "digest": digest_of(compressed), "size": len(compressed)})
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest_of(config), "size": len(config)},
        "layers": layer_descriptors,
    }).encode()
    blobs[digest_of(manifest)] = manifest
    (directory / "blobs" / "sha256").mkdir(parents=True)
    for digest, content in blobs.items():
        (directory / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(content)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest_of(manifest),
                       "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }))
    return blobs


def parse_response(raw: bytes, head: bool = False) -> Response:
    """A raw HTTP/1.1 response (with a Content-Length body, or none)."""
    from twisted.web.http_headers import Headers

    head_part, _, body = raw.partition(b"\r\n\r\n")
    lines = head_part.split(b"\r\n")
    code = int(lines[0].split(b" ", 2)[1])
    headers = Headers()
    length = None
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        headers.addRawHeader(key.strip(), value.strip())
        if key.strip().lower() == b"content-length":
            length = int(value.strip())
    return Response(code, headers, b"" if head else body, length)


# -- the image cache ------------------------------------------------------------------

CACHE_SERVICE = "treadmill-imagecache"


def count_requests(store: RunningStore) -> list[tuple[str, str]]:
    """Record ``(method, uri)`` of every request ``store`` answers from now on."""
    seen: list[tuple[str, str]] = []
    original = store.service.site.log

    def log(request: Any) -> None:
        seen.append((request.method.decode(), request.uri.decode()))
        original(request)

    store.service.site.log = log  # type: ignore[method-assign]
    return seen


async def start_cache(root: Path, keys: Keys | None, upstreams: list[str],
                      cache_settings: dict[str, Any] | None = None,
                      **overrides: Any) -> RunningStore:
    """An image cache (``cache.enabled``) in this process; fast retries, no periodic work.

    Without ``upstream`` credentials in ``cache_settings``, the cache gets a token from
    ``keys`` pulling ``lab/fw`` and ``lab/other`` from a store of the default service name.
    """
    from treadmill.imagestore.cache import CacheConfig
    from treadmill.imagestore.pullthrough import Credentials

    settings: dict[str, Any] = {"upstream_retries": 1, "upstream_backoff": 0.01,
                                "upstream_timeout": 5.0, "retry_after": 3,
                                "maintenance_interval": 0.0}
    if keys is not None:
        settings["upstream"] = Credentials(token=keys.token(
            ("repository", "lab/fw", ["pull"]), ("repository", "lab/other", ["pull"]),
            subject="imagecache", ttl=3600))
    settings.update(cache_settings or {})
    overrides.setdefault("service", CACHE_SERVICE)
    return await start_store(root, keys, cache=CacheConfig(upstreams=upstreams, **settings),
                             **overrides)


class TokenService:
    """The switchboard's registry token endpoint, for the token flow: HTTP Basic
    ``user:password`` in, a token for the asked scopes (audience: the ``service``) out."""

    def __init__(self, keys: Keys, user: str = "imagecache", password: str = "tmt_secret"):
        from twisted.web.resource import Resource

        self.keys = keys
        self.user = user
        self.password = password
        self.asked: list[tuple[str, list[str]]] = []
        service = self

        class _Token(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return service.render(request)

        self.resource = _Token()
        self.port: Any = None

    def render(self, request: Any) -> bytes:
        import base64

        request.setHeader(b"content-type", b"application/json")
        expected = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if (request.getHeader(b"authorization") or b"").decode() != expected:
            request.setResponseCode(401)
            return b'{"error": {"code": "unauthenticated", "message": "bad credentials"}}'
        audience = (request.args.get(b"service") or [b""])[0].decode()
        scopes = [s.decode() for s in request.args.get(b"scope", [])]
        self.asked.append((audience, scopes))
        access = []
        for item in " ".join(scopes).split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append(Access(kind, name, tuple(actions.split(","))))
        token = self.keys.signer.sign(self.user, audience, access, 300)
        return json.dumps({"token": token, "expires_in": 300,
                           "issued_at": "2026-11-23T17:00:00Z"}).encode()

    def start(self) -> str:
        from twisted.web.server import Site

        self.port = reactor.listenTCP(0, Site(self.resource), interface="127.0.0.1")
        return f"http://127.0.0.1:{self.port.getHost().port}/api/v1/registry/token"

    async def stop(self) -> None:
        if self.port is not None:
            await self.port.stopListening()


@dataclass
class Pair:
    """An image store and a cache pulling through from it; ``up`` pushes ``lab/fw`` to the
    store, ``client`` pulls it from the cache."""

    upstream: RunningStore
    cache: RunningStore
    keys: Keys
    up: Registry  # pushes to the upstream
    client: Registry  # pulls lab/fw from the cache


async def pair(tmp_path: Path, keys: Keys, **cache_settings: Any) -> Pair:
    """A started :class:`Pair` (``cache_settings``: the cache's)."""
    upstream = await start_store(tmp_path / "upstream", keys)
    cache = await start_cache(tmp_path / "cache", keys, [upstream.url], cache_settings)
    up = upstream.registry.with_token(keys.repo("lab/fw", "pull", "push"))
    client = cache.registry.with_token(keys.repo("lab/fw", "pull", audience=CACHE_SERVICE))
    return Pair(upstream, cache, keys, up, client)


@dataclass
class Backpressure:
    """What :func:`slow_disk` saw: the largest queue of an upload body, and how many
    times the body's sender was paused."""

    peak: int = 0
    pauses: int = 0


def slow_disk(store: RunningStore, monkeypatch: Any, delay: float = 0.01) -> Backpressure:
    """Make ``store``'s upload appends take ``delay`` seconds each (a disk slower than
    the network) and watch the upload bodies' queues (``monkeypatch`` undoes both)."""
    import time

    from treadmill.imagestore.uploads import BodySink, Upload

    uploads = store.service.uploads
    original_append, original_write = uploads._append, BodySink.write
    seen = Backpressure()

    def slow_append(upload: Upload, chunks: list[bytes]) -> int:
        time.sleep(delay)
        return original_append(upload, chunks)

    def write(self: BodySink, data: bytes) -> None:
        was_paused = self._paused
        original_write(self, data)
        seen.peak = max(seen.peak, self._queued)
        seen.pauses += int(self._paused and not was_paused)

    monkeypatch.setattr(uploads, "_append", slow_append)
    monkeypatch.setattr(BodySink, "write", write)
    return seen


# -- outside clients and the daemon's configuration file --------------------------------

SKOPEO = shutil.which("skopeo")


async def skopeo(home: Path, *args: str) -> tuple[int, str]:
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "XDG_RUNTIME_DIR": str(home)}
    assert SKOPEO is not None
    out, err, code = await getProcessOutputAndValue(
        SKOPEO, ["--insecure-policy", *args], env=env)
    return code, (out + err).decode("utf-8", "replace")


def write_config(path: Path, root: Path, port: int, keys: Keys | None,
                 metrics: int | None = None) -> Path:
    auth = (f'[auth]\nkeys_file = "{keys.keys_file}"\nrealm = "{REALM}"\n' if keys
            else "[auth]\ndisabled = true\n")
    extra = f'[metrics]\nlisten = ["tcp:{metrics}:interface=127.0.0.1"]\n' if metrics else ""
    path.write_text(
        f'listen = ["tcp:{port}:interface=127.0.0.1:backlog=128"]\n'
        f'root = "{root}"\n'
        "[http]\naccess_log = false\n"
        f"{auth}{extra}")
    return path
