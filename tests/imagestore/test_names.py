"""Names, tags, digests, patterns and ranges (pure logic), and path traversal end to end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted

from tests.imagestore.support import RunningStore, digest_of, parse_response
from tests.util.raw import raw_request
from treadmill.images.oci import is_repository
from treadmill.imagestore.auth import anonymous_patterns, glob_regex
from treadmill.imagestore.errors import OCIError
from treadmill.imagestore.manifests import references
from treadmill.imagestore.names import check_digest, check_reference, is_tag

GOOD_NAMES = ["a", "lab/fw", "a.b_c__d-e---f/g0", "x" * 255, "0/1/2/3"]
BAD_NAMES = ["", "A", "..", "a/..", "../a", "a/../b", ".a", "a.", "a//b", "/a", "a/", "a b",
             "a\x00b", "a___b", "a..b", "_a", "a/_manifests", "x" * 256, "a%2fb", "é"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names(name: str) -> None:
    assert is_repository(name)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names(name: str) -> None:
    assert not is_repository(name)


@pytest.mark.parametrize("tag,good", [
    ("latest", True), ("v1.2.3-rc_1", True), ("_x", True), ("A" * 128, True),
    ("A" * 129, False), (".hidden", False), ("..", False), ("-x", False), ("a/b", False),
    ("a\x00", False), ("", False), ("a b", False)])
def test_tags(tag: str, good: bool) -> None:
    assert is_tag(tag) is good


@pytest.mark.parametrize("digest,good", [
    ("sha256:" + "a" * 64, True), ("sha256:" + "A" * 64, False), ("sha256:" + "a" * 63, False),
    ("sha512:" + "a" * 128, False), ("sha256:../../../etc/passwd", False), ("", False),
    ("sha256:" + "a" * 64 + "\x00", False), ("md5:abc", False)])
def test_digests(digest: str, good: bool) -> None:
    if good:
        assert check_digest(digest) == digest
    else:
        with pytest.raises(OCIError) as e:
            check_digest(digest)
        assert e.value.code == "DIGEST_INVALID"


def test_references() -> None:
    assert check_reference("v1") == ("v1", None)
    assert check_reference("sha256:" + "0" * 64) == (None, "sha256:" + "0" * 64)
    for bad in ("..", "a/b", "sha256:zz", ""):
        with pytest.raises(OCIError):
            check_reference(bad)


@pytest.mark.parametrize("pattern,name,matches", [
    ("demo/*", "demo/fw", True), ("demo/*", "demo/a/b", False), ("demo/*", "demo", False),
    ("public/**", "public/a/b/c", True), ("public/**", "publicx/a", False),
    ("**", "anything/at/all", True), ("exact", "exact", True), ("exact", "exact2", False),
    ("v?", "v1", True), ("a.b", "aXb", False)])
def test_globs(pattern: str, name: str, matches: bool) -> None:
    assert (glob_regex(pattern).fullmatch(name) is not None) is matches


def test_anonymous_setting() -> None:
    assert anonymous_patterns(True) == ["**"]
    assert anonymous_patterns(False) == []
    assert anonymous_patterns("true") == ["**"]
    assert anonymous_patterns("demo/*, public/**") == ["demo/*", "public/**"]
    assert anonymous_patterns(["demo/*"]) == ["demo/*"]
    for bad in (3, ["ok", 4], ["../x y"]):
        with pytest.raises(ValueError):
            anonymous_patterns(bad)


def test_references_are_found_anywhere() -> None:
    a, b, c = (digest_of(x) for x in (b"a", b"b", b"c"))
    body = (f'{{"config": {{"digest": "{a}"}}, "layers": [{{"digest": "{b}"}}], '
            f'"annotations": {{"x": {{"digest": "{c}"}}}}, "subject": {{"digest": "bad"}}}}')
    assert sorted(references(body.encode())) == sorted([a, b, c])
    assert list(references(b"not json")) == []


# -- traversal, end to end ------------------------------------------------------------

LAYER = b"the one blob"
TRAVERSALS = [
    "GET /v2/../../etc/passwd/manifests/latest",
    "GET /v2/%2e%2e/%2e%2e/etc/manifests/latest",
    "GET /v2/%2E%2E%2F%2E%2E%2Fetc/tags/list",
    "GET /v2//etc/passwd/tags/list",
    "GET /v2/%2fetc%2fpasswd/tags/list",
    "GET /v2/lab%00/fw/tags/list",
    "GET /v2/lab/fw/manifests/..",
    "GET /v2/lab/fw/manifests/%2e%2e",
    "GET /v2/lab/fw/manifests/..%2f..%2f..%2fstate",
    "GET /v2/lab/fw/manifests/.hidden",
    "GET /v2/lab/fw/manifests/v1%00",
    "GET /v2/lab/fw/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd",
    "GET /v2/lab/fw/blobs/sha256:" + "0" * 62 + "%2e%2e",
    "GET /v2/lab/fw/blobs/..%2f..%2fblobs",
    "GET /v2/lab/fw/blobs/uploads/..%2f..%2fblobs",
    "PATCH /v2/lab/fw/blobs/uploads/..%2f..%2frepositories",
    "PUT /v2/lab/fw/blobs/uploads/%2e%2e?digest=" + digest_of(LAYER),
    "POST /v2/..%2f..%2ftmp/blobs/uploads/?digest=" + digest_of(LAYER),
    "POST /v2/%2ftmp%2fx/blobs/uploads/",
    "PUT /v2/lab/fw/manifests/..%2fowned",
    "PUT /v2/lab/fw/manifests/%2e%2e",
    "PUT /v2/../owned/manifests/v1",
    "DELETE /v2/lab/fw/manifests/..",
    "DELETE /v2/../lab/fw/blobs/sha256:" + "0" * 64,
    "GET /v2/lab/fw/blobs/uploads/%00",
]


def snapshot(root: Path) -> set[str]:
    found = set()
    for directory, dirs, files in os.walk(root):
        for entry in dirs + files:
            found.add(os.path.relpath(os.path.join(directory, entry), root))
    return found


@pytest_twisted.ensureDeferred
async def test_path_traversal_is_refused(open_store: RunningStore, tmp_path: Path) -> None:
    await open_store.registry.push_image("lab/fw", "v1", [LAYER])
    (tmp_path / "outside").write_text("secret")
    before = snapshot(tmp_path)
    for line in TRAVERSALS:
        body = LAYER if line.startswith(("PUT", "POST", "PATCH")) else b""
        request = (f"{line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        status, raw = await raw_request(open_store.port, request)
        assert 400 <= status < 500, (line, raw[:300])
        assert b"secret" not in raw
        assert parse_response(raw).error is not None, (line, raw)
    # A mount from an invalid source falls back to an ordinary upload session.
    status, raw = await raw_request(
        open_store.port, b"POST /v2/lab/fw/blobs/uploads/?mount=sha256:..%2f..&from=..%2f..%2fetc"
        b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert status == 202
    session = parse_response(raw).header("docker-upload-uuid")
    after = snapshot(tmp_path)
    created = {p for p in after - before if not p.startswith("open-store/tmp")}
    assert created == {f"open-store/uploads/{session}", f"open-store/uploads/{session}/data",
                       f"open-store/uploads/{session}/state.json"}, created
    assert (tmp_path / "outside").read_text() == "secret"


@pytest_twisted.ensureDeferred
async def test_absolute_request_targets_are_harmless(open_store: RunningStore) -> None:
    for line in ("GET http://x/v2/../../etc/passwd/tags/list", "GET /etc/passwd",
                 "GET ../../etc/passwd", "GET /v2/lab/fw/tags/list/../../../../etc"):
        status, raw = await raw_request(
            open_store.port, f"{line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert status in (400, 404), (line, raw[:200])
        assert b"root:" not in raw
