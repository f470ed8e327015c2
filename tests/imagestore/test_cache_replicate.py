"""An image cache replicates images to another store; upstream and target use the token flow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest_twisted

from tests.imagestore.support import (
    CACHE_SERVICE,
    OCI_INDEX,
    OCI_MANIFEST,
    Keys,
    RunningStore,
    TokenService,
    start_cache,
    start_store,
)
from treadmill.imagestore.pullthrough import Credentials

TARGET_SERVICE = "treadmill-target"
UPSTREAM_SERVICE = "treadmill-imagestore"


def read_blob(store: RunningStore, digest: str) -> bytes:
    with open(store.storage.blob_path(digest), "rb") as f:
        return f.read()


async def replicate(cache: RunningStore, token: str, **body: Any) -> tuple[int, dict]:
    r = await cache.registry.request("POST", "/cache/replicate", json.dumps(body).encode(),
                                     {"content-type": "application/json"}, token=token)
    if r.code != 202:
        return r.code, r.json
    location = r.header("location")
    assert location == f"/cache/replicate/{r.json['id']}"
    r = await cache.registry.request("GET", location + "?wait=20", token=token)
    assert r.code == 200
    return 202, r.json


@pytest_twisted.ensureDeferred
async def test_replicate_an_image_to_another_store(tmp_path: Path, keys: Keys) -> None:
    tokens = TokenService(keys)
    realm = tokens.start()
    token_file = tmp_path / "api-token"
    token_file.write_text(tokens.password + "\n")
    upstream = await start_store(tmp_path / "upstream", keys, realm=realm)
    target = await start_store(tmp_path / "target", keys, realm=realm, service=TARGET_SERVICE)
    cache = await start_cache(tmp_path / "cache", keys, [upstream.url], {
        "upstream": Credentials(user=tokens.user, token_file=str(token_file), realms=[realm]),
        "replicate": Credentials(user=tokens.user, token_file=str(token_file), realms=[realm]),
        "replicate_chunk_size": 1000,
        "replicate_targets": [target.url]}, realm=realm)
    try:
        up = upstream.registry.with_token(keys.repo("lab/fw", "pull", "push"))
        big = bytes(range(256)) * 20  # 5120 bytes: six chunks
        image, manifest = await up.push_image("lab/fw", "v1", [b"small layer", big])
        token = keys.token(("cache", "replicate", ["*"]), audience=CACHE_SERVICE)

        # Not in the cache yet: pulled through (token flow to the upstream), then
        # uploaded (token flow to the target), chunked.
        code, job = await replicate(cache, token, repository="lab/fw", reference="v1",
                                    target=target.url, target_repository="site/fw")
        assert code == 202 and job["state"] == "done", job
        assert job["manifest"] == image and job["blobs_total"] == 3
        assert job["blobs_uploaded"] == 3 and job["bytes_done"] == job["bytes_total"]
        assert job["bytes_total"] == sum(d["size"] for d in [manifest["config"],
                                                               *manifest["layers"]])
        assert target.storage.read_tag("site/fw", "v1") == image
        for digest in [image, manifest["config"]["digest"],
                       *(layer["digest"] for layer in manifest["layers"])]:
            assert read_blob(target, digest) == read_blob(upstream, digest), digest
            assert read_blob(cache, digest) == read_blob(upstream, digest), digest
        assert target.storage.blob_linked("site/fw", manifest["layers"][1]["digest"])
        audiences = {audience for audience, _ in tokens.asked}
        assert audiences == {UPSTREAM_SERVICE, TARGET_SERVICE}, tokens.asked
        assert any("repository:site/fw:pull,push" in scopes for _, scopes in tokens.asked)

        # Again: every blob is already there (HEAD), only the manifest is sent.
        code, job = await replicate(cache, token, repository="lab/fw", reference=image,
                                    target=target.url, target_repository="site/fw")
        assert job["state"] == "done" and job["blobs_uploaded"] == 0, job
        assert job["blobs_done"] == 3
        # target_repository defaults to the repository.
        code, job = await replicate(cache, token, repository="lab/fw", reference=image,
                                    target=target.url)
        assert job["state"] == "done" and job["blobs_uploaded"] == 3, job
        assert target.storage.manifest_media_type("lab/fw", image) == OCI_MANIFEST

        # An index: its child manifests go first, by digest.
        child_body = json.dumps(manifest).encode()
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                 "manifests": [{"mediaType": OCI_MANIFEST, "digest": image,
                                "size": len(child_body)}]}
        r = await up.push_manifest("lab/fw", "multi", index, OCI_INDEX)
        assert r.code == 201
        index_digest = r.header("docker-content-digest")
        code, job = await replicate(cache, token, repository="lab/fw", reference="multi",
                                    target=target.url, target_repository="site/multi")
        assert job["state"] == "done" and job["manifests"] == 2, job
        assert target.storage.read_tag("site/multi", "multi") == index_digest
        assert target.storage.manifest_media_type("site/multi", image) == OCI_MANIFEST

        # What cannot be done.
        code, job = await replicate(cache, token, repository="lab/fw", reference="nope",
                                    target=target.url)
        assert job["state"] == "failed" and "MANIFEST_UNKNOWN" in job["error"], job
        code, answer = await replicate(cache, token, repository="lab/fw", reference="v1",
                                       target="http://elsewhere.example")
        assert code == 403 and answer["errors"][0]["code"] == "DENIED"
        code, answer = await replicate(cache, token, repository="../x", reference="v1",
                                       target=target.url)
        assert code == 400
        r = await cache.registry.request("GET", "/cache/replicate/nope", token=token)
        assert r.code == 404 and r.error == "REPLICATION_UNKNOWN"
    finally:
        await cache.stop()
        await target.stop()
        await upstream.stop()
        await tokens.stop()


@pytest_twisted.ensureDeferred
async def test_a_target_that_refuses_fails_the_job(tmp_path: Path, keys: Keys) -> None:
    upstream = await start_store(tmp_path / "upstream", keys)
    target = await start_store(tmp_path / "target", keys, service=TARGET_SERVICE)
    # The cache's replication token is for the wrong service.
    cache = await start_cache(tmp_path / "cache", keys, [upstream.url], {
        "replicate": Credentials(token=keys.repo("lab/fw", "pull", "push"))})
    try:
        up = upstream.registry.with_token(keys.repo("lab/fw", "pull", "push"))
        await up.push_image("lab/fw", "v1", [b"layer"])
        token = keys.token(("cache", "replicate", ["*"]), audience=CACHE_SERVICE)
        code, job = await replicate(cache, token, repository="lab/fw", reference="v1",
                                    target=target.url)
        assert code == 202 and job["state"] == "failed" and "refused" in job["error"], job
        assert target.storage.tags("lab/fw") is None
        assert cache.service.cache.pins == {}
    finally:
        await cache.stop()
        await target.stop()
        await upstream.stop()
