"""Every endpoint of the image store, against a real store on loopback (auth disabled).

Authorisation has its own tests (``test_auth.py``); these are about the
protocol: status codes, headers and bodies as OCI clients expect them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import pytest_twisted

from tests.imagestore.support import OCI_INDEX, OCI_MANIFEST, RunningStore, digest_of

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


@pytest_twisted.ensureDeferred
async def test_base_and_health(open_store: RunningStore) -> None:
    r = await open_store.registry.request("GET", "/v2/")
    assert r.code == 200 and r.json == {}
    assert r.header("docker-distribution-api-version") == "registry/2.0"
    r = await open_store.registry.request("GET", "/healthz")
    assert r.code == 200


@pytest_twisted.ensureDeferred
async def test_monolithic_upload_then_head_get_delete(open_store: RunningStore) -> None:
    reg = open_store.registry
    data = os.urandom(100_000)
    digest = digest_of(data)
    r = await reg.request("POST", f"/v2/lab/fw/blobs/uploads/?digest={digest}", data)
    assert r.code == 201
    assert r.header("location") == f"/v2/lab/fw/blobs/{digest}"
    assert r.header("docker-content-digest") == digest

    r = await reg.request("HEAD", f"/v2/lab/fw/blobs/{digest}")
    assert r.code == 200 and r.body == b""
    assert r.header("content-length") == str(len(data))
    assert r.header("docker-content-digest") == digest
    assert r.header("accept-ranges") == "bytes"

    r = await reg.request("GET", f"/v2/lab/fw/blobs/{digest}")
    assert r.code == 200 and r.body == data

    # Committed blobs are read-only files in the documented place.
    path = open_store.storage.blob_path(digest)
    assert path.endswith(f"blobs/sha256/{digest[7:9]}/{digest[7:]}")
    assert os.stat(path).st_mode & 0o777 == 0o440
    assert os.listdir(open_store.storage.uploads) == []

    # Not visible from another repository.
    r = await reg.request("HEAD", f"/v2/lab/other/blobs/{digest}")
    assert r.code == 404
    r = await reg.request("GET", f"/v2/lab/other/blobs/{digest}")
    assert r.code == 404 and r.error == "BLOB_UNKNOWN"

    r = await reg.request("DELETE", f"/v2/lab/fw/blobs/{digest}")
    assert r.code == 202
    r = await reg.request("HEAD", f"/v2/lab/fw/blobs/{digest}")
    assert r.code == 404
    r = await reg.request("DELETE", f"/v2/lab/fw/blobs/{digest}")
    assert r.code == 404 and r.error == "BLOB_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_range_reads(open_store: RunningStore) -> None:
    reg = open_store.registry
    data = bytes(range(256)) * 1000
    digest = await reg.push_blob("lab/fw", data)
    url = f"/v2/lab/fw/blobs/{digest}"
    size = len(data)
    for header, first, last in [("bytes=0-9", 0, 9), ("bytes=10-", 10, size - 1),
                                ("bytes=-5", size - 5, size - 1),
                                ("bytes=100-99999999", 100, size - 1),
                                ("bytes=1000-1000", 1000, 1000)]:
        r = await reg.request("GET", url, headers={"range": header})
        assert r.code == 206, header
        assert r.body == data[first:last + 1], header
        assert r.header("content-range") == f"bytes {first}-{last}/{size}"
        assert r.header("content-length") == str(last - first + 1)
        assert r.header("docker-content-digest") == digest
    for header in (f"bytes={size}-", "bytes=-0", f"bytes={size + 10}-{size + 20}"):
        r = await reg.request("GET", url, headers={"range": header})
        assert r.code == 416, header
        assert r.error == "RANGE_INVALID"
        assert r.header("content-range") == f"bytes */{size}"
    # Several ranges, or junk: the whole blob.
    for header in ("bytes=0-1,5-6", "pages=1-2", "bytes=9-3"):
        r = await reg.request("GET", url, headers={"range": header})
        assert r.code == 200 and r.body == data, header


@pytest_twisted.ensureDeferred
async def test_chunked_upload(open_store: RunningStore) -> None:
    reg = open_store.registry
    data = os.urandom(300_000)
    r = await reg.request("POST", "/v2/lab/fw/blobs/uploads/")
    assert r.code == 202
    location = r.header("location")
    upload_id = r.header("docker-upload-uuid")
    assert location == f"/v2/lab/fw/blobs/uploads/{upload_id}"
    assert r.header("range") == "0-0"

    r = await reg.request("PATCH", location, data[:100_000],
                          {"content-range": "0-99999",
                           "content-type": "application/octet-stream"})
    assert r.code == 202 and r.header("range") == "0-99999"
    assert r.header("docker-upload-uuid") == upload_id

    # A chunk at the wrong offset is refused, and nothing changes.
    r = await reg.request("PATCH", location, data[:10], {"content-range": "0-9"})
    assert r.code == 416 and r.error == "RANGE_INVALID"
    assert r.header("range") == "0-99999"
    r = await reg.request("PATCH", location, data[200_000:200_010],
                          {"content-range": "200000-200009"})
    assert r.code == 416
    r = await reg.request("PATCH", location, data[100_000:100_010],
                          {"content-range": "100000-100019"})  # says 20 bytes, sends 10
    assert r.code == 416 and r.error == "RANGE_INVALID"

    # Without Content-Range: appended (a "streamed" chunk).
    r = await reg.request("PATCH", location, data[100_000:250_000])
    assert r.code == 202 and r.header("range") == "0-249999"

    r = await reg.request("GET", location)
    assert r.code == 204 and r.header("range") == "0-249999"
    assert r.header("docker-upload-uuid") == upload_id

    # The final chunk travels with the PUT.
    digest = digest_of(data)
    r = await reg.request("PUT", f"{location}?digest={digest}", data[250_000:],
                          {"content-range": "250000-299999"})
    assert r.code == 201, r.body
    assert r.header("location") == f"/v2/lab/fw/blobs/{digest}"
    r = await reg.request("GET", f"/v2/lab/fw/blobs/{digest}")
    assert r.body == data
    # The session is gone.
    r = await reg.request("GET", location)
    assert r.code == 404 and r.error == "BLOB_UPLOAD_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_put_without_body_and_empty_blob(open_store: RunningStore) -> None:
    reg = open_store.registry
    r = await reg.request("POST", "/v2/lab/fw/blobs/uploads/")
    location = r.header("location")
    r = await reg.request("PATCH", location, b"abc")
    assert r.code == 202 and r.header("range") == "0-2"
    r = await reg.request("PUT", f"{location}?digest={digest_of(b'abc')}")
    assert r.code == 201
    # The empty blob.
    r = await reg.request("POST", "/v2/lab/fw/blobs/uploads/")
    r = await reg.request("PUT", f"{r.header('location')}?digest={digest_of(b'')}")
    assert r.code == 201
    r = await reg.request("GET", f"/v2/lab/fw/blobs/{digest_of(b'')}")
    assert r.code == 200 and r.body == b"" and r.header("content-length") == "0"


@pytest_twisted.ensureDeferred
async def test_cancel_upload(open_store: RunningStore) -> None:
    reg = open_store.registry
    r = await reg.request("POST", "/v2/lab/fw/blobs/uploads/")
    location = r.header("location")
    await reg.request("PATCH", location, b"x" * 1000)
    r = await reg.request("DELETE", location)
    assert r.code == 204
    r = await reg.request("GET", location)
    assert r.code == 404 and r.error == "BLOB_UPLOAD_UNKNOWN"
    r = await reg.request("PATCH", location, b"more")
    assert r.code == 404 and r.error == "BLOB_UPLOAD_UNKNOWN"
    r = await reg.request("DELETE", location)
    assert r.code == 404
    assert os.listdir(open_store.storage.uploads) == []


@pytest_twisted.ensureDeferred
async def test_upload_belongs_to_its_repository(open_store: RunningStore) -> None:
    reg = open_store.registry
    r = await reg.request("POST", "/v2/lab/fw/blobs/uploads/")
    upload_id = r.header("docker-upload-uuid")
    r = await reg.request("PATCH", f"/v2/lab/other/blobs/uploads/{upload_id}", b"data")
    assert r.code == 404 and r.error == "BLOB_UPLOAD_UNKNOWN"
    r = await reg.request("GET", f"/v2/lab/other/blobs/uploads/{upload_id}")
    assert r.code == 404
    for bogus in ("not-a-uuid", "0" * 32, "../../blobs"):
        r = await reg.request("GET", f"/v2/lab/fw/blobs/uploads/{bogus}")
        assert r.code in (404, 400), bogus


@pytest_twisted.ensureDeferred
async def test_cross_repository_mount(open_store: RunningStore) -> None:
    reg = open_store.registry
    digest = await reg.push_blob("lab/source", b"shared layer")
    r = await reg.request("POST", f"/v2/lab/target/blobs/uploads/?mount={digest}&from=lab/source")
    assert r.code == 201
    assert r.header("location") == f"/v2/lab/target/blobs/{digest}"
    r = await reg.request("GET", f"/v2/lab/target/blobs/{digest}")
    assert r.body == b"shared layer"
    # A blob the source does not have: an ordinary upload session instead.
    missing = digest_of(b"nope")
    r = await reg.request("POST", f"/v2/lab/target/blobs/uploads/?mount={missing}&from=lab/source")
    assert r.code == 202 and r.header("docker-upload-uuid")
    r = await reg.request("POST", f"/v2/lab/target/blobs/uploads/?mount={digest}&from=../x")
    assert r.code == 202


@pytest_twisted.ensureDeferred
async def test_manifests_by_tag_and_digest(open_store: RunningStore) -> None:
    reg = open_store.registry
    digest, manifest = await reg.push_image("lab/fw", "v1", [b"one", b"two"])
    stored = json.dumps(manifest).encode()
    assert digest == digest_of(stored)

    for reference in ("v1", digest):
        r = await reg.request("GET", f"/v2/lab/fw/manifests/{reference}",
                              headers={"accept": OCI_MANIFEST})
        assert r.code == 200
        assert r.body == stored  # the exact bytes
        assert r.header("content-type") == OCI_MANIFEST
        assert r.header("docker-content-digest") == digest
        r = await reg.request("HEAD", f"/v2/lab/fw/manifests/{reference}")
        assert r.code == 200 and r.body == b""
        assert r.header("content-length") == str(len(stored))
        assert r.header("docker-content-digest") == digest

    # PUT by digest: the digest must match.
    r = await reg.request("PUT", f"/v2/lab/fw/manifests/{digest}", stored,
                          {"content-type": OCI_MANIFEST})
    assert r.code == 201
    r = await reg.request("PUT", f"/v2/lab/fw/manifests/{digest_of(b'other')}", stored,
                          {"content-type": OCI_MANIFEST})
    assert r.code == 400 and r.error == "DIGEST_INVALID"

    # Moving a tag.
    digest2, _ = await reg.push_image("lab/fw", "v1", [b"three"])
    r = await reg.request("GET", "/v2/lab/fw/manifests/v1")
    assert r.header("docker-content-digest") == digest2
    r = await reg.request("GET", f"/v2/lab/fw/manifests/{digest}")
    assert r.code == 200  # still there by digest

    r = await reg.request("GET", "/v2/lab/fw/manifests/nope")
    assert r.code == 404 and r.error == "MANIFEST_UNKNOWN"
    r = await reg.request("GET", "/v2/lab/none/manifests/v1")
    assert r.code == 404 and r.error == "NAME_UNKNOWN"
    r = await reg.request("GET", f"/v2/lab/fw/manifests/{digest_of(b'x')}")
    assert r.code == 404 and r.error == "MANIFEST_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_manifest_delete(open_store: RunningStore) -> None:
    reg = open_store.registry
    digest, _ = await reg.push_image("lab/fw", "v1", [b"one"])
    r = await reg.request("PUT", "/v2/lab/fw/manifests/also",
                          (await reg.request("GET", "/v2/lab/fw/manifests/v1")).body,
                          {"content-type": OCI_MANIFEST})
    assert r.code == 201
    # Deleting a tag leaves the manifest.
    r = await reg.request("DELETE", "/v2/lab/fw/manifests/also")
    assert r.code == 202
    r = await reg.request("GET", "/v2/lab/fw/tags/list")
    assert r.json["tags"] == ["v1"]
    r = await reg.request("GET", f"/v2/lab/fw/manifests/{digest}")
    assert r.code == 200
    # Deleting by digest removes the tags that point to it.
    r = await reg.request("DELETE", f"/v2/lab/fw/manifests/{digest}")
    assert r.code == 202
    r = await reg.request("GET", "/v2/lab/fw/manifests/v1")
    assert r.code == 404
    r = await reg.request("GET", f"/v2/lab/fw/manifests/{digest}")
    assert r.code == 404
    r = await reg.request("DELETE", f"/v2/lab/fw/manifests/{digest}")
    assert r.code == 404 and r.error == "MANIFEST_UNKNOWN"
    r = await reg.request("GET", "/v2/lab/fw/tags/list")
    assert r.json["tags"] == []


def an_index(media_type: str, child_type: str, digest: str, child: dict[str, Any]
             ) -> dict[str, Any]:
    """An index (or Docker list) of ``media_type`` naming one amd64 manifest ``child``."""
    return {"schemaVersion": 2, "mediaType": media_type,
            "manifests": [{"mediaType": child_type, "digest": digest,
                           "size": len(json.dumps(child).encode()),
                           "platform": {"architecture": "amd64", "os": "linux"}}]}


@pytest_twisted.ensureDeferred
async def test_index_and_docker_media_types(open_store: RunningStore) -> None:
    reg = open_store.registry
    child, manifest = await reg.push_image("lab/multi", "amd64", [b"amd64 layer"])
    index = an_index(OCI_INDEX, OCI_MANIFEST, child, manifest)
    r = await reg.push_manifest("lab/multi", "latest", index, OCI_INDEX)
    assert r.code == 201, r.body
    r = await reg.request("GET", "/v2/lab/multi/manifests/latest")
    assert r.header("content-type") == OCI_INDEX

    # An index whose child's size is not the manifest's: clients that check sizes
    # (containerd) would refuse it, so the store does.
    index["manifests"][0]["size"] += 1
    r = await reg.push_manifest("lab/multi", "wrong-size", index, OCI_INDEX)
    assert r.code == 400 and r.error == "MANIFEST_INVALID", (r.code, r.body)
    assert b"does not match" in r.body
    r = await reg.request("GET", "/v2/lab/multi/manifests/wrong-size")
    assert r.code == 404
    index["manifests"][0]["size"] -= 1

    # An index whose child is not in the repository.
    index["manifests"][0]["digest"] = digest_of(b"elsewhere")
    r = await reg.push_manifest("lab/multi", "broken", index, OCI_INDEX)
    assert r.code == 400 and r.error == "MANIFEST_BLOB_UNKNOWN"

    # Docker schema 2 manifest and list.
    config = await reg.push_blob("lab/docker", b"{}")
    layer = await reg.push_blob("lab/docker", b"docker layer")
    docker = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
              "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                         "digest": config, "size": 2},
              "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                          "digest": layer, "size": 12}]}
    r = await reg.push_manifest("lab/docker", "v1", docker, DOCKER_MANIFEST)
    assert r.code == 201, r.body
    docker_digest = r.header("docker-content-digest")
    listing = an_index(DOCKER_LIST, DOCKER_MANIFEST, docker_digest, docker)
    r = await reg.push_manifest("lab/docker", "list", listing, DOCKER_LIST)
    assert r.code == 201, r.body
    r = await reg.request("GET", "/v2/lab/docker/manifests/list")
    assert r.header("content-type") == DOCKER_LIST


@pytest_twisted.ensureDeferred
async def test_manifest_refusals(open_store: RunningStore) -> None:
    reg = open_store.registry
    config = await reg.push_blob("lab/fw", b"{}")
    good = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config, "size": 2},
            "layers": []}
    missing = digest_of(b"never uploaded")
    cases = [
        ({**good, "layers": [{"mediaType": "x", "digest": missing, "size": 14}]},
         OCI_MANIFEST, "MANIFEST_BLOB_UNKNOWN"),
        ({**good, "config": {**good["config"], "digest": missing}}, OCI_MANIFEST,
         "MANIFEST_BLOB_UNKNOWN"),
        ({**good, "config": {**good["config"], "size": 3}}, OCI_MANIFEST, "MANIFEST_INVALID"),
        ({**good, "schemaVersion": 1}, OCI_MANIFEST, "MANIFEST_INVALID"),
        ({**good, "layers": [{"mediaType": "x", "digest": "sha512:" + "a" * 128, "size": 1}]},
         OCI_MANIFEST, "MANIFEST_INVALID"),
        ({**good, "layers": "nope"}, OCI_MANIFEST, "MANIFEST_INVALID"),
        (good, OCI_INDEX, "MANIFEST_INVALID"),  # Content-Type and mediaType disagree
        ({k: v for k, v in good.items() if k != "mediaType"}, "", "MANIFEST_INVALID"),
        ({**good, "mediaType": "application/x-unknown"}, "application/x-unknown",
         "MANIFEST_INVALID"),
    ]
    for manifest, media_type, code in cases:
        r = await reg.push_manifest("lab/fw", "bad", manifest, media_type)
        assert r.code == 400 and r.error == code, (manifest, r.body)
    for body in (b"not json", b"[1, 2]", b'{"schemaVersion": NaN}'):
        r = await reg.request("PUT", "/v2/lab/fw/manifests/bad", body,
                              {"content-type": OCI_MANIFEST})
        assert r.code == 400 and r.error == "MANIFEST_INVALID", body
    r = await reg.request("GET", "/v2/lab/fw/manifests/bad")
    assert r.code == 404
    # Without mediaType in the body, Content-Type decides.
    r = await reg.push_manifest("lab/fw", "ok",
                                {k: v for k, v in good.items() if k != "mediaType"},
                                OCI_MANIFEST)
    assert r.code == 201


@pytest_twisted.ensureDeferred
async def test_oversized_manifest(open_store: RunningStore) -> None:
    reg = open_store.registry
    config = await reg.push_blob("lab/fw", b"{}")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "x", "digest": config, "size": 2}, "layers": [],
                "annotations": {"padding": "x" * (4 * 1024 * 1024)}}
    r = await reg.push_manifest("lab/fw", "huge", manifest)
    assert r.code == 413 and r.error == "SIZE_INVALID"
    r = await reg.request("GET", "/v2/lab/fw/manifests/huge")
    assert r.code == 404


@pytest_twisted.ensureDeferred
async def test_tags_list_pagination(open_store: RunningStore) -> None:
    reg = open_store.registry
    await reg.push_image("lab/fw", "a", [b"layer"])
    body = (await reg.request("GET", "/v2/lab/fw/manifests/a")).body
    for tag in ("b", "c", "d", "e"):
        r = await reg.request("PUT", f"/v2/lab/fw/manifests/{tag}", body,
                              {"content-type": OCI_MANIFEST})
        assert r.code == 201
    r = await reg.request("GET", "/v2/lab/fw/tags/list")
    assert r.json == {"name": "lab/fw", "tags": ["a", "b", "c", "d", "e"]}
    assert r.header("link") is None
    r = await reg.request("GET", "/v2/lab/fw/tags/list?n=2")
    assert r.json["tags"] == ["a", "b"]
    assert r.header("link") == '</v2/lab/fw/tags/list?n=2&last=b>; rel="next"'
    r = await reg.request("GET", "/v2/lab/fw/tags/list?n=2&last=b")
    assert r.json["tags"] == ["c", "d"]
    r = await reg.request("GET", "/v2/lab/fw/tags/list?n=2&last=d")
    assert r.json["tags"] == ["e"] and r.header("link") is None
    r = await reg.request("GET", "/v2/lab/fw/tags/list?n=0")
    assert r.json["tags"] == []
    r = await reg.request("GET", "/v2/lab/fw/tags/list?n=-1")
    assert r.code == 400
    r = await reg.request("GET", "/v2/lab/nothing/tags/list")
    assert r.code == 404 and r.error == "NAME_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_catalog(open_store: RunningStore) -> None:
    reg = open_store.registry
    for name in ("lab/fw", "lab/fw/extra", "demo", "z.a-b/c_d"):
        await reg.push_image(name, "v1", [name.encode()])
    r = await reg.request("GET", "/v2/_catalog")
    assert r.code == 200
    assert r.json == {"repositories": ["demo", "lab/fw", "lab/fw/extra", "z.a-b/c_d"]}
    r = await reg.request("GET", "/v2/_catalog?n=2")
    assert r.json == {"repositories": ["demo", "lab/fw"]}
    assert r.header("link") == '</v2/_catalog?n=2&last=lab/fw>; rel="next"'
    r = await reg.request("GET", "/v2/_catalog?n=2&last=lab/fw")
    assert r.json == {"repositories": ["lab/fw/extra", "z.a-b/c_d"]}


@pytest_twisted.ensureDeferred
async def test_errors_in_oci_shape(open_store: RunningStore) -> None:
    reg = open_store.registry
    r = await reg.request("GET", "/v2/lab/fw/blobs/sha256:1234")
    assert r.code == 400
    assert r.json == {"errors": [{"code": "DIGEST_INVALID", "message": "invalid digest",
                                  "detail": None}]}
    r = await reg.request("GET", "/v2/lab/fw/blobs/sha512:" + "a" * 128)
    assert r.code == 400 and r.error == "DIGEST_INVALID"
    r = await reg.request("GET", "/v2/Lab/fw/tags/list")
    assert r.code == 400 and r.error == "NAME_INVALID"
    r = await reg.request("GET", "/v2/" + "a" * 256 + "/tags/list")
    assert r.code == 400 and r.error == "NAME_INVALID"
    r = await reg.request("POST", "/v2/lab/fw/blobs/uploads/?digest=md5:abc", b"x")
    assert r.code == 400 and r.error == "DIGEST_INVALID"
    r = await reg.request("PUT", "/v2/lab/fw/blobs/uploads/")
    assert r.code == 405 and r.error == "UNSUPPORTED"
    r = await reg.request("GET", "/nowhere")
    assert r.code == 404 and r.error


@pytest_twisted.ensureDeferred
async def test_treadmill_images_are_validated_on_push(open_store: RunningStore) -> None:
    fmt = pytest.importorskip("treadmill.images.format")
    reg = open_store.registry
    empty = await reg.push_blob("lab/vm", fmt.EMPTY_BLOB)
    disk = await reg.push_blob("lab/vm", b"qcow2 bytes")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "artifactType": fmt.ARTIFACT_QEMU,
                "config": {"mediaType": fmt.OCI_EMPTY, "digest": empty, "size": 2},
                "layers": [{"mediaType": "application/vnd.treadmill.qemu.qcow2.v1",
                            "digest": disk, "size": 11}]}
    r = await reg.push_manifest("lab/vm", "v1", manifest)
    assert r.code == 201, r.body
    # A Treadmill-only rule (a misspelt org.treadmill. annotation): refused by the format.
    bad = {**manifest, "layers": [{**manifest["layers"][0],
                                   "annotations": {"org.treadmill.qcow2.lowre": disk}}]}
    r = await reg.push_manifest("lab/vm", "v2", bad)
    assert r.code == 400 and r.error == "MANIFEST_INVALID", r.body
    assert "lowre" in r.json["errors"][0]["message"]
    r = await reg.request("GET", "/v2/lab/vm/manifests/v2")
    assert r.code == 404


@pytest_twisted.ensureDeferred
async def test_tls_handshake_on_plain_listener_is_turned_away(open_store: RunningStore) -> None:
    """Clients told the store is insecure try TLS first: answer that at once, by closing."""
    from twisted.internet import reactor

    from tests.util.raw import raw_connect

    proto = await raw_connect(open_store.port)
    proto.transport.write(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 32)
    data = await proto.closed.addTimeout(2, reactor)
    assert data == b""
