"""A standard OCI client against the store: ``skopeo copy`` in and back out.

An OCI image layout (config and two gzipped tar layers) built in the test
is pushed with ``skopeo copy oci:… docker://…`` and pulled back into a new
layout; every blob must come back byte for byte, with the same manifest
digest. Once against a store with ``auth.disabled``, once with capability
tokens passed as ``--dest-registry-token``/``--src-registry-token``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.imagestore.support import (
    SERVICE,
    SKOPEO,
    Keys,
    RunningStore,
    build_oci_layout,
    digest_of,
    skopeo,
    start_store,
)
from treadmill.common.captoken import Access

pytestmark = pytest.mark.skipif(
    SKOPEO is None, reason="skopeo is not installed (tools/setup-env installs it with apt)")


def layout_blobs(directory: Path) -> dict[str, bytes]:
    return {"sha256:" + p.name: p.read_bytes()
            for p in (directory / "blobs" / "sha256").iterdir()}


async def round_trip(store: RunningStore, tmp_path: Path, repo: str,
                     push_token: str | None = None, pull_token: str | None = None) -> None:
    push_args = ["--dest-registry-token", push_token] if push_token else []
    pull_args = ["--src-registry-token", pull_token] if pull_token else []
    inspect_args = ["--registry-token", pull_token] if pull_token else []
    source = tmp_path / "source"
    source.mkdir()
    blobs = build_oci_layout(source, "v1")
    index = json.loads((source / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    target = f"docker://127.0.0.1:{store.port}/{repo}:v1"

    code, out = await skopeo(tmp_path, "copy", "--dest-tls-verify=false", "--preserve-digests",
                             *push_args, f"oci:{source}:v1", target)
    assert code == 0, out
    # The store holds exactly the image's blobs, and the tag.
    for digest, content in blobs.items():
        with open(store.storage.blob_path(digest), "rb") as f:
            assert f.read() == content
    assert store.storage.read_tag(repo, "v1") == manifest_digest

    result = tmp_path / "result"
    code, out = await skopeo(tmp_path, "copy", "--src-tls-verify=false", *pull_args, target,
                             f"oci:{result}:v1")
    assert code == 0, out
    assert layout_blobs(result) == blobs
    pulled = json.loads((result / "index.json").read_text())
    assert pulled["manifests"][0]["digest"] == manifest_digest
    assert digest_of(blobs[manifest_digest]) == manifest_digest

    code, out = await skopeo(tmp_path, "inspect", "--tls-verify=false", "--raw",
                             *inspect_args, target)
    assert code == 0 and json.loads(out) == json.loads(blobs[manifest_digest]), out


@pytest_twisted.ensureDeferred
async def test_skopeo_round_trip_without_auth(open_store: RunningStore, tmp_path: Path) -> None:
    await round_trip(open_store, tmp_path, "lab/skopeo")
    # A second push of the same image into another repository re-uses the blobs.
    code, out = await skopeo(tmp_path, "copy", "--src-tls-verify=false",
                             "--dest-tls-verify=false",
                             f"docker://127.0.0.1:{open_store.port}/lab/skopeo:v1",
                             f"docker://127.0.0.1:{open_store.port}/lab/copy:v2")
    assert code == 0, out
    assert open_store.storage.tags("lab/copy") == ["v2"]


@pytest_twisted.ensureDeferred
async def test_skopeo_round_trip_with_tokens(store: RunningStore, tmp_path: Path) -> None:
    keys = store.keys
    assert keys is not None
    push = keys.repo("lab/secure", "pull", "push")
    pull = keys.repo("lab/secure", "pull")
    await round_trip(store, tmp_path, "lab/secure", push, pull)
    # A pull-only token cannot push.
    code, out = await skopeo(tmp_path, "copy", "--dest-tls-verify=false",
                             "--dest-registry-token", pull, f"oci:{tmp_path / 'source'}:v1",
                             f"docker://127.0.0.1:{store.port}/lab/secure:v2")
    assert code != 0, out
    assert store.storage.read_tag("lab/secure", "v2") is None


@pytest_twisted.ensureDeferred
async def test_skopeo_refused_without_the_right_token(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    store = await start_store(tmp_path / "store", keys)
    try:
        source = tmp_path / "source"
        source.mkdir()
        build_oci_layout(source, "v1")
        target = f"docker://127.0.0.1:{store.port}/lab/secure:v1"
        for token in (keys.repo("lab/secure", "pull"), keys.repo("lab/other", "pull", "push"),
                      keys.repo("lab/secure", "pull", "push", audience="someone-else")):
            code, out = await skopeo(tmp_path, "copy", "--dest-tls-verify=false",
                                     "--dest-registry-token", token, f"oci:{source}:v1", target)
            assert code != 0, out
            assert "unauthorized" in out.lower() or "401" in out, out
        code, out = await skopeo(tmp_path, "copy", "--dest-tls-verify=false",
                                 f"oci:{source}:v1", target)
        assert code != 0  # no token: skopeo asks the realm, which does not exist here
        assert store.storage.tags("lab/secure") is None
    finally:
        await store.stop()


class FakeRealm:
    """A stand-in for the switchboard's ``GET /api/v1/registry/token``.

    Grants the requested actions to ``alice:secret`` (HTTP Basic) and nothing
    to anonymous callers, as the contract says; tokens are signed with the
    test's key, so the store verifies them as it would the switchboard's.
    """

    def __init__(self, keys: Keys):
        self.keys = keys
        self.requests: list[dict[str, object]] = []

    def render(self, request: Any) -> bytes:
        import base64
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(request.uri.decode()).query)
        auth = request.getHeader("authorization") or ""
        user = None
        if auth.lower().startswith("basic "):
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if (name, password) != ("alice", "secret"):
                request.setResponseCode(401)
                return b'{"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}'
            user = name
        access = []
        for item in " ".join(query.get("scope", [])).split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            if user is not None:
                access.append(Access(kind, name, tuple(actions.split(","))))
        self.requests.append({"user": user, "service": query.get("service"),
                              "scope": query.get("scope")})
        token = self.keys.signer.sign(user or "anonymous", query["service"][0], access, 300)
        request.setHeader(b"content-type", b"application/json")
        # issued_at must be now: clients cache a token until issued_at + expires_in.
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return json.dumps({"token": token, "access_token": token, "expires_in": 300,
                           "issued_at": issued}).encode()


@pytest_twisted.ensureDeferred
async def test_skopeo_fetches_tokens_from_the_realm(tmp_path: Path, keys: Keys) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    realm = FakeRealm(keys)
    resource = Resource()
    resource.isLeaf = True
    resource.render = realm.render  # type: ignore[method-assign]
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(resource))
    url = f"http://127.0.0.1:{port.getHost().port}/api/v1/registry/token"
    store = await start_store(tmp_path / "store", keys, realm=url, anonymous_pull=["public/**"])
    try:
        source = tmp_path / "source"
        source.mkdir()
        blobs = build_oci_layout(source, "v1")
        for repo in ("lab/creds", "public/demo"):
            code, out = await skopeo(tmp_path, "copy", "--dest-tls-verify=false",
                                     "--dest-creds", "alice:secret", f"oci:{source}:v1",
                                     f"docker://127.0.0.1:{store.port}/{repo}:v1")
            assert code == 0, out
        assert any(r["user"] == "alice" and r["service"] == [SERVICE] and
                   "repository:lab/creds:pull,push" in " ".join(r["scope"] or [])
                   for r in realm.requests), realm.requests
        # Anonymous: the realm grants nothing; public/** is pullable anyway, lab/ is not.
        result = tmp_path / "anonymous"
        code, out = await skopeo(tmp_path, "copy", "--src-tls-verify=false",
                                 f"docker://127.0.0.1:{store.port}/public/demo:v1",
                                 f"oci:{result}:v1")
        assert code == 0, out
        assert layout_blobs(result) == blobs
        code, out = await skopeo(tmp_path, "copy", "--src-tls-verify=false",
                                 f"docker://127.0.0.1:{store.port}/lab/creds:v1",
                                 f"oci:{tmp_path / 'refused'}:v1")
        assert code != 0, out
        code, out = await skopeo(tmp_path, "copy", "--dest-tls-verify=false",
                                 "--dest-creds", "alice:wrong", f"oci:{source}:v1",
                                 f"docker://127.0.0.1:{store.port}/lab/creds:v2")
        assert code != 0, out
        assert any(r["user"] is None for r in realm.requests)
        assert len(realm.requests) < 20, realm.requests  # tokens are cached, not per request
    finally:
        await store.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_skopeo_within_and_over_a_quota(tmp_path: Path, keys: Keys) -> None:
    """A namespace is charged each distinct blob once: a copy into a second repository of
    the namespace costs nothing more once done (while it runs, its uploads count: the
    quota has room for them); a push over the limit fails with the store's message, and
    what skopeo leaves behind is an unfinished session within the limit (it expires)."""
    from treadmill.imagestore.quota import QuotaConfig

    source = tmp_path / "source"
    source.mkdir()
    blobs = build_oci_layout(source, "v1")
    size = sum(len(content) for content in blobs.values())
    store = await start_store(tmp_path / "store", keys,
                              quota=QuotaConfig(namespace_bytes=2 * size,
                                                namespaces={"tiny": size // 2}))
    try:
        ledger = store.service.ledger
        for repo in ("alice/img", "alice/again"):
            push = keys.repo(repo, "pull", "push", subject="alice")
            code, out = await skopeo(tmp_path, "copy", "--dest-tls-verify=false",
                                     "--preserve-digests", "--dest-registry-token", push,
                                     f"oci:{source}:v1",
                                     f"docker://127.0.0.1:{store.port}/{repo}:v1")
            assert code == 0, out
            assert ledger.used("alice") == size and ledger.uploading("alice") == 0
        pull = keys.repo("alice/again", "pull", subject="alice")
        result = tmp_path / "result"
        code, out = await skopeo(tmp_path, "copy", "--src-tls-verify=false",
                                 "--src-registry-token", pull,
                                 f"docker://127.0.0.1:{store.port}/alice/again:v1",
                                 f"oci:{result}:v1")
        assert code == 0, out
        assert layout_blobs(result) == blobs

        push = keys.repo("tiny/img", "pull", "push", subject="tiny")
        code, out = await skopeo(tmp_path, "copy", "--dest-tls-verify=false",
                                 "--dest-registry-token", push, f"oci:{source}:v1",
                                 f"docker://127.0.0.1:{store.port}/tiny/img:v1")
        assert code != 0
        assert "quota exceeded for namespace tiny" in out, out
        assert store.storage.read_tag("tiny/img", "v1") is None
        assert ledger.used("tiny") <= size // 2
        on_disk = sum(os.path.getsize(os.path.join(store.storage.uploads, entry, "data"))
                      for entry in os.listdir(store.storage.uploads))
        assert ledger.uploading("tiny") == on_disk
    finally:
        await store.stop()
