"""A tiny OCI Distribution server on 127.0.0.1 for the image client tests.

Just enough of the API for ``treadmill.images.oci``: upload sessions
(POST, PATCH with ``Content-Range``, status GET, PUT ``?digest=``), blob
HEAD/GET (with ``Range``), manifest PUT/GET, and the Bearer token flow (a 401
with ``WWW-Authenticate`` and a token endpoint taking HTTP Basic). Faults are
armed by the tests: drop a connection part-way through an upload or a
download (once), serve corrupt bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from treadmill.images import format as fmt

USER = "alice"
SECRET = "tmt_alice_secret"
SERVICE = "fake-store"

_UPLOADS = re.compile(r"/v2/(?P<name>.+)/blobs/uploads/(?P<id>[^/]*)")
_BLOB = re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)")
_MANIFEST = re.compile(r"/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeRegistry:
    """State, faults and a request log; ``url`` is set once listening."""

    url: str = ""
    realm: str = ""
    require_auth: bool = False
    validate: bool = True
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    uploads: dict[str, tuple[str, bytearray]] = field(default_factory=dict)
    tokens: dict[str, set[str]] = field(default_factory=dict)  # token -> repositories
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    # Faults, each used once: keep N bytes of the next PATCH body and drop the
    # connection without answering; drop the connection after N bytes of any
    # request body are received; send N bytes of the next blob GET and drop.
    drop_patch_after: int | None = None
    abort_body_after: int | None = None
    drop_get_after: int | None = None
    corrupt: set[str] = field(default_factory=set)
    no_range: bool = False  # answer Range GETs with the whole blob
    fail_status: list[int] = field(default_factory=list)  # next answers to PATCH, once each
    unavailable: int = 0  # answer the next N /v2/ requests 503 (-1: all of them)
    hold: int = 0  # answer the next N /v2/ requests never (-1: none); they wait in held
    stall_body_after: int | None = None  # stop reading a request body after N bytes (held)
    held: list[Request] = field(default_factory=list)
    # A hostile store's challenge: another service, realm or scope than its own.
    challenge_service: str = SERVICE
    challenge_realm: str = ""
    challenge_scope: str | None = None
    redirect_blobs: str = ""  # answer blob GETs with a 307 to this base URL
    authorizations: list[str] = field(default_factory=list)  # Authorization headers seen

    # -- helpers

    def log(self, request: Request) -> None:
        self.requests.append((request.method.decode(), request.uri.decode()))
        self.authorizations.append((request.getHeader(b"authorization") or b"").decode())

    def count(self, method: str, fragment: str = "") -> int:
        return sum(1 for m, uri in self.requests if m == method and fragment in uri)

    def error(self, request: Request, status: int, code: str, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"errors": [{"code": code, "message": message}]}).encode()

    def issue_token(self, scopes: list[str]) -> dict[str, Any]:
        token = "tok_" + uuid.uuid4().hex
        repos = set()
        for scope in scopes:
            for item in scope.split():
                kind, _, rest = item.partition(":")
                name, _, _actions = rest.rpartition(":")
                if kind == "repository":
                    repos.add(name)
        self.tokens[token] = repos
        return {"token": token, "access_token": token, "expires_in": 300,
                "issued_at": "2026-11-23T17:00:00Z"}

    def token_endpoint(self, request: Request) -> bytes:
        """``GET realm?service=&scope=`` with Basic ``alice:tmt_alice_secret``."""
        header = (request.getHeader(b"authorization") or b"").decode()
        scopes = [s.decode() for s in request.args.get(b"scope", [])]
        service = request.args.get(b"service", [b""])[0].decode()
        self.token_requests.append({"authorization": header, "scopes": scopes,
                                    "service": service})
        request.setHeader(b"content-type", b"application/json")
        if not header.startswith("Basic "):
            request.setResponseCode(401)
            return b'{"error": {"code": "unauthenticated", "message": "no credentials"}}'
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        if (user, password) != (USER, SECRET):
            request.setResponseCode(401)
            return b'{"error": {"code": "unauthenticated", "message": "wrong credentials"}}'
        return json.dumps(self.issue_token(scopes)).encode()

    def authorized(self, request: Request, name: str) -> bool:
        if not self.require_auth:
            return True
        header = (request.getHeader(b"authorization") or b"").decode()
        return header.startswith("Bearer ") and name in self.tokens.get(header[7:], set())

    def challenge(self, request: Request, name: str) -> bytes:
        request.setHeader(
            b"www-authenticate",
            f'Bearer realm="{self.challenge_realm or self.realm}",'
            f'service="{self.challenge_service}",'
            f'scope="{self.challenge_scope or f"repository:{name}:pull,push"}"'.encode(),
        )
        return self.error(request, 401, "UNAUTHORIZED", "authentication required")

    # -- dispatch

    def render(self, request: Request) -> bytes | int:
        self.log(request)
        path = request.path.decode()
        method = request.method.decode()
        if path == "/token":
            return self.token_endpoint(request)
        if self.hold:
            self.hold -= self.hold > 0
            self.held.append(request)
            return NOT_DONE_YET
        if self.unavailable:
            self.unavailable -= self.unavailable > 0
            return self.error(request, 503, "UNAVAILABLE", "the store is starting")
        if path == "/v2/":
            return b"{}"
        for pattern, handler in ((_UPLOADS, self.upload), (_BLOB, self.blob),
                                 (_MANIFEST, self.manifest)):
            m = pattern.fullmatch(path)
            if m:
                if not self.authorized(request, m.group("name")):
                    return self.challenge(request, m.group("name"))
                return handler(request, method, **m.groupdict())
        return self.error(request, 404, "NAME_UNKNOWN", f"no route for {path}")

    def _status_headers(self, request: Request, name: str, upload_id: str) -> None:
        size = len(self.uploads[upload_id][1])
        request.setHeader(b"location", f"/v2/{name}/blobs/uploads/{upload_id}".encode())
        request.setHeader(b"range", f"0-{max(size - 1, 0)}".encode())
        request.setHeader(b"docker-upload-uuid", upload_id.encode())

    def upload(self, request: Request, method: str, name: str, id: str) -> bytes | int:
        if method == "POST" and not id:
            upload_id = uuid.uuid4().hex
            self.uploads[upload_id] = (name, bytearray())
            self._status_headers(request, name, upload_id)
            request.setResponseCode(202)
            return b""
        if id not in self.uploads or self.uploads[id][0] != name:
            return self.error(request, 404, "BLOB_UPLOAD_UNKNOWN", "no such upload")
        data = self.uploads[id][1]
        if method == "GET":
            self._status_headers(request, name, id)
            request.setResponseCode(204)
            return b""
        body = request.content.read()
        if method == "PATCH":
            if self.fail_status:
                return self.error(request, self.fail_status.pop(0), "UNAVAILABLE", "try again")
            content_range = (request.getHeader(b"content-range") or b"").decode()
            if content_range:
                m = re.fullmatch(r"(\d+)-(\d+)", content_range)
                if not m or int(m.group(1)) != len(data):
                    self._status_headers(request, name, id)
                    return self.error(request, 416, "BLOB_UPLOAD_INVALID",
                                      f"range {content_range} does not follow {len(data)}")
                if int(m.group(2)) - int(m.group(1)) + 1 != len(body):
                    return self.error(request, 400, "SIZE_INVALID", "range and body differ")
            if self.drop_patch_after is not None:
                data.extend(body[: self.drop_patch_after])
                self.drop_patch_after = None
                request.transport.abortConnection()
                return NOT_DONE_YET
            data.extend(body)
            self._status_headers(request, name, id)
            request.setResponseCode(202)
            return b""
        if method == "PUT":
            data.extend(body)
            digest = request.args.get(b"digest", [b""])[0].decode()
            if digest != digest_of(bytes(data)):
                return self.error(request, 400, "DIGEST_INVALID", "digest does not match")
            self.blobs[digest] = bytes(data)
            del self.uploads[id]
            request.setResponseCode(201)
            request.setHeader(b"location", f"/v2/{name}/blobs/{digest}".encode())
            request.setHeader(b"docker-content-digest", digest.encode())
            return b""
        if method == "DELETE":
            del self.uploads[id]
            request.setResponseCode(204)
            return b""
        return self.error(request, 405, "UNSUPPORTED", method)

    def blob(self, request: Request, method: str, name: str, digest: str) -> bytes | int:
        if digest not in self.blobs:
            return self.error(request, 404, "BLOB_UNKNOWN", f"no blob {digest}")
        data = self.blobs[digest]
        if digest in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:] if data else b"x"
        request.setHeader(b"docker-content-digest", digest.encode())
        request.setHeader(b"content-type", b"application/octet-stream")
        if method == "HEAD":
            request.setHeader(b"content-length", str(len(data)).encode())
            return b""
        if method != "GET":
            return self.error(request, 405, "UNSUPPORTED", method)
        if self.redirect_blobs:
            request.setResponseCode(307)
            request.setHeader(b"location", f"{self.redirect_blobs}/v2/{name}/blobs/{digest}"
                              .encode())
            return b""
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", (request.getHeader(b"range") or b"").decode())
        if m and not self.no_range:
            start = int(m.group(1))
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {start}-{len(data) - 1}/{len(data)}"
                              .encode())
        if self.drop_get_after is not None:
            cut = self.drop_get_after
            self.drop_get_after = None
            request.setHeader(b"content-length", str(len(data) - start).encode())
            request.write(data[start : start + cut])
            reactor.callLater(0.01, request.transport.abortConnection)
            return NOT_DONE_YET
        return data[start:]

    def manifest(self, request: Request, method: str, name: str, ref: str) -> bytes:
        if method == "PUT":
            body = request.content.read()
            media_type = (request.getHeader(b"content-type") or b"").decode()
            if self.validate:
                try:
                    fmt.validate_manifest(fmt.load_manifest(body), media_type,
                                          lambda d: d in self.blobs)
                except fmt.ManifestError as e:
                    request.setResponseCode(400)
                    return json.dumps(e.to_json()).encode()
            digest = digest_of(body)
            self.manifests[(name, digest)] = (body, media_type)
            if not ref.startswith("sha256:"):
                self.manifests[(name, ref)] = (body, media_type)
            request.setResponseCode(201)
            request.setHeader(b"location", f"/v2/{name}/manifests/{digest}".encode())
            request.setHeader(b"docker-content-digest", digest.encode())
            return b""
        found = self.manifests.get((name, ref))
        if found is None:
            return self.error(request, 404, "MANIFEST_UNKNOWN", f"no manifest {ref}")
        body, media_type = found
        if ref in self.corrupt:
            body = body.replace(b"{", b"{ ", 1)
        request.setHeader(b"content-type", media_type.encode())
        request.setHeader(b"docker-content-digest", digest_of(body).encode())
        return body


class _Resource(Resource):
    isLeaf = True

    def __init__(self, fake: FakeRegistry) -> None:
        super().__init__()
        self.fake = fake

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        return self.fake.render(request)


class _Request(Request):
    """Drops the connection part-way through a request body when armed."""

    _seen = 0

    def handleContentChunk(self, data: bytes) -> None:
        fake: FakeRegistry = self.channel.site.fake
        if fake.stall_body_after is not None and self not in fake.held:
            self._seen += len(data)
            if self._seen > fake.stall_body_after:
                fake.held.append(self)
                self.channel.transport.pauseProducing()
        if fake.abort_body_after is not None:
            self._seen += len(data)
            if self._seen > fake.abort_body_after:
                fake.abort_body_after = None
                self.channel.transport.abortConnection()
                return
        super().handleContentChunk(data)


def listen(fake: FakeRegistry | None = None) -> tuple[FakeRegistry, Any]:
    """Serve ``fake`` on a loopback port; return it and the listening port."""
    fake = fake or FakeRegistry()
    site = Site(_Resource(fake), requestFactory=_Request)
    site.fake = fake  # type: ignore[attr-defined]
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    fake.url = f"http://127.0.0.1:{port.getHost().port}"
    fake.realm = fake.realm or fake.url + "/token"
    return fake, port
