"""Who may do what: capability tokens, the 401 challenge, anonymous pull.

The authorisation matrix is a table, one test per row.
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
    OCI_MANIFEST,
    REALM,
    SERVICE,
    Keys,
    RunningStore,
    digest_of,
    start_store,
)

NAME = "lab/fw"
LAYER = b"a firmware layer"


async def seeded(store: RunningStore) -> dict[str, Any]:
    """Push an image with a full token; return what the table needs."""
    assert store.keys is not None
    admin = store.registry.with_token(store.keys.repo(NAME, "pull", "push", "delete"))
    manifest_digest, _ = await admin.push_image(NAME, "v1", [LAYER])
    other = store.registry.with_token(store.keys.repo("lab/other", "pull", "push"))
    await other.push_image("lab/other", "v1", [b"other"])
    r = await admin.request("POST", f"/v2/{NAME}/blobs/uploads/")
    return {"manifest": manifest_digest, "layer": digest_of(LAYER),
            "upload": r.header("location"), "admin": admin}


def requests(s: dict[str, Any]) -> dict[str, tuple[str, str, bytes | None, str]]:
    """Requests by label: (method, path, body, the action they need)."""
    layer = s["layer"]
    return {
        "get blob": ("GET", f"/v2/{NAME}/blobs/{layer}", None, "pull"),
        "head blob": ("HEAD", f"/v2/{NAME}/blobs/{layer}", None, "pull"),
        "get manifest": ("GET", f"/v2/{NAME}/manifests/v1", None, "pull"),
        "head manifest": ("HEAD", f"/v2/{NAME}/manifests/{s['manifest']}", None, "pull"),
        "tags": ("GET", f"/v2/{NAME}/tags/list", None, "pull"),
        "start upload": ("POST", f"/v2/{NAME}/blobs/uploads/", None, "push"),
        "monolithic": ("POST", f"/v2/{NAME}/blobs/uploads/?digest={digest_of(b'new')}", b"new",
                       "push"),
        "patch": ("PATCH", s["upload"], b"chunk", "push"),
        "upload status": ("GET", s["upload"], None, "push"),
        "put manifest": ("PUT", f"/v2/{NAME}/manifests/v2", None, "push"),
        "delete manifest": ("DELETE", f"/v2/{NAME}/manifests/v1", None, "delete"),
        "delete blob": ("DELETE", f"/v2/{NAME}/blobs/{layer}", None, "delete"),
    }


LABELS = ["get blob", "head blob", "get manifest", "head manifest", "tags", "start upload",
          "monolithic", "patch", "upload status", "put manifest", "delete manifest",
          "delete blob"]


def token_for(keys: Keys, case: str, action: str) -> str | None:
    now = time.time()
    return {
        "none": None,
        "garbage": "not.a.token",
        "wrong repository": keys.repo("lab/other", action),
        "prefix repository": keys.repo("lab", action),
        "wrong action": keys.repo(NAME, *({"pull", "push", "delete"} - {action})),
        "expired": keys.signed_at(now - 3600, ("repository", NAME, [action]), ttl=60),
        "not yet valid": keys.signed_at(now + 3600, ("repository", NAME, [action]), ttl=60),
        "wrong audience": keys.repo(NAME, action, audience="treadmill-logserver"),
        "wrong issuer": keys.signed_at(now, ("repository", NAME, [action]), issuer="mallory"),
        "other key": _foreign_token(action),
    }[case]


def _foreign_token(action: str) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        return Keys(Path(directory)).repo(NAME, action)


REFUSALS = ["none", "garbage", "wrong repository", "prefix repository", "wrong action",
            "expired", "not yet valid", "wrong audience", "wrong issuer", "other key"]


async def seeded_request(store: RunningStore, label: str
                         ) -> tuple[dict[str, Any], tuple[str, str, Any, str]]:
    """The seeded store's state and the request ``label`` names: ``(method, path, body,
    action)``; a manifest put sends the manifest already there."""
    s = await seeded(store)
    method, path, body, action = requests(s)[label]
    if label == "put manifest":
        body = (await s["admin"].request("GET", f"/v2/{NAME}/manifests/v1")).body
    return s, (method, path, body, action)


@pytest.mark.parametrize("label", LABELS)
@pytest_twisted.ensureDeferred
async def test_refused_without_the_right_token(store: RunningStore, label: str) -> None:
    s, (method, path, body, action) = await seeded_request(store, label)
    for case in REFUSALS:
        token = token_for(store.keys, case, action)
        r = await store.registry.request(method, path, body, token=token or "",
                                         headers={"content-type": OCI_MANIFEST})
        assert r.code == 401, (label, case, r.code, r.body)
        challenge = r.header("www-authenticate")
        assert challenge is not None and challenge.startswith(
            f'Bearer realm="{REALM}",service="{SERVICE}",scope="repository:{NAME}:'), challenge
        if action == "pull":
            assert f'scope="repository:{NAME}:pull"' in challenge
        elif action == "push":
            assert f'scope="repository:{NAME}:pull,push"' in challenge
        else:
            assert f'scope="repository:{NAME}:delete"' in challenge
        if case == "none":
            assert "error=" not in challenge
        elif case in ("wrong repository", "prefix repository", "wrong action"):
            assert 'error="insufficient_scope"' in challenge
        else:
            assert 'error="invalid_token"' in challenge
        if method != "HEAD":
            assert r.error == "UNAUTHORIZED"
            assert token is None or token not in r.body.decode()
    # Nothing was changed by the refused requests.
    r = await s["admin"].request("GET", f"/v2/{NAME}/manifests/v1")
    assert r.code == 200
    r = await s["admin"].request("GET", f"/v2/{NAME}/tags/list")
    assert r.json["tags"] == ["v1"]
    r = await s["admin"].request("GET", s["upload"])
    assert r.header("range") == "0-0"


@pytest.mark.parametrize("label", LABELS)
@pytest_twisted.ensureDeferred
async def test_allowed_with_the_right_token(store: RunningStore, label: str) -> None:
    _, (method, path, body, action) = await seeded_request(store, label)
    token = store.keys.repo(NAME, action)
    r = await store.registry.request(method, path, body, token=token,
                                     headers={"content-type": OCI_MANIFEST})
    assert r.code in (200, 201, 202, 204), (label, r.code, r.body)


@pytest_twisted.ensureDeferred
async def test_base_endpoint(store: RunningStore) -> None:
    r = await store.registry.request("GET", "/v2/")
    assert r.code == 401 and r.error == "UNAUTHORIZED"
    assert r.header("www-authenticate") == f'Bearer realm="{REALM}",service="{SERVICE}"'
    r = await store.registry.request("GET", "/v2/", token=store.keys.repo("x", "pull"))
    assert r.code == 200 and r.json == {}
    expired = store.keys.signed_at(time.time() - 3600, ("repository", "x", ["pull"]))
    r = await store.registry.request("GET", "/v2/", token=expired)
    assert r.code == 401
    assert 'error="invalid_token"' in r.header("www-authenticate")


@pytest_twisted.ensureDeferred
async def test_catalog_and_gc_need_registry_grants(store: RunningStore) -> None:
    await seeded(store)
    keys = store.keys
    for path, method, grant in (("/v2/_catalog", "GET", "catalog"), ("/admin/gc", "POST", "gc")):
        for token in (None, keys.repo(NAME, "pull", "push", "delete"),
                      keys.token(("registry", grant, ["pull"]))):
            r = await store.registry.request(method, path, token=token or "")
            assert r.code == 401, (path, token)
            assert f'scope="registry:{grant}:*"' in r.header("www-authenticate")
        r = await store.registry.request(method, path,
                                         token=keys.token(("registry", grant, ["*"])))
        assert r.code == 200, r.body
    r = await store.registry.request("GET", "/v2/_catalog",
                                     token=keys.token(("registry", "catalog", ["*"])))
    assert r.json == {"repositories": ["lab/fw", "lab/other"]}


OTHER_LAYER = digest_of(b"other")
MOUNT = f"/v2/{NAME}/blobs/uploads/?mount={OTHER_LAYER}&from=lab/other"
"""Mount lab/other's layer (:func:`seeded` pushes it) into NAME."""


async def other_layer_code(store: RunningStore) -> int:
    """The status of ``HEAD`` on lab/other's layer in NAME: 404 until it is mounted."""
    return (await store.registry.request("HEAD", f"/v2/{NAME}/blobs/{OTHER_LAYER}",
                                         token=store.keys.repo(NAME, "pull"))).code


@pytest_twisted.ensureDeferred
async def test_mount_needs_pull_on_the_source(store: RunningStore) -> None:
    await seeded(store)
    keys = store.keys
    # Push on the target only: no mount, an upload session instead.
    r = await store.registry.request("POST", MOUNT, token=keys.repo(NAME, "push"))
    assert r.code == 202
    assert await other_layer_code(store) == 404
    both = keys.token(("repository", NAME, ["push", "pull"]),
                      ("repository", "lab/other", ["pull"]))
    r = await store.registry.request("POST", MOUNT, token=both)
    assert r.code == 201


@pytest_twisted.ensureDeferred
async def test_a_mounts_challenge_names_the_source_too(store: RunningStore) -> None:
    """As the reference registry: a client fetches one token that allows the mount."""
    await seeded(store)
    keys = store.keys
    wanted = f'scope="repository:{NAME}:pull,push repository:lab/other:pull"'
    for token in (None, keys.repo("lab/other", "pull"), keys.repo(NAME, "pull")):
        r = await store.registry.request("POST", MOUNT, token=token)
        assert r.code == 401, r.body
        assert wanted in (r.header("www-authenticate") or ""), r.header("www-authenticate")
    assert await other_layer_code(store) == 404
    # Without a valid mount, the challenge is the push's alone.
    for query in (f"mount={OTHER_LAYER}", "mount=sha256:zz&from=lab/other",
                  f"mount={OTHER_LAYER}&from=..%2Fetc"):
        r = await store.registry.request("POST", f"/v2/{NAME}/blobs/uploads/?{query}")
        assert r.code == 401
        assert f'scope="repository:{NAME}:pull,push"' in r.header("www-authenticate"), query


@pytest_twisted.ensureDeferred
async def test_anonymous_pull(tmp_path: Path, keys: Keys) -> None:
    store = await start_store(tmp_path / "store", keys, anonymous_pull=["demo/*", "public/**"])
    try:
        for name in ("demo/fw", "demo/deep/er", "public/a/b/c", "private"):
            pusher = store.registry.with_token(keys.repo(name, "pull", "push"))
            await pusher.push_image(name, "v1", [name.encode()])
        anonymous = store.registry
        for name, allowed in (("demo/fw", True), ("demo/deep/er", False),
                              ("public/a/b/c", True), ("private", False)):
            r = await anonymous.request("GET", f"/v2/{name}/manifests/v1")
            assert (r.code == 200) is allowed, name
            r = await anonymous.request("GET", f"/v2/{name}/blobs/{digest_of(name.encode())}")
            assert (r.code == 200) is allowed, name
            r = await anonymous.request("GET", f"/v2/{name}/tags/list")
            assert (r.code == 200) is allowed, name
            if not allowed:
                assert r.code == 401
            # A token without pull does not take the anonymous right away.
            r = await anonymous.request("GET", f"/v2/{name}/tags/list",
                                        token=keys.repo("unrelated", "pull"))
            assert (r.code == 200) is allowed, name
        # Push and delete always need a token.
        r = await anonymous.request("POST", "/v2/demo/fw/blobs/uploads/")
        assert r.code == 401
        r = await anonymous.request("DELETE", "/v2/demo/fw/manifests/v1")
        assert r.code == 401
        r = await anonymous.request("PUT", "/v2/demo/fw/manifests/v2", b"{}")
        assert r.code == 401
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_anonymous_pull_everything(tmp_path: Path, keys: Keys) -> None:
    store = await start_store(tmp_path / "store", keys, anonymous_pull=["**"])
    try:
        pusher = store.registry.with_token(keys.repo("a/b", "pull", "push"))
        await pusher.push_image("a/b", "v1", [b"x"])
        r = await store.registry.request("GET", "/v2/a/b/manifests/v1")
        assert r.code == 200
        r = await store.registry.request("POST", "/v2/a/b/blobs/uploads/")
        assert r.code == 401
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_refused_upload_body_is_not_stored(store: RunningStore) -> None:
    """A push without the right token streams nothing to disk."""
    data = b"z" * (3 * 1024 * 1024)
    r = await store.registry.request("POST", f"/v2/{NAME}/blobs/uploads/?digest={digest_of(data)}",
                                     data, token=store.keys.repo(NAME, "pull"))
    assert r.code == 401
    assert os.listdir(store.storage.uploads) == []
    assert not store.storage.has_blob(digest_of(data))
    r = await store.registry.request("GET", "/v2/", token=store.keys.repo(NAME, "pull"))
    assert r.code == 200
    assert json.loads(r.body) == {}
