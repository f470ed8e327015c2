"""Push and pull through the real image store (``treadmill.imagestore``), in-process.

The store requires capability tokens; a tiny token service on loopback plays
the switchboard's ``GET /api/v1/registry/token`` (HTTP Basic in, a signed
token for the asked scopes out), so the client's whole token flow runs
against the store's real ``WWW-Authenticate`` challenges.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

pytest.importorskip("treadmill.imagestore.service")

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from treadmill.common.captoken import Access, CapabilitySigner
from treadmill.images import format as fmt
from treadmill.images import oci
from treadmill.imagestore.service import ImageStoreConfig, ImageStoreService

SERVICE = "treadmill-imagestore"
USER, PASSWORD = "alice", "tmt_alice_secret"


class _TokenService(Resource):
    """The switchboard's registry token service, plus the few API routes ``tml`` uses."""

    isLeaf = True

    def __init__(self, signer: CapabilitySigner) -> None:
        super().__init__()
        self.signer = signer
        self.asked: list[list[str]] = []
        self.images: dict[str, dict[str, Any]] = {}
        self.stores: list[str] = []  # registered (service: SERVICE)

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        path = unquote(request.path.decode())
        if path == "/api/v1/registry/token":
            return self.token(request)
        if request.getHeader(b"authorization") != f"Bearer {PASSWORD}".encode():
            request.setResponseCode(401)
            return b'{"error": {"code": "unauthenticated", "message": "no token"}}'
        if path == "/api/v1/whoami":
            return json.dumps({"name": USER, "admin": False}).encode()
        if path == "/api/v1/stores":
            return json.dumps({"stores": [{"url": url, "service": SERVICE} for url in
                                          self.stores]}).encode()
        if path == "/api/v1/images" and request.method == b"POST":
            body = json.loads(request.content.read())
            self.images[body["name"]] = body
            request.setResponseCode(201)
            return json.dumps(body).encode()
        name = path.removeprefix("/api/v1/images/")
        if name in self.images and request.method == b"GET":
            return json.dumps(self.images[name]).encode()
        request.setResponseCode(404)
        return b'{"error": {"code": "not_found", "message": "not found"}}'

    def token(self, request: Any) -> bytes:
        header = (request.getHeader(b"authorization") or b"").decode()
        if header != "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode():
            request.setResponseCode(401)
            return b'{"error": {"code": "unauthenticated", "message": "bad credentials"}}'
        scopes = [s.decode() for s in request.args.get(b"scope", [])]
        self.asked.append(scopes)
        access = []
        for item in " ".join(scopes).split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append(Access(kind, name, tuple(actions.split(","))))
        token = self.signer.sign(USER, SERVICE, access, 300)
        return json.dumps({"token": token, "access_token": token, "expires_in": 300,
                           "issued_at": "2026-11-23T17:00:00Z"}).encode()


@dataclass
class Running:
    url: str
    realm: str
    root: Path
    tokens: _TokenService

    @property
    def switchboard(self) -> str:
        return self.realm.removesuffix("/api/v1/registry/token")


@pytest_twisted.async_yield_fixture
async def store(tmp_path: Path) -> AsyncIterator[Running]:
    key = Ed25519PrivateKey.generate()
    keys_file = tmp_path / "keys.pem"
    keys_file.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    tokens = _TokenService(CapabilitySigner(key, "treadmill", reactor))
    token_port = reactor.listenTCP(0, Site(tokens), interface="127.0.0.1")
    realm = f"http://127.0.0.1:{token_port.getHost().port}/api/v1/registry/token"
    config = ImageStoreConfig(root=str(tmp_path / "store"), listen=["tcp:0:interface=127.0.0.1"],
                              keys_file=str(keys_file), realm=realm, service=SERVICE,
                              access_log=False)
    service = ImageStoreService(reactor, config)
    service.startService()
    try:
        await service.ready()
        port = service.ports()[0].getHost().port
        tokens.stores.append(f"http://127.0.0.1:{port}")
        yield Running(f"http://127.0.0.1:{port}", realm, tmp_path / "store", tokens)
    finally:
        await service.stopService()
        await token_port.stopListening()


@pytest_twisted.async_yield_fixture
async def clients(store: Running):
    made: list[oci.RegistryClient] = []

    def make(**kw: Any) -> oci.RegistryClient:
        kw.setdefault("credentials", (USER, PASSWORD))
        kw.setdefault("trusted_realms", [store.realm.rsplit("/api/", 1)[0]])
        kw.setdefault("backoff", 0.01)
        client = oci.RegistryClient(reactor, store.url, **kw)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def data_file(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(b"QFI\xfb" + bytes((i * seed + i // 97) % 256 for i in range(size - 4)))
    return path


@pytest_twisted.ensureDeferred
async def test_push_and_pull_a_qemu_image(store, clients, tmp_path):
    client = clients(chunk_size=64 * 1024)
    repo = "alice/debian"
    base = data_file(tmp_path / "base.qcow2", 300_000, 7)
    top = data_file(tmp_path / "top.qcow2", 20_000, 11)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    blobs = {}
    for path in (base, top, kernel):
        blobs[path.name], uploaded = await client.push_file(repo, path)
        assert uploaded
    await client.push_bytes(repo, fmt.EMPTY_BLOB)
    manifest = fmt.build_qemu_manifest([blobs["base.qcow2"], blobs["top.qcow2"]],
                                       kernel=blobs["vmlinuz"], cmdline="console=ttyS0")
    digest = await client.put_manifest(repo, "v1", fmt.manifest_bytes(manifest))
    # The token flow ran against the store's own challenges.
    assert store.tokens.asked and all(
        s == [f"repository:{repo}:pull,push"] or s == [f"repository:{repo}:pull"]
        for s in store.tokens.asked)

    # Pull with a fresh client: by tag and by digest, then every blob, verified.
    puller = clients()
    by_tag = await puller.get_manifest(repo, "v1")
    assert by_tag.digest == digest
    got = await puller.get_manifest(repo, digest)
    image = fmt.parse_image(got.json(), got.media_type)
    assert image.cmdline == "console=ttyS0"
    out = tmp_path / "out"
    for rel, desc in image.files():
        await puller.pull_blob(repo, desc.digest, out / rel, size=desc.size)
    assert (out / "disk-0.qcow2").read_bytes() == base.read_bytes()
    assert (out / "disk-1.qcow2").read_bytes() == top.read_bytes()
    assert (out / "kernel").read_bytes() == b"kernel"

    # Pushed again: every blob is already there.
    for path in (base, top, kernel):
        _, uploaded = await client.push_file(repo, path, blobs[path.name])
        assert not uploaded


@pytest_twisted.ensureDeferred
async def test_store_validates_treadmill_manifests(store, clients):
    client = clients()
    repo = "alice/fw"
    fw = await client.push_bytes(repo, b"firmware")
    good = fmt.build_board_manifest([fmt.FirmwareFile("app.bin", fw, "0x0")],
                                    flash={"tool": "openocd", "args": ["{firmware:app.bin}"]})
    # The empty config blob is not in the repository yet.
    with pytest.raises(oci.RegistryError) as info:
        await client.put_manifest(repo, "v1", fmt.manifest_bytes(good))
    assert info.value.code == fmt.MANIFEST_BLOB_UNKNOWN
    await client.push_bytes(repo, fmt.EMPTY_BLOB)
    await client.put_manifest(repo, "v1", fmt.manifest_bytes(good))
    bad = json.loads(fmt.manifest_bytes(good))
    bad["layers"][0]["annotations"][fmt.ANN_FIRMWARE_NAME] = "../../etc/passwd"
    with pytest.raises(oci.RegistryError) as info:
        await client.put_manifest(repo, "v2", fmt.manifest_bytes(bad))
    assert info.value.code == fmt.MANIFEST_INVALID
    assert "safe file name" in info.value.message


@pytest_twisted.ensureDeferred
async def test_resume_against_the_store(store, clients, tmp_path):
    """The connection breaks mid-body; the store's upload status says where to go on."""
    retries: list[str] = []
    client = clients(chunk_size=100_000, on_retry=retries.append)
    path = data_file(tmp_path / "disk.qcow2", 350_000, 13)
    blob = await oci.file_blob(reactor, path)
    offsets: list[tuple[str, int] | None] = []
    status = client._upload_status

    async def recording_status(location: str, repo: str) -> tuple[str, int] | None:
        offsets.append(await status(location, repo))
        return offsets[-1]

    client._upload_status = recording_status  # type: ignore[method-assign]

    class Failing(oci.BlobSource):
        """Reading fails once, 150 000 bytes in (mid-way through the second chunk)."""

        failed = False

        def producer(self, offset, length, on_read=None):
            producer = super().producer(offset, length, on_read)
            if not Failing.failed and offset < 150_000 < offset + length:
                inner: oci._Slice = producer._inputFile
                read = inner.read

                def failing_read(n: int = -1) -> bytes:
                    if offset + inner.tell() >= 150_000 and not Failing.failed:
                        Failing.failed = True
                        raise OSError("disk went away")
                    return read(min(n, 150_000 - offset - inner.tell()) or n)

                inner.read = failing_read  # type: ignore[method-assign]
            return producer

    await client.push_blob("alice/vm", Failing(blob, path=str(path)))
    assert Failing.failed and len(retries) == 1
    # The client went on from where the store said it was: somewhere in the
    # broken chunk (the store keeps what reached it before the connection broke).
    [(_, resumed_at)] = [o for o in offsets if o is not None]
    assert 100_000 <= resumed_at <= 150_000
    puller = clients()
    out = tmp_path / "copy"
    await puller.pull_blob("alice/vm", blob.digest, out, size=blob.size)
    assert out.read_bytes() == path.read_bytes()


@pytest_twisted.ensureDeferred
async def test_pull_detects_corruption_in_the_store(store, clients, tmp_path):
    client = clients()
    data = os.urandom(50_000)
    blob = await client.push_bytes("alice/x", data)
    hexdigest = blob.digest[7:]
    on_disk = store.root / "blobs" / "sha256" / hexdigest[:2] / hexdigest
    os.chmod(on_disk, 0o644)
    on_disk.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # always differs
    with pytest.raises(oci.DigestMismatch):
        await client.pull_blob("alice/x", blob.digest, tmp_path / "x", size=blob.size)
    assert not (tmp_path / "x").exists()


@pytest_twisted.ensureDeferred
async def test_wrong_credentials_and_untrusted_realm(store, clients):
    with pytest.raises(oci.RegistryError, match="bad credentials"):
        await clients(credentials=(USER, "wrong")).push_bytes("alice/x", b"x")
    with pytest.raises(oci.RegistryError, match="not a trusted token service"):
        await clients(trusted_realms=["http://elsewhere.example/"]).push_bytes("alice/x", b"x")
    with pytest.raises((oci.RegistryError, oci.RegistryUnreachable)):
        await clients(credentials=None).push_bytes("alice/x", b"x")


@pytest_twisted.ensureDeferred
async def test_tml_push_and_pull_through_the_store(store, tmp_path):
    """``tml image push`` then ``pull``, with the API token as the registry password."""
    from treadmill.cli.main import run

    async def tml(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        env = {"HOME": str(tmp_path / "home"), "TREADMILL_URL": store.switchboard,
               "TREADMILL_TOKEN": PASSWORD}
        status = await run(reactor, list(argv), out, err, env)
        return status, out.getvalue(), err.getvalue()

    disk = data_file(tmp_path / "disk.qcow2", 200_000, 3)
    status, out, err = await tml("image", "push", "alice/vm:v1", "--json", "--store", store.url,
                                 "--qcow2", str(disk), "--chunk-size", "65536")
    assert status == 0, err
    assert json.loads(out)["tag"] == "v1"
    entry = store.tokens.images["alice/vm"]
    assert entry["stores"] == [store.url] and fmt.is_digest(entry["digest"])
    status, _out, err = await tml("image", "pull", "alice/vm", "-o", str(tmp_path / "out"))
    assert status == 0, err
    assert (tmp_path / "out" / "disk-0.qcow2").read_bytes() == disk.read_bytes()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_bytes())
    assert fmt.digest_of((tmp_path / "out" / "manifest.json").read_bytes()) == entry["digest"]
    assert fmt.parse_image(manifest).kind == "qemu"
