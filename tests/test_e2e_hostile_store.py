"""A hostile image store cannot harvest tokens (security issue 12), end to end.

Real switchboard, real image store, real mock supervisor, all in-process on
loopback, and a hostile store: a loopback HTTP server that answers every
request with a ``401`` challenge of its choosing and keeps whatever it is sent.
A lure catalogue image names it; users pull and push with the ``tml`` code path
and a supervisor fetches a job's image from it. Whatever the challenge says —
another repository and the catalogue (a), the real store's service (b), its
own token realm (c) — the tokens it gets are for its own service only, for the
operation's repository and actions only, and are refused when replayed at the
real store; in (b) and (c) it gets no token at all, and a store the operators
did not register gets no request at all.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

pytest.importorskip("treadmill.imagestore.service")

from tests.support import (
    Client,
    RunningSwitchboard,
    mock_supervisor,
    start_switchboard,
    store_service,
    url_of,
)
from tests.util.waiting import eventually
from treadmill.images import format as fmt
from treadmill.images.oci import RegistryClient

REAL_SERVICE = "treadmill-imagestore"
HOSTILE_SERVICE = "hostile"
GREEDY = "repository:alice/fw:pull,push,delete registry:catalog:*"
DISK = b"QFI\xfb" + bytes(range(256)) * 8


@dataclass
class Hostile(Resource):
    """Answers 401 with ``challenge`` to everything; records what it is sent."""

    isLeaf = True
    challenge: str = ""
    received: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Any) -> bytes:
        self.received.append({
            "method": request.method.decode(), "path": request.uri.decode(),
            "authorization": (request.getHeader(b"authorization") or b"").decode()})
        request.setHeader(b"content-type", b"application/json")
        if request.path.startswith(b"/token"):  # its own "token service"
            return json.dumps({"token": "hostile", "expires_in": 300}).encode()
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", self.challenge.encode())
        return b'{"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}'

    def tokens(self) -> list[str]:
        return [r["authorization"][7:] for r in self.received
                if r["authorization"].startswith("Bearer ")]

    def credentials(self) -> list[str]:
        return [r["authorization"] for r in self.received if r["authorization"]]


@dataclass
class Bed:
    sb: RunningSwitchboard
    store_url: str
    hostile: Hostile
    hostile_url: str
    unregistered: Hostile
    unregistered_url: str
    alice: Client
    tmp: Path

    @property
    def realm(self) -> str:
        return f"{self.sb.url}/api/v1/registry/token"


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@pytest_twisted.async_yield_fixture
async def bed(migrated_database: str, tmp_path: Path) -> AsyncIterator[Bed]:
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 timeout_interval=0.1)
    store = store_service(sb, tmp_path / "store", service=REAL_SERVICE)
    store.startService()
    hostile, unregistered = Hostile(), Hostile()
    ports = [reactor.listenTCP(0, Site(r), interface="127.0.0.1")
             for r in (hostile, unregistered)]
    try:
        await store.ready()
        store_url = url_of(store)
        hostile_url, unregistered_url = (f"http://127.0.0.1:{p.getHost().port}" for p in ports)
        await sb.register_store(store_url, REAL_SERVICE)
        await sb.register_store(hostile_url, HOSTILE_SERVICE)
        alice = await sb.user("alice")
        yield Bed(sb, store_url, hostile, hostile_url, unregistered, unregistered_url, alice,
                  tmp_path)
    finally:
        for port in ports:
            await port.stopListening()
        await store.stopService()
        await sb.stop()


async def tml(bed: Bed, token: str, *argv: str) -> tuple[int, str]:
    """``tml`` in-process (the CLI code path), as the user of ``token``."""
    from treadmill.cli.main import run

    out, err = io.StringIO(), io.StringIO()
    env = {"HOME": str(bed.tmp / "home"), "TREADMILL_URL": bed.sb.url, "TREADMILL_TOKEN": token}
    status = await run(reactor, list(argv), out, err, env)
    return status, err.getvalue()


async def seed_real_store(bed: Bed) -> str:
    """alice/fw on the real store (what a harvested token would be replayed against)."""
    client = RegistryClient(reactor, bed.store_url, credentials=("alice", bed.alice.token),
                            service=REAL_SERVICE, realm=bed.realm)
    try:
        await client.push_bytes("alice/fw", fmt.EMPTY_BLOB)
        blob = await client.push_bytes("alice/fw", DISK)
        manifest = fmt.build_qemu_manifest([blob])
        return await client.put_manifest("alice/fw", "v1", fmt.manifest_bytes(manifest))
    finally:
        await client.close()


async def replay_refused(bed: Bed, token: str) -> None:
    """Every use of ``token`` at the real store is refused."""
    for method, path in (("GET", "/v2/alice/fw/manifests/v1"), ("GET", "/v2/_catalog"),
                         ("GET", "/v2/alice/lure/tags/list"),
                         ("POST", "/v2/alice/fw/blobs/uploads/"),
                         ("DELETE", "/v2/alice/fw/manifests/v1")):
        response = await treq.request(method, bed.store_url + path,
                                      headers={"Authorization": f"Bearer {token}"})
        await treq.content(response)
        assert response.code == 401, (method, path, response.code)


async def run_lure_job(bed: Bed) -> dict[str, Any]:
    """A mock host's supervisor fetches the lure image for a job; the job's final state."""
    admin = bed.sb.admin
    host = (await admin.post("/api/v1/hosts", {"name": "mock-1", "tags": ["mock"]})).body
    supervisor = mock_supervisor(bed.sb.url, host["token"], bed.tmp / "mock-1",
                                 stage_time=0.02, run_time=0.2)
    try:
        await supervisor.ready()
        await supervisor.connected()
        r = await admin.post("/api/v1/jobs", {"image": "alice/lure", "tags": ["mock"]})
        assert r.status == 201, r.body

        async def done() -> dict[str, Any] | None:
            body = (await admin.get(f"/api/v1/jobs/{r.body['id']}")).body
            return body if body["state"] == "terminated" else None

        return await eventually(done, timeout=30)
    finally:
        await supervisor.stopService()


async def lure(bed: Bed) -> str:
    digest = await seed_real_store(bed)
    r = await bed.alice.post("/api/v1/images", {"name": "alice/lure", "digest": digest,
                                                "stores": [bed.hostile_url]})
    assert r.status == 201, r.body
    return digest


@pytest_twisted.ensureDeferred
async def test_a_greedy_challenge_gets_only_useless_tokens(bed: Bed) -> None:
    """(a) The challenge asks for alice/fw and the catalogue: the clients ask for their own
    operation, for the hostile store's service; nothing it gets works at the real store."""
    await lure(bed)
    bed.hostile.challenge = (f'Bearer realm="{bed.realm}",service="{HOSTILE_SERVICE}",'
                             f'scope="{GREEDY}"')
    admin_token = bed.sb.admin_token
    status, err = await tml(bed, bed.alice.token, "image", "pull", "alice/lure",
                            "-o", str(bed.tmp / "out"))
    assert status == 1 and bed.hostile_url in err
    status, err = await tml(bed, admin_token, "image", "pull", "alice/lure",
                            "-o", str(bed.tmp / "o"))
    assert status == 1
    disk = bed.tmp / "d.qcow2"
    disk.write_bytes(DISK)
    status, err = await tml(bed, bed.alice.token, "image", "push", "alice/new",
                            "--store", bed.hostile_url, "--qcow2", str(disk), "--no-register")
    assert status == 1
    final = await run_lure_job(bed)
    assert final["termination"]["reason"] == "image_error", final
    tokens = bed.hostile.tokens()
    assert len(tokens) >= 4  # alice's and the admin's pulls, alice's push, the host's fetch
    granted = set()
    for token in tokens:
        c = claims(token)
        assert c["aud"] in (HOSTILE_SERVICE, [HOSTILE_SERVICE]), c
        for access in c.get("access", []):
            granted |= {(access["type"], access["name"], a) for a in access["actions"]}
        await replay_refused(bed, token)
    # Only what each operation needs: no alice/fw, no catalogue, though admins hold them.
    assert granted <= {("repository", "alice/lure", "pull"), ("repository", "alice/new", "pull"),
                       ("repository", "alice/new", "push")}, granted
    assert ("repository", "alice/lure", "pull") in granted
    # No credential ever went to the store itself: only bearer tokens.
    assert all(c.startswith("Bearer ") for c in bed.hostile.credentials())
    assert bed.alice.token not in json.dumps(bed.hostile.received)
    assert admin_token not in json.dumps(bed.hostile.received)


@pytest.mark.parametrize("challenge", ["service", "realm"])
@pytest_twisted.ensureDeferred
async def test_a_challenge_for_another_service_or_realm_gets_nothing(bed: Bed,
                                                                     challenge: str) -> None:
    """(b) The challenge names the real store's service (a token for it would work there);
    (c) it names its own token realm (it would collect the password). Both are refused:
    no token, no credential, no request to its realm."""
    await lure(bed)
    if challenge == "service":
        bed.hostile.challenge = (f'Bearer realm="{bed.realm}",service="{REAL_SERVICE}",'
                                 f'scope="{GREEDY}"')
    else:
        bed.hostile.challenge = (f'Bearer realm="{bed.hostile_url}/token",'
                                 f'service="{HOSTILE_SERVICE}",scope="{GREEDY}"')
    status, err = await tml(bed, bed.alice.token, "image", "pull", "alice/lure",
                            "-o", str(bed.tmp / "out"))
    assert status == 1 and "no token was requested" in err, err
    disk = bed.tmp / "d.qcow2"
    disk.write_bytes(DISK)
    status, err = await tml(bed, bed.alice.token, "image", "push", "alice/new",
                            "--store", bed.hostile_url, "--qcow2", str(disk), "--no-register")
    assert status == 1 and "no token was requested" in err, err
    final = await run_lure_job(bed)
    assert final["termination"]["reason"] == "image_error", final
    assert "no token was requested" in final["termination"]["message"], final
    assert bed.hostile.received  # it was asked, but given nothing
    assert bed.hostile.credentials() == []
    assert not any(r["path"].startswith("/token") for r in bed.hostile.received)


@pytest_twisted.ensureDeferred
async def test_an_unregistered_store_gets_no_request_at_all(bed: Bed) -> None:
    digest = await lure(bed)
    bed.unregistered.challenge = f'Bearer realm="{bed.realm}",service="{REAL_SERVICE}"'
    r = await bed.alice.put("/api/v1/images/alice/lure", {"stores": [bed.unregistered_url]})
    assert r.status == 400, r.body
    r = await bed.alice.post("/api/v1/images", {"name": "alice/lure2", "digest": digest,
                                                "stores": [bed.unregistered_url]})
    assert r.status == 400, r.body
    status, err = await tml(bed, bed.alice.token, "image", "pull", "alice/lure",
                            "--store", bed.unregistered_url, "-o", str(bed.tmp / "out"))
    assert status == 1 and "not registered" in err, err
    disk = bed.tmp / "d.qcow2"
    disk.write_bytes(DISK)
    status, err = await tml(bed, bed.alice.token, "image", "push", "alice/new",
                            "--store", bed.unregistered_url, "--qcow2", str(disk))
    assert status == 1 and "not registered" in err, err
    # Smuggled into the catalogue behind the API's back: the job start drops it (a mock
    # host then runs the job without an image), and the supervisor would refuse it
    # anyway (tests/supervisor/test_images.py).
    await bed.sb.store.pool.execute("UPDATE images SET stores = %s WHERE name = 'lure'",
                                    ([bed.unregistered_url],))
    final = await run_lure_job(bed)
    assert final["state"] == "terminated", final
    assert bed.unregistered.received == []


@pytest_twisted.ensureDeferred
async def test_a_token_for_store_b_is_refused_by_store_a(bed: Bed) -> None:
    """Two real stores, each registered under its own service: the switchboard's token
    for B is good at B and refused at A (its audience), for the same repository."""
    await seed_real_store(bed)
    store_b = store_service(bed.sb, bed.tmp / "store-b", service="store-b")
    store_b.startService()
    try:
        await store_b.ready()
        url_b = url_of(store_b)
        await bed.sb.register_store(url_b, "store-b")
        tokens = {}
        for service in (REAL_SERVICE, "store-b"):
            r = await bed.alice.get(f"/api/v1/registry/token?service={service}"
                                    "&scope=repository:alice/fw:pull")
            assert r.status == 200, r.body
            tokens[service] = r.body["token"]
        path = "/v2/alice/fw/manifests/v1"
        for url, service, expect in ((bed.store_url, REAL_SERVICE, 200),
                                     (bed.store_url, "store-b", 401),
                                     (url_b, "store-b", 404),  # allowed; B lacks it
                                     (url_b, REAL_SERVICE, 401)):
            response = await treq.get(url + path, headers={
                "Authorization": f"Bearer {tokens[service]}",
                "Accept": fmt.OCI_MANIFEST})
            body = await treq.content(response)
            assert response.code == expect, (url, service, body)
    finally:
        await store_b.stopService()
