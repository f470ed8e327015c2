"""``tml image push`` and ``pull`` against a fake switchboard and fake OCI stores on loopback."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from klein import Klein
from twisted.internet import reactor
from twisted.web.server import Request, Site

from tests.images.ocifake import SECRET, FakeRegistry, digest_of, listen
from treadmill.images import format as fmt

NOW = "2026-11-23T17:00:00.123456Z"


@dataclass
class Catalogue:
    """Just the switchboard routes ``push``/``pull`` use, plus its registry token service."""

    registry: FakeRegistry
    url: str = ""
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    stores: dict[str, str] = field(default_factory=dict)  # registered: URL -> service

    app = Klein()

    def _json(self, request: Request, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def _authed(self, request: Request) -> bool:
        self.calls.append((request.method.decode(), request.path.decode()))
        return request.getHeader(b"authorization") == f"Bearer {SECRET}".encode()

    def _denied(self, request: Request) -> bytes:
        return self._json(request, 401, {"error": {"code": "unauthenticated", "message": "no"}})

    @app.route("/api/v1/whoami", methods=["GET"])
    def whoami(self, request: Request) -> bytes:
        if not self._authed(request):
            return self._denied(request)
        return self._json(request, 200, {"name": "alice", "admin": False, "disabled": False,
                                         "created_at": NOW})

    @app.route("/api/v1/stores", methods=["GET"])
    def list_stores(self, request: Request) -> bytes:
        if not self._authed(request):
            return self._denied(request)
        return self._json(request, 200, {"stores": [
            {"url": url, "service": service, "description": "", "cache": False,
             "created_at": NOW} for url, service in self.stores.items()]})

    @app.route("/api/v1/registry/token", methods=["GET"])
    def token(self, request: Request) -> bytes:
        self.calls.append(("GET", "/api/v1/registry/token"))
        return self.registry.token_endpoint(request)

    @app.route("/api/v1/images", methods=["POST"])
    def create(self, request: Request) -> bytes:
        if not self._authed(request):
            return self._denied(request)
        body = json.loads(request.content.read())
        if body["name"] in self.images:
            return self._json(request, 409, {"error": {"code": "conflict",
                                                       "message": "image exists"}})
        image = {"owner": "alice", "description": "", "created_at": NOW, "updated_at": NOW,
                 **body}
        self.images[body["name"]] = image
        return self._json(request, 201, image)

    @app.route("/api/v1/images/<path:name>", methods=["GET", "PUT"])
    def image(self, request: Request, name: str) -> bytes:
        if not self._authed(request):
            return self._denied(request)
        if name not in self.images:
            return self._json(request, 404, {"error": {"code": "not_found",
                                                       "message": f"no image {name!r}"}})
        if request.method == b"PUT":
            self.images[name].update(json.loads(request.content.read()))
        return self._json(request, 200, self.images[name])


@dataclass
class World:
    catalogue: Catalogue
    store: FakeRegistry
    env: dict[str, str]
    tmp: Path

    def file(self, name: str, data: bytes) -> str:
        path = self.tmp / name
        path.write_bytes(data)
        return str(path)


@pytest_twisted.async_yield_fixture
async def world(tmp_path):
    store, store_port = listen(FakeRegistry(require_auth=True))
    catalogue = Catalogue(store)
    sb_port = reactor.listenTCP(0, Site(catalogue.app.resource()), interface="127.0.0.1")
    catalogue.url = f"http://127.0.0.1:{sb_port.getHost().port}"
    store.realm = catalogue.url + "/api/v1/registry/token"
    catalogue.stores[store.url] = "fake-store"
    env = {"HOME": str(tmp_path / "home"), "TREADMILL_URL": catalogue.url,
           "TREADMILL_TOKEN": SECRET}
    (tmp_path / "in").mkdir()
    yield World(catalogue, store, env, tmp_path / "in")
    await sb_port.stopListening()
    await store_port.stopListening()


def qcow2(tag: bytes, size: int = 3000) -> bytes:
    body = (tag * (size // len(tag) + 1))[: size - 4]
    return b"QFI\xfb" + body


def stored_manifest(store: FakeRegistry, repo: str, tag: str) -> dict[str, Any]:
    return json.loads(store.manifests[(repo, tag)][0])


# -- push --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_push_qemu_image_and_register(world, tml):
    base, top = qcow2(b"base"), qcow2(b"top", 2000)
    args = ["image", "push", "alice/Debian:v1", "--store", world.store.url,
            "--qcow2", world.file("base.qcow2", base), "--qcow2", world.file("top.qcow2", top),
            "--kernel", world.file("vmlinuz", b"kernel"), "--initrd", world.file("initrd", b"rd"),
            "--cmdline", "console=ttyS0", "--description", "Debian", "--chunk-size", "1000"]
    r = await tml(*args, env=world.env)
    assert r.status == 0, r.err
    manifest = stored_manifest(world.store, "alice/debian", "v1")
    image = fmt.parse_image(manifest)
    assert [d.digest for d in image.qcow2] == [digest_of(base), digest_of(top)]
    assert image.cmdline == "console=ttyS0"
    assert world.store.blobs[digest_of(base)] == base
    digest = digest_of(world.store.manifests[("alice/debian", "v1")][0])
    assert f"digest:     {digest}" in r.out
    assert "registered: yes" in r.out
    assert "disk-0: pushed" in r.err and "\r" not in r.err
    entry = world.catalogue.images["alice/Debian"]
    assert (entry["digest"], entry["stores"], entry["description"]) == (
        digest, [world.store.url], "Debian")
    assert entry["kind"] == "qemu"
    # The registry token came from the switchboard, with the user's own credentials.
    assert {req["authorization"][:6] for req in world.store.token_requests} == {"Basic "}
    assert world.store.token_requests[0]["scopes"] == ["repository:alice/debian:pull,push"]

    # Pushed again with a new kernel: refused before anything is sent without --replace.
    args[args.index("--kernel") + 1] = world.file("vmlinuz2", b"kernel 2")
    blobs_before = dict(world.store.blobs)
    r = await tml(*args, env=world.env)
    assert r.status == 1 and "--replace" in r.err and "nothing was uploaded" in r.err
    assert world.store.blobs == blobs_before
    assert world.catalogue.images["alice/Debian"]["digest"] == digest
    # With --replace the disks are not uploaded again, and the existing catalogue
    # entry is updated (409 → PUT).
    r = await tml(*args, "--replace", "--json", env=world.env)
    assert r.status == 0, r.err
    out = json.loads(r.out)
    assert [b["uploaded"] for b in out["blobs"]] == [False, False, True, False]
    assert "disk-0: already in the store" in r.err
    assert world.catalogue.images["alice/Debian"]["digest"] == out["digest"] != digest
    assert ("PUT", "/api/v1/images/alice%2FDebian") in world.catalogue.calls


@pytest_twisted.ensureDeferred
async def test_push_board_image(world, tml):
    flash = {"tool": "openocd", "args": ["-c", "program {firmware:app.bin} {target:app.bin}"]}
    r = await tml("image", "push", "alice/fw", "--store", world.store.url + "/",
                  "--firmware", world.file("boot.bin", b"boot"),
                  "--firmware", world.file("app.bin", b"app") + ":0x8000000",
                  "--flash-json", json.dumps(flash), "--annotation", "org.example.board=nrf52",
                  "--no-register", env=world.env)
    assert r.status == 0, r.err
    image = fmt.parse_image(stored_manifest(world.store, "alice/fw", "latest"))
    assert [(f.name, f.target) for f in image.firmware] == [("boot.bin", None),
                                                            ("app.bin", "0x8000000")]
    assert image.flash is not None and image.flash.tool == "openocd"
    assert image.annotations["org.example.board"] == "nrf52"
    assert world.catalogue.images == {}
    assert "registered: no" in r.out
    # Registered afterwards, its kind is read from its manifest in the store.
    digest = digest_of(world.store.manifests[("alice/fw", "latest")][0])
    r = await tml("image", "register", "alice/fw", digest, "--store", world.store.url,
                  env=world.env)
    assert r.status == 0, r.err
    assert world.catalogue.images["alice/fw"]["kind"] == "board"
    # Unless --kind says otherwise; a digest the store lacks registers with no kind.
    r = await tml("image", "register", "alice/fw2", digest, "--store", world.store.url,
                  "--kind", "qemu", env=world.env)
    assert r.status == 0 and world.catalogue.images["alice/fw2"]["kind"] == "qemu"
    r = await tml("image", "register", "alice/fw3", "sha256:" + "e" * 64, "--store",
                  world.store.url, env=world.env)
    assert r.status == 0, r.err
    assert "kind" not in world.catalogue.images["alice/fw3"]
    assert "registering without a kind" in r.err


@pytest_twisted.ensureDeferred
async def test_push_resumes_an_interrupted_upload(world, tml):
    disk = qcow2(b"abcdefg", 10_000)
    armed = []

    original = world.store.upload

    def upload(request, method, name, id):  # drop the 3rd PATCH after 123 bytes
        if method == "PATCH" and world.store.count("PATCH") == 3 and not armed:
            armed.append(1)
            world.store.drop_patch_after = 123
        return original(request, method, name, id)

    world.store.upload = upload  # type: ignore[method-assign]
    r = await tml("image", "push", "alice/vm", "--store", world.store.url, "--qcow2",
                  world.file("d.qcow2", disk), "--chunk-size", "1000", env=world.env)
    assert r.status == 0, r.err
    assert armed and world.store.blobs[digest_of(disk)] == disk
    assert "retrying in" in r.err and "attempt 2/5" in r.err


@pytest_twisted.ensureDeferred
async def test_push_progress_bar(world, tml):
    r = await tml("image", "push", "alice/vm", "--store", world.store.url, "--qcow2",
                  world.file("d.qcow2", qcow2(b"x", 5000)), "--chunk-size", "1000",
                  "--progress", env=world.env)
    assert r.status == 0, r.err
    assert "\rdisk-0 [" in r.err
    assert "100%" in r.err and "4.9 KiB / 4.9 KiB" in r.err and "/s" in r.err


@pytest.mark.parametrize(("argv", "status", "message"), [
    (["--qcow2", "A", "--firmware", "B"], 2, "not both"),
    ([], 2, "give --qcow2"),
    (["--firmware", "B", "--kernel", "K"], 2, "are for QEMU images"),
    (["--qcow2", "A", "--flash-json", "{}"], 2, "for board images"),
    (["--firmware", "B", "--flash-json", "{"], 2, "not JSON"),
    (["--firmware", "B", "--flash-json", '{"tool": "sh"}'], 1, "invalid image"),
    (["--qcow2", "B"], 1, "not a qcow2 image"),
    (["--qcow2", "missing.qcow2"], 1, "No such file"),
    (["--qcow2", "A", "--cmdline", "quiet"], 1, "needs a kernel"),
], ids=["both-kinds", "no-kind", "kernel-on-board", "flash-on-qemu", "flash-not-json",
        "flash-invalid", "not-qcow2", "missing-file", "cmdline-without-kernel"])
@pytest_twisted.ensureDeferred
async def test_push_refuses(world, tml, argv, status, message):
    files = {"A": world.file("a.qcow2", qcow2(b"a")), "B": world.file("b.bin", b"fw"),
             "K": world.file("k", b"k")}
    argv = [files.get(x, x) for x in argv]
    r = await tml("image", "push", "alice/x", "--store", world.store.url, *argv, env=world.env)
    assert r.status == status, r.err
    assert message in r.err
    assert world.store.requests == []


@pytest_twisted.ensureDeferred
async def test_push_bad_names(world, tml):
    disk = world.file("a.qcow2", qcow2(b"a"))
    r = await tml("image", "push", "a..b", "--store", world.store.url, "--qcow2", disk,
                  env=world.env)
    assert r.status == 2 and "--repository" in r.err
    r = await tml("image", "push", "x:bad tag", "--store", world.store.url, "--qcow2", disk,
                  env=world.env)
    assert r.status == 2 and "invalid tag" in r.err
    r = await tml("image", "push", "x", "--store", "ftp://x", "--qcow2", disk, env=world.env)
    assert r.status == 2 and "image store URL" in r.err


@pytest_twisted.ensureDeferred
async def test_push_without_token_is_refused_by_the_store(world, tml):
    env = {k: v for k, v in world.env.items() if k != "TREADMILL_TOKEN"}
    r = await tml("image", "push", "alice/x", "--store", world.store.url, "--qcow2",
                  world.file("a.qcow2", qcow2(b"a")), "--no-register", env=env)
    # Which stores are registered is the switchboard's to say, to users it knows.
    assert r.status == 1 and "not logged in" in r.err, r.err
    assert world.store.requests == []


# -- pull ----------------------------------------------------------------------------------


async def push_qemu(world: World, tml, name: str = "alice/vm") -> tuple[bytes, bytes]:
    base, top = qcow2(b"base", 4000), qcow2(b"top", 1000)
    r = await tml("image", "push", name, "--store", world.store.url, "--qcow2",
                  world.file("base.qcow2", base), "--qcow2", world.file("top.qcow2", top),
                  "--kernel", world.file("k", b"kernel"), "--cmdline", "quiet", env=world.env)
    assert r.status == 0, r.err
    return base, top


@pytest_twisted.ensureDeferred
async def test_pull_qemu_image(world, tml):
    base, top = await push_qemu(world, tml)
    out = world.tmp / "pulled"
    r = await tml("image", "pull", "alice/vm", "-o", str(out), env=world.env)
    assert r.status == 0, r.err
    assert (out / "disk-0.qcow2").read_bytes() == base
    assert (out / "disk-1.qcow2").read_bytes() == top
    assert (out / "kernel").read_bytes() == b"kernel"
    manifest = json.loads((out / "manifest.json").read_bytes())
    assert fmt.parse_image(manifest).cmdline == "quiet"
    assert r.out.splitlines()[0].split() == ["FILE", "DIGEST", "SIZE"]
    assert "disk-0.qcow2" in r.out
    # Pulled again: nothing is downloaded.
    gets = world.store.count("GET", "/blobs/")
    r = await tml("image", "pull", "alice/vm", "-o", str(out), "--json", env=world.env)
    assert r.status == 0, r.err
    assert world.store.count("GET", "/blobs/") == gets
    assert "already there" in r.err
    assert [f["path"] for f in json.loads(r.out)["files"]] == [
        "disk-0.qcow2", "disk-1.qcow2", "kernel"]


@pytest_twisted.ensureDeferred
async def test_pull_board_image(world, tml):
    r = await tml("image", "push", "alice/fw", "--store", world.store.url,
                  "--firmware", world.file("app.bin", b"app") + ":0x0",
                  "--flash-json", '{"tool": "probe-rs", "args": ["{firmware:app.bin}"]}',
                  env=world.env)
    assert r.status == 0, r.err
    cwd = os.getcwd()
    os.chdir(world.tmp)
    try:
        r = await tml("image", "pull", "alice/fw", env=world.env)
    finally:
        os.chdir(cwd)
    assert r.status == 0, r.err
    assert (world.tmp / "fw" / "firmware" / "app.bin").read_bytes() == b"app"
    assert json.loads((world.tmp / "fw" / "flash.json").read_text())["tool"] == "probe-rs"


@pytest_twisted.ensureDeferred
async def test_pull_verifies_digests_and_falls_back_to_the_next_store(world, tml):
    base, _ = await push_qemu(world, tml)
    good, good_port = listen(FakeRegistry(blobs=dict(world.store.blobs),
                                          manifests=dict(world.store.manifests)))
    try:
        world.store.corrupt.add(digest_of(base))
        world.catalogue.images["alice/vm"]["stores"] = [world.store.url, good.url]
        world.catalogue.stores[good.url] = "fake-store-2"
        out = world.tmp / "pulled"
        r = await tml("image", "pull", "alice/vm", "-o", str(out), env=world.env)
        assert r.status == 0, r.err
        assert "has digest" in r.err and "trying the next store" in r.err
        assert (out / "disk-0.qcow2").read_bytes() == base
        assert f"from {good.url}" in r.err

        # Only the corrupt store: the pull fails, and leaves no file behind.
        out2 = world.tmp / "pulled2"
        r = await tml("image", "pull", "alice/vm", "-o", str(out2), "--store",
                      world.store.url, env=world.env)
        assert r.status == 1
        assert "has digest" in r.err
        assert not (out2 / "disk-0.qcow2").exists()
        assert [p.name for p in out2.iterdir()] == []
    finally:
        await good_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_pull_skips_an_unreachable_store(world, tml):
    base, _ = await push_qemu(world, tml)
    world.catalogue.images["alice/vm"]["stores"] = ["http://127.0.0.1:9", world.store.url]
    world.catalogue.stores["http://127.0.0.1:9"] = "nowhere"
    out = world.tmp / "pulled"
    r = await tml("image", "pull", "alice/vm", "-o", str(out), env=world.env)
    assert r.status == 0, r.err
    assert "connection refused" in r.err
    assert (out / "disk-0.qcow2").read_bytes() == base


@pytest_twisted.ensureDeferred
async def test_unregistered_stores_get_nothing(world, tml):
    """Push to or pull from a store the switchboard does not list: not one request (so no
    token and no credential) reaches it; a registered one after it is still used."""
    base, _ = await push_qemu(world, tml)
    rogue, rogue_port = listen(FakeRegistry(require_auth=True))
    try:
        rogue.realm = world.catalogue.url + "/api/v1/registry/token"
        r = await tml("image", "push", "alice/x", "--store", rogue.url, "--qcow2",
                      world.file("x.qcow2", b"QFI\xfb" + b"x" * 100), env=world.env)
        assert r.status == 1 and "not registered" in r.err, r.err
        world.catalogue.images["alice/vm"]["stores"] = [rogue.url, world.store.url]
        out = world.tmp / "pulled"
        r = await tml("image", "pull", "alice/vm", "-o", str(out), env=world.env)
        assert r.status == 0, r.err
        assert "not registered" in r.err and (out / "disk-0.qcow2").read_bytes() == base
        r = await tml("image", "pull", "alice/vm", "-o", str(out), "--store", rogue.url,
                      env=world.env)
        assert r.status == 1 and "not registered" in r.err
        assert rogue.requests == [] and rogue.token_requests == []
    finally:
        await rogue_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_pull_unknown_image(world, tml):
    r = await tml("image", "pull", "nope", env=world.env)
    assert r.status == 1 and "no image 'nope'" in r.err


def test_progress_bar_rendering():
    from treadmill.images.progress import ProgressBar, human_size

    assert [human_size(n) for n in (0, 1023, 1024, 5 * 2**20, 3 * 2**40)] == [
        "0 B", "1023 B", "1.0 KiB", "5.0 MiB", "3.0 TiB"]
    now = [0.0]
    stream = io.StringIO()
    bar = ProgressBar(stream, "disk", 2048, clock=lambda: now[0], width=4)
    bar.update(0)
    now[0] = 0.05
    bar.update(512)  # within the interval: not drawn
    now[0] = 1.0
    bar.update(1024)
    bar.message("note")
    bar.update(2048)  # complete: always drawn
    bar.finish()
    text = stream.getvalue()
    assert text.count("\rdisk [") == 5
    assert "\rdisk [##--] 1.0 KiB / 2.0 KiB  50% 1.0 KiB/s" in text
    assert "note\n" in text
    assert text.endswith("100% 2.0 KiB/s\n")
    quiet = io.StringIO()
    bar = ProgressBar(quiet, "disk", 10, enabled=False)
    bar.update(10)
    bar.message("hello")
    bar.finish()
    assert quiet.getvalue() == "hello\n"
