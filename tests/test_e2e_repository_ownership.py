"""Repository ownership end to end: a real switchboard and a real image store.

The store trusts the switchboard's capability keys and sends clients to its
token endpoint. alice pushes an image into her namespace with the token flow
(``tml image push``'s client); bob, with his own API token, then tries every
way in: pulling, pushing, deleting, mounting alice's blobs into his own
repository, a first push into a top-level name and into alice's namespace,
and asking the token endpoint for ``*``. None of it reads or changes alice's
repository. alice's own ``*`` token (as ``skopeo delete`` asks) deletes.
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
import pytest_twisted
from twisted.internet import reactor

pytest.importorskip("treadmill.imagestore.service")

from tests.imagestore.support import Registry, build_oci_layout, digest_of
from tests.support import Client, RunningSwitchboard, start_switchboard, store_service, url_of
from treadmill.images import format as fmt
from treadmill.images.oci import RegistryClient, RegistryError

LAYER = b"QFI\xfb" + b"alice's disk" * 100


@dataclass
class Bed:
    sb: RunningSwitchboard
    store: Registry  # plain HTTP to the store, with an explicit token per request
    alice: Client
    bob: Client
    manifest: str  # the digest alice pushed to alice/fw:v1

    def client(self, who: Client, name: str) -> RegistryClient:
        """The OCI client ``tml image`` uses, with ``who``'s Basic credentials."""
        return RegistryClient(reactor, self.store.url, credentials=(name, str(who.token)),
                              trusted_realms=[self.sb.url], retries=1)

    async def token(self, user: str, client: Client, *scopes: str) -> str:
        """A capability token from the switchboard, as a registry client gets one."""
        raw = base64.b64encode(f"{user}:{client.token}".encode()).decode()
        query = urlencode([("service", "treadmill-imagestore")] + [("scope", s) for s in scopes])
        r = await Client(self.sb.url).get(f"/api/v1/registry/token?{query}",
                                          headers={"authorization": f"Basic {raw}"})
        assert r.status == 200, r.body
        return r.body["token"]


@pytest_twisted.async_yield_fixture
async def bed(migrated_database: str, tmp_path: Path) -> AsyncIterator[Bed]:
    sb = await start_switchboard(migrated_database, tmp_path)
    store = store_service(sb, tmp_path / "store")
    store.startService()
    try:
        await store.ready()
        url = url_of(store)
        await sb.register_store(url, "treadmill-imagestore")
        alice, bob = await sb.user("alice"), await sb.user("bob")
        bed = Bed(sb, Registry(url), alice, bob, "")
        client = bed.client(alice, "alice")
        try:
            await client.push_bytes("alice/fw", fmt.EMPTY_BLOB)
            blob = await client.push_bytes("alice/fw", LAYER)
            data = fmt.manifest_bytes(fmt.build_qemu_manifest([blob]))
            bed.manifest = await client.put_manifest("alice/fw", "v1", data)
        finally:
            await client.close()
        r = await alice.post("/api/v1/images", {"name": "alice/fw", "digest": bed.manifest,
                                                "stores": [url]})
        assert r.status == 201, r.body
        yield bed
    finally:
        await store.stopService()
        await sb.stop()


async def alice_repository(bed: Bed) -> tuple[list[str], bytes]:
    """alice/fw's tags and its layer, read with alice's own token."""
    token = await bed.token("alice", bed.alice, "repository:alice/fw:pull")
    tags = await bed.store.request("GET", "/v2/alice/fw/tags/list", token=token)
    layer = await bed.store.request("GET", f"/v2/alice/fw/blobs/{digest_of(LAYER)}",
                                    token=token)
    assert tags.code == 200 and layer.code == 200
    return tags.json["tags"], layer.body


@pytest_twisted.ensureDeferred
async def test_bob_can_neither_read_nor_write_alices_repository(bed: Bed) -> None:
    before = await alice_repository(bed)
    assert before == (["v1"], LAYER)
    layer = digest_of(LAYER)

    # tml image's client, with bob's credentials: refused at every step.
    client = bed.client(bed.bob, "bob")
    try:
        for attempt in (lambda: client.get_manifest("alice/fw", "v1"),
                        lambda: client.get_blob("alice/fw", layer),
                        lambda: client.push_bytes("alice/fw", b"bob's blob"),
                        lambda: client.push_bytes("demo", b"bob's blob"),
                        lambda: client.push_bytes("alice/new", b"bob's blob"),
                        lambda: client.push_bytes("unclaimed/thing", b"bob's blob")):
            with pytest.raises(RegistryError) as refused:
                await attempt()
            assert refused.value.status == 401, refused.value
        # His own namespace works.
        assert (await client.push_bytes("bob/fw", b"bob's blob")).digest == digest_of(
            b"bob's blob")
    finally:
        await client.close()

    # The raw token flow: everything bob may ask for on alice's repository.
    token = await bed.token("bob", bed.bob, "repository:alice/fw:*",
                            "repository:alice/fw:pull,push,delete", "repository:bob/copy:*")
    store = bed.store
    for method, path in (("GET", "/v2/alice/fw/manifests/v1"),
                         ("GET", f"/v2/alice/fw/blobs/{layer}"),
                         ("GET", "/v2/alice/fw/tags/list"),
                         ("POST", "/v2/alice/fw/blobs/uploads/"),
                         ("DELETE", f"/v2/alice/fw/manifests/{bed.manifest}"),
                         ("DELETE", f"/v2/alice/fw/blobs/{layer}")):
        r = await store.request(method, path, token=token)
        assert r.code == 401 and r.error == "UNAUTHORIZED", (method, path, r.code)
    # A mount of alice's layer into bob's repository: an upload session, no blob.
    r = await store.request("POST", f"/v2/bob/copy/blobs/uploads/?mount={layer}&from=alice/fw",
                            token=token)
    assert r.code == 202, r.body
    r = await store.request("HEAD", f"/v2/bob/copy/blobs/{layer}", token=token)
    assert r.code == 404
    # The mount's challenge names both scopes; the token endpoint still grants
    # bob only his side of it.
    r = await store.request("POST", f"/v2/bob/copy/blobs/uploads/?mount={layer}&from=alice/fw")
    challenge = r.header("www-authenticate") or ""
    assert 'scope="repository:bob/copy:pull,push repository:alice/fw:pull"' in challenge
    mount_token = await bed.token("bob", bed.bob, "repository:bob/copy:pull,push",
                                  "repository:alice/fw:pull")
    r = await store.request("POST", f"/v2/bob/copy/blobs/uploads/?mount={layer}&from=alice/fw",
                            token=mount_token)
    assert r.code == 202
    assert await alice_repository(bed) == before


@pytest_twisted.ensureDeferred
async def test_shared_image_mounts_and_star_tokens(bed: Bed) -> None:
    """Once alice lets bob use her image he may pull it and mount it into his own
    repository, never push or delete it; alice's "*" token deletes."""
    layer = digest_of(LAYER)
    r = await bed.alice.post("/api/v1/images/alice/fw/grants",
                             {"user": "bob", "privilege": "manage"})
    assert r.status == 201
    token = await bed.token("bob", bed.bob, "repository:bob/copy:pull,push",
                            "repository:alice/fw:*")
    r = await bed.store.request("GET", f"/v2/alice/fw/blobs/{layer}", token=token)
    assert r.code == 200 and r.body == LAYER
    r = await bed.store.request("POST", f"/v2/bob/copy/blobs/uploads/?mount={layer}&"
                                "from=alice/fw", token=token)
    assert r.code == 201, r.body
    for method, path in (("POST", "/v2/alice/fw/blobs/uploads/"),
                         ("DELETE", f"/v2/alice/fw/manifests/{bed.manifest}")):
        r = await bed.store.request(method, path, token=token)
        assert r.code == 401, (method, path)

    star = await bed.token("alice", bed.alice, "repository:alice/fw:*")
    r = await bed.store.request("DELETE", f"/v2/alice/fw/manifests/{bed.manifest}", token=star)
    assert r.code == 202, r.body


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
@pytest_twisted.ensureDeferred
async def test_skopeo_with_the_switchboards_token_flow(bed: Bed, tmp_path: Path) -> None:
    """skopeo, with user:API token credentials: alice copies into her namespace and
    deletes (skopeo asks for repository:NAME:*); bob can do neither there, nor push
    a top-level name; he copies alice's image once she shares it, not before."""
    from tests.imagestore.support import skopeo

    source = tmp_path / "source"
    source.mkdir()
    build_oci_layout(source, "v1")
    store = bed.store.url.removeprefix("http://")
    alice = ["--creds", f"alice:{bed.alice.token}"]
    bob = ["--creds", f"bob:{bed.bob.token}"]

    async def copy(creds: list[str], src: str, dest: str) -> tuple[int, str]:
        flag = "--dest-creds" if src.startswith("oci:") else "--src-creds"
        both = [flag, creds[1]] if src.startswith("oci:") else [
            "--src-creds", creds[1], "--dest-creds", creds[1]]
        return await skopeo(tmp_path, "copy", "--src-tls-verify=false",
                            "--dest-tls-verify=false", *both, src, dest)

    code, out = await copy(alice, f"oci:{source}:v1", f"docker://{store}/alice/sk:v1")
    assert code == 0, out
    for dest in (f"docker://{store}/alice/sk:v2", f"docker://{store}/demo:v1"):
        code, out = await copy(bob, f"oci:{source}:v1", dest)
        assert code != 0, out
    code, out = await copy(bob, f"docker://{store}/alice/sk:v1", f"docker://{store}/bob/sk:v1")
    assert code != 0, out
    code, out = await skopeo(tmp_path, "delete", "--tls-verify=false", *bob,
                             f"docker://{store}/alice/sk:v1")
    assert code != 0, out

    r = await bed.alice.post("/api/v1/images", {"name": "alice/sk", "digest": bed.manifest,
                                                "stores": [bed.store.url]})
    assert r.status == 201
    r = await bed.alice.post("/api/v1/images/alice/sk/grants", {"user": "bob", "privilege": "use"})
    assert r.status == 201
    code, out = await copy(bob, f"docker://{store}/alice/sk:v1", f"docker://{store}/bob/sk:v1")
    assert code == 0, out
    code, out = await skopeo(tmp_path, "delete", "--tls-verify=false", *bob,
                             f"docker://{store}/alice/sk:v1")
    assert code != 0, out
    code, out = await skopeo(tmp_path, "delete", "--tls-verify=false", *alice,
                             f"docker://{store}/alice/sk:v1")
    assert code == 0, out
    token = await bed.token("alice", bed.alice, "repository:alice/sk:pull")
    r = await bed.store.request("GET", "/v2/alice/sk/manifests/v1", token=token)
    assert r.code == 404
