"""The image store's HTTP API: the OCI Distribution subset that registry clients use.

State is injected: :class:`RegistryAPI` gets the storage, the upload
sessions, the collector, the authorizer and, in cache mode, a
:class:`~treadmill.imagestore.modes.CacheMode` and the ``/cache`` routes
(:class:`~treadmill.imagestore.cache_api.CacheRoutes`);
:func:`~treadmill.imagestore.site.registry_site` serves it. Every handler
validates the names in its path before building a file name from them
(:mod:`~treadmill.imagestore.names`), then authorises, then acts. Errors are
answered once, in the OCI shape, by the ``handle_errors`` methods.

Upload bodies (``POST``/``PATCH``/``PUT`` on ``/v2/<name>/blobs/uploads/``)
never sit in memory or in a temporary file: the site's request
(:class:`~treadmill.imagestore.site.RegistryRequest`) asks
:meth:`RegistryAPI.body_sink` when their headers arrive; it recognises them
(with the same URL map as the routes), authorises the request, finds or
creates its session and returns the :class:`~treadmill.imagestore.uploads.BodySink`
that writes the body to disk as it arrives. The route's handler then runs
once the body is on disk, and answers.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote_to_bytes

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from treadmill.common.http import ApiError, query_arg, respond
from treadmill.common.ranges import Unsatisfiable, parse_range
from treadmill.images.format import is_digest
from treadmill.images.oci import is_repository
from treadmill.imagestore import manifests
from treadmill.imagestore.auth import Authorizer, scope
from treadmill.imagestore.errors import OCIError, error_body
from treadmill.imagestore.gc import Collector, SharedExclusiveLock, shield, under_lock
from treadmill.imagestore.modes import PlainStore, StoreMode
from treadmill.imagestore.names import (
    check_digest,
    check_name,
    check_reference,
    check_upload_id,
)
from treadmill.imagestore.sending import BlobSender
from treadmill.imagestore.storage import Storage
from treadmill.imagestore.uploads import BodySink, Upload, Uploads

if TYPE_CHECKING:
    from treadmill.imagestore.cache_api import CacheRoutes

MAX_PAGE = 10_000
_UPLOAD_ENDPOINTS = frozenset({"upload_start", "upload_patch", "upload_put"})
_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?")


def _error(request: IRequest, status: int, body: bytes,
           headers: dict[str, str] | None = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    _set_headers(request, headers or {})
    request.setHeader(b"content-length", str(len(body)).encode())
    return body


def _set_headers(request: IRequest, headers: dict[str, str]) -> None:
    for key, value in headers.items():
        request.setHeader(key.encode("ascii"), value.encode("utf-8"))


def _empty(request: IRequest, status: int, headers: dict[str, str]) -> bytes:
    request.setResponseCode(status)
    _set_headers(request, headers)
    request.setHeader(b"content-length", b"0")
    return b""


def _arg(request: IRequest, name: str) -> str | None:
    # An argument that is not UTF-8 counts as absent here (the switchboard answers 400).
    try:
        return query_arg(request, name)
    except ApiError:
        return None


def _page(request: IRequest) -> tuple[int | None, str | None]:
    raw = _arg(request, "n")
    n = None
    if raw is not None and raw != "":
        if not raw.isdigit():
            raise OCIError("UNSUPPORTED", "n must be a non-negative integer", status=400)
        n = min(int(raw), MAX_PAGE)
    return n, _arg(request, "last") or None


def _paginate(items: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    if last is not None:
        items = [item for item in items if item > last]
    if n is None:
        return items, False
    return items[:n], len(items) > n


@dataclass(eq=False)
class RegistryAPI:
    """The routes of one image store."""

    app = Klein()
    # "//" must not be merged (and redirected) into something else.
    app.url_map.merge_slashes = False
    log = Logger()

    reactor: Any
    storage: Storage
    uploads: Uploads
    collector: Collector
    auth: Authorizer
    lock: SharedExclusiveLock
    pool: Any
    _: KW_ONLY
    max_manifest: int = 4 * 1024 * 1024
    mode: StoreMode = field(default_factory=PlainStore)
    """Where the OCI routes differ in a cache (docs/imagestore.md, "The image cache"):
    pull-through on misses, last-use tracking, pins."""
    cache_routes: CacheRoutes | None = None
    """The ``/cache`` routes, in a cache."""
    bytes_sent: int = field(default=0, init=False)

    def resource(self) -> Resource:
        return self.app.resource()

    def _thread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    # -- errors -----------------------------------------------------------------

    @app.handle_errors(OCIError)
    def _oci_error(self, request: IRequest, failure: Failure) -> bytes:
        error: OCIError = failure.value
        return _error(request, error.status, error.body(), error.headers)

    @app.handle_errors(RequestRedirect)
    def _redirect(self, request: IRequest, failure: Failure) -> bytes:
        redirect: RequestRedirect = failure.value
        request.setResponseCode(redirect.code)
        request.setHeader(b"location", redirect.new_url.encode("utf-8"))
        return b""

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return _error(request, 404, error_body("NAME_UNKNOWN", "no such repository or endpoint"))

    @app.handle_errors(MethodNotAllowed)
    def _not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = failure.value.valid_methods or []
        return _error(request, 405, error_body("UNSUPPORTED", "method not allowed here"),
                      {"Allow": ", ".join(allowed)} if allowed else None)

    @app.handle_errors(HTTPException)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        return _error(request, failure.value.code or 400,
                      error_body("UNSUPPORTED", failure.value.description or "bad request"))

    @app.handle_errors(Exception)
    def _internal(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure("Request failed: {method} {path}", failure,
                         method=request.method.decode("ascii", "replace"),
                         path=request.path.decode("ascii", "replace"))
        return _error(request, 500, error_body("UNKNOWN", "internal error"))

    # -- helpers -------------------------------------------------------------------

    def _blob_created(self, request: IRequest, name: str, digest: str) -> bytes:
        return _empty(request, 201, {"Location": f"/v2/{name}/blobs/{digest}",
                                          "Docker-Content-Digest": digest})

    def _upload_accepted(self, request: IRequest, name: str, upload: Upload) -> bytes:
        return _empty(request, 202, {
            "Location": f"/v2/{name}/blobs/uploads/{upload.id}",
            "Range": upload.range_header,
            "Docker-Upload-UUID": upload.id,
        })

    def _push_scopes(self, name: str) -> list[str]:
        return [scope("repository", name, ["pull", "push"])]

    # -- base, health, catalog ---------------------------------------------------------

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"ok\n"

    @app.route("/v2/", methods=["GET"], strict_slashes=False)
    def base(self, request: IRequest) -> bytes:
        self.auth.authenticate(request)
        return respond(request, {})

    @app.route("/v2/_catalog", methods=["GET"])
    async def catalog(self, request: IRequest) -> bytes:
        self.auth.require(request, "registry", "catalog", "*")
        n, last = _page(request)
        names, more = _paginate(await self._thread(self.storage.repositories), n, last)
        if more and names:
            request.setHeader(b"link", f'</v2/_catalog?n={n}&last={quote(names[-1])}>; '
                                       f'rel="next"'.encode())
        return respond(request, {"repositories": names})

    @app.route("/admin/gc", methods=["POST"])
    async def admin_gc(self, request: IRequest) -> bytes:
        self.auth.require(request, "registry", "gc", "*")
        return respond(request, await self.collector.collect())

    # -- the image cache -------------------------------------------------------------

    def _routes(self) -> CacheRoutes:
        if self.cache_routes is None:
            raise OCIError("UNSUPPORTED", "this image store is not a cache (cache.enabled)",
                           status=404)
        return self.cache_routes

    @app.route("/admin/evict", methods=["POST"])
    async def admin_evict(self, request: IRequest) -> bytes:
        return await self._routes().evict(request)

    @app.route("/cache/leases", methods=["POST"])
    async def lease_post(self, request: IRequest) -> bytes:
        return await self._routes().post_lease(request)

    @app.route("/cache/leases", methods=["GET"])
    def lease_list(self, request: IRequest) -> bytes:
        return self._routes().list_leases(request)

    @app.route("/cache/leases/<lease_id>", methods=["GET"])
    async def lease_get(self, request: IRequest, lease_id: str) -> bytes:
        return await self._routes().get_lease(request, lease_id)

    @app.route("/cache/leases/<lease_id>", methods=["DELETE"])
    async def lease_delete(self, request: IRequest, lease_id: str) -> bytes:
        return await self._routes().delete_lease(request, lease_id)

    @app.route("/cache/replicate", methods=["POST"])
    def replicate_post(self, request: IRequest) -> bytes:
        return self._routes().post_replicate(request)

    @app.route("/cache/replicate/<job_id>", methods=["GET"])
    async def replicate_get(self, request: IRequest, job_id: str) -> bytes:
        return await self._routes().get_replicate(request, job_id)

    # -- tags ----------------------------------------------------------------------------

    @app.route("/v2/<path:name>/tags/list", methods=["GET"])
    def tags_list(self, request: IRequest, name: str) -> bytes:
        name = check_name(name)
        self.auth.require(request, "repository", name, "pull")
        tags = self.storage.tags(name)
        if tags is None:
            raise OCIError("NAME_UNKNOWN", "no such repository")
        n, last = _page(request)
        tags, more = _paginate(tags, n, last)
        if more and tags:
            request.setHeader(b"link", f'</v2/{name}/tags/list?n={n}&last={quote(tags[-1])}>; '
                                       f'rel="next"'.encode())
        return respond(request, {"name": name, "tags": tags})

    # -- manifests -----------------------------------------------------------------------

    def _resolve(self, name: str, reference: str) -> tuple[str, str]:
        """The digest and media type of a manifest reference, or 404."""
        tag, digest = check_reference(reference)
        if tag is not None:
            digest = self.storage.read_tag(name, tag)
        media_type = self.storage.manifest_media_type(name, digest) if digest else None
        if digest is None or media_type is None:
            if not self.storage.repository_exists(name):
                raise OCIError("NAME_UNKNOWN", "no such repository")
            raise OCIError("MANIFEST_UNKNOWN", "no such manifest")
        return digest, media_type

    @app.route("/v2/<path:name>/manifests/<reference>", methods=["GET"])
    async def manifest_get(self, request: IRequest, name: str, reference: str) -> bytes:
        name = check_name(name)
        self.auth.require(request, "repository", name, "pull")
        await self.mode.before_manifest(name, reference)
        digest, media_type = self._resolve(name, reference)
        with self.mode.serving(digest):
            self.mode.used(digest)
            body = await self._thread(self.storage.read_blob, digest, 64 * 1024 * 1024)
        if body is None:
            raise OCIError("MANIFEST_UNKNOWN", "no such manifest")
        request.setHeader(b"content-type", media_type.encode())
        request.setHeader(b"docker-content-digest", digest.encode())
        request.setHeader(b"etag", f'"{digest}"'.encode())
        request.setHeader(b"content-length", str(len(body)).encode())
        return b"" if request.method == b"HEAD" else body

    def _store_manifest(self, name: str, tag: str | None, body: bytes,
                        manifest: dict[str, Any], media_type: str) -> str:
        def size_if(linked: bool, digest: str) -> int | None:
            info = self.storage.blob_info(digest) if linked else None
            return info.size if info is not None else None

        def blob_size(digest: str) -> int | None:
            return size_if(self.storage.blob_linked(name, digest), digest)

        def manifest_size(digest: str) -> int | None:
            return size_if(self.storage.manifest_media_type(name, digest) is not None, digest)

        manifests.check(manifest, media_type, blob_size, manifest_size)
        manifests.check_format(manifest, media_type,
                               lambda d: is_digest(d) and blob_size(d) is not None)
        digest, _new = self.storage.put_blob_bytes(body)
        self.storage.link_manifest(name, digest, media_type)
        if tag is not None:
            self.storage.write_tag(name, tag, digest)
        return digest

    @app.route("/v2/<path:name>/manifests/<reference>", methods=["PUT"])
    async def manifest_put(self, request: IRequest, name: str, reference: str) -> bytes:
        name = check_name(name)
        self.auth.require(request, "repository", name, "push", self._push_scopes(name))
        tag, digest = check_reference(reference)
        if getattr(request, "too_large", False):
            raise OCIError("SIZE_INVALID", f"manifest exceeds {self.max_manifest} bytes",
                           status=413)
        body = request.content.read() if request.content is not None else b""
        if len(body) > self.max_manifest:
            raise OCIError("SIZE_INVALID", f"manifest exceeds {self.max_manifest} bytes",
                           status=413)
        manifest = manifests.parse(body)
        media_type = manifests.media_type_of(manifest, request.getHeader("content-type"))
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if digest is not None and digest != actual:
            raise OCIError("DIGEST_INVALID", "the manifest does not match the digest")

        ledger = self.uploads.ledger
        pending = f"manifest:{uuid.uuid4()}"
        if ledger is not None:
            # Held until the manifest is linked (and counted), or refused.
            ledger.reserve_upload(pending, name, len(body), "a manifest", actual)

        def store() -> Deferred[str]:
            d = self._thread(self._store_manifest, name, tag, body, manifest, media_type)
            if ledger is not None:
                d.addBoth(lambda result: (ledger.drop_upload(pending), result)[1])

            def referenced(digest: str) -> str:
                self.collector.note_referenced(
                    [digest, *manifests.referenced_digests(manifest)])
                self.mode.committed(digest, len(body))
                return digest

            return d.addCallback(referenced)

        try:
            stored = await under_lock(self.lock, store)
        finally:
            if ledger is not None:
                ledger.drop_upload(pending)
        return _empty(request, 201, {"Location": f"/v2/{name}/manifests/{stored}",
                                          "Docker-Content-Digest": stored})

    @app.route("/v2/<path:name>/manifests/<reference>", methods=["DELETE"])
    async def manifest_delete(self, request: IRequest, name: str, reference: str) -> bytes:
        name = check_name(name)
        self.auth.require(request, "repository", name, "delete")
        tag, digest = check_reference(reference)
        if tag is not None:
            if not await self._thread(self.storage.delete_tag, name, tag):
                self._resolve(name, reference)  # raises the right 404
        else:
            self._resolve(name, reference)
            await self._thread(self.storage.unlink_manifest, name, digest)
        return _empty(request, 202, {})

    # -- blobs ---------------------------------------------------------------------------

    @app.route("/v2/<path:name>/blobs/<digest>", methods=["GET"])
    async def blob_get(self, request: IRequest, name: str, digest: str) -> bytes:
        name = check_name(name)
        self.auth.require(request, "repository", name, "pull")
        digest = check_digest(digest)
        # A cache pins it while it is fetched and served: eviction leaves it alone.
        with self.mode.serving(digest):
            return await self._send_blob(request, name, digest)

    async def _open_blob(self, name: str, digest: str, head: bool) -> tuple[Any, Any]:
        """The blob's info and an open file (None for HEAD), or (None, None)."""
        # Under the shared lock, so that a blob a client was told exists is
        # protected from a garbage collection sweep (see gc.py).
        await self.lock.acquire()
        try:
            info = self.storage.blob_info(digest) if self.storage.blob_linked(name, digest) \
                else None
            if info is None:
                return None, None
            file = None if head else open(info.path, "rb")
            self.collector.note_seen(digest)
            return info, file
        finally:
            self.lock.release()

    async def _send_blob(self, request: IRequest, name: str, digest: str) -> bytes:
        head = request.method == b"HEAD"
        info, file = await self._open_blob(name, digest, head)
        if info is None:
            if await self.mode.fetch_blob(name, digest):
                info, file = await self._open_blob(name, digest, head)
        else:
            self.mode.found(digest)
        if info is None:
            raise OCIError("BLOB_UNKNOWN", "no such blob in this repository")
        self.mode.used(digest)
        try:
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"docker-content-digest", digest.encode())
            request.setHeader(b"etag", f'"{digest}"'.encode())
            request.setHeader(b"accept-ranges", b"bytes")
            try:
                span = parse_range(request.getHeader("range"), info.size)
            except Unsatisfiable:
                raise OCIError("RANGE_INVALID", "range not satisfiable",
                               headers={"Content-Range": f"bytes */{info.size}"}) from None
            if span is None:
                start, length = 0, info.size
            else:
                start, length = span[0], span[1] - span[0] + 1
                request.setResponseCode(206)
                request.setHeader(b"content-range",
                                  f"bytes {span[0]}-{span[1]}/{info.size}".encode())
            request.setHeader(b"content-length", str(length).encode())
            if file is None or length == 0:
                return b""
            file.seek(start)
            sender = BlobSender(file, length)
            try:
                await sender.start(request)
            finally:
                self.bytes_sent += sender.sent
            return b""
        finally:
            if file is not None:
                file.close()

    @app.route("/v2/<path:name>/blobs/<digest>", methods=["DELETE"])
    async def blob_delete(self, request: IRequest, name: str, digest: str) -> bytes:
        name = check_name(name)
        self.auth.require(request, "repository", name, "delete")
        digest = check_digest(digest)
        if not await self._thread(self.storage.unlink_blob, name, digest):
            raise OCIError("BLOB_UNKNOWN", "no such blob in this repository")
        return _empty(request, 202, {})

    # -- uploads -------------------------------------------------------------------------

    def _match(self, method: str, raw_path: bytes) -> tuple[str, dict[str, Any]] | None:
        """The route of a request line, exactly as the resource will route it."""
        path = raw_path.split(b"?", 1)[0]
        # twisted.web splits and unquotes the path into segments; Klein joins them.
        segments = [unquote_to_bytes(s) for s in path[1:].split(b"/")]
        try:
            path_info = "/" + b"/".join(segments).decode("utf-8")
        except UnicodeDecodeError:
            return None
        adapter = self.app.url_map.bind("localhost", path_info=path_info,
                                        default_method=method)
        try:
            rule, args = adapter.match(method=method, return_rule=True)
        except HTTPException:
            return None
        return rule.endpoint, args

    def body_sink(self, request: IRequest, command: bytes, raw_path: bytes) -> BodySink | None:
        """A sink for an upload request's body, or None for any other request.

        Called when the request's headers have arrived, before its body.
        """
        method = command.decode("ascii", "replace").upper()
        if method not in ("POST", "PATCH", "PUT"):
            return None
        matched = self._match(method, raw_path)
        if matched is None or matched[0] not in _UPLOAD_ENDPOINTS:
            return None
        endpoint, args = matched
        query = raw_path.split(b"?", 1)[1] if b"?" in raw_path else b""
        params = {k: v[-1] for k, v in
                  parse_qs(query.decode("utf-8", "replace"), keep_blank_values=True).items()}
        transport = getattr(request.channel, "transport", None)
        sink = BodySink(IPushProducer(transport, None))
        Deferred.fromCoroutine(self._prepare(sink, request, endpoint, args, params)) \
            .addErrback(sink.fail)
        return sink

    async def _prepare(self, sink: BodySink, request: IRequest, endpoint: str,
                       args: dict[str, Any], params: dict[str, str]) -> None:
        name = check_name(args["name"])
        mount, source = params.get("mount"), params.get("from")
        mounting = (endpoint == "upload_start" and mount is not None and source is not None
                    and is_digest(mount) and is_repository(source))
        scopes = self._push_scopes(name)
        if mounting:
            # As the reference registry: the challenge names the source too, so that
            # the client fetches a token that allows the mount.
            scopes.append(scope("repository", str(source), ["pull"]))
        claims = self.auth.require(request, "repository", name, "push", scopes)
        subject = claims.subject if claims is not None else None
        ledger = self.uploads.ledger
        length = request.getHeader("content-length")
        size = int(length) if length is not None and length.isdigit() else 0
        if endpoint == "upload_start":
            if mounting and self.auth.allows(request, "repository", str(source), "pull") \
                    and self.storage.blob_linked(str(source), str(mount)):
                sink.plan = {"kind": "mount", "digest": mount, "from": source,
                             "subject": subject}
                sink.discard()
                return
            digest = params.get("digest")
            if digest is not None:
                digest = check_digest(digest)
            if ledger is not None:
                ledger.check(name, size, "an upload")
            upload = await self.uploads.create(name, subject)
            await self.uploads.acquire(upload, sink)
            if digest is not None:
                sink.plan = {"kind": "monolithic", "digest": digest}
                sink.on_abort(self._drop_monolithic)
            else:
                sink.plan = {"kind": "session"}
        else:
            upload_id = check_upload_id(args["session"])
            digest = None
            if endpoint == "upload_put":
                digest = check_digest(params.get("digest"))
            sink.plan = {"kind": endpoint, "digest": digest}
            upload = self.uploads.get(upload_id, name)
            if ledger is not None:
                ledger.check(name, size, "an upload chunk")
            await self.uploads.acquire(upload, sink)
            self._check_content_range(request, upload)
        await self.uploads.ensure_hash(upload)
        sink.attach(upload, self.uploads.appender(upload))

    def _drop_monolithic(self, sink: BodySink) -> None:
        if sink.upload is not None:
            Deferred.fromCoroutine(self.uploads.cancel(sink.upload)).addErrback(
                lambda f: self.log.failure("Could not remove an aborted upload", f))

    @staticmethod
    def _check_content_range(request: IRequest, upload: Upload) -> None:
        header = request.getHeader("content-range")
        if header is None:
            return
        match = _CONTENT_RANGE.fullmatch(header.strip())
        if match is None:
            raise OCIError("RANGE_INVALID", "malformed Content-Range", status=416,
                           headers={"Range": upload.range_header})
        first, last = int(match.group(1)), int(match.group(2))
        if first != upload.size or last < first:
            raise OCIError("RANGE_INVALID",
                           f"the upload has {upload.size} bytes; a chunk must start there",
                           headers={"Range": upload.range_header,
                                    "Location": f"/v2/{upload.repository}/blobs/uploads/"
                                                f"{upload.id}",
                                    "Docker-Upload-UUID": upload.id})
        length = request.getHeader("content-length")
        if length is not None and length.isdigit() and int(length) != last - first + 1:
            raise OCIError("RANGE_INVALID", "Content-Range and Content-Length disagree",
                           headers={"Range": upload.range_header})

    @staticmethod
    def _sink(request: IRequest) -> BodySink:
        sink = getattr(request, "body_sink", None)
        if sink is None:
            raise OCIError("UNSUPPORTED", "upload bodies must come through the registry site",
                           status=500)
        return sink

    def _commit(self, sink: BodySink, upload: Upload, digest: str) -> Deferred[bool]:
        """Commit, holding the upload until the commit is really over (even if the
        client goes away meanwhile)."""
        work = Deferred.fromCoroutine(self.uploads.commit(upload, digest))

        def release(result: Any) -> Any:
            sink.release()
            return result

        return shield(work.addBoth(release))

    @staticmethod
    async def _body(sink: BodySink) -> Upload | None:
        """The sink's upload once the body is on disk; the upload is released on error."""
        try:
            return await sink.result()
        except BaseException:
            sink.release()
            raise

    @app.route("/v2/<path:name>/blobs/uploads/", methods=["POST"], strict_slashes=False)
    async def upload_start(self, request: IRequest, name: str) -> bytes:
        sink = self._sink(request)
        try:
            upload = await self._body(sink)
        except OCIError:
            if sink.plan.get("kind") in ("monolithic", "session") and sink.upload is not None:
                # The client was never told this session: do not keep (or charge) it.
                await self.uploads.cancel(sink.upload)
            raise
        plan = sink.plan
        if plan["kind"] == "monolithic":
            assert upload is not None
            await self._commit(sink, upload, plan["digest"])
            return self._blob_created(request, name, plan["digest"])
        sink.release()
        if plan["kind"] == "mount":
            digest = plan["digest"]

            def mount() -> bool:
                if not self.storage.blob_linked(plan["from"], digest):
                    return False
                info = self.storage.blob_info(digest)
                ledger = self.uploads.ledger
                if ledger is None or info is None:
                    self.storage.link_blob(name, digest)
                    return True
                pending = f"mount:{uuid.uuid4()}"
                ledger.reserve_upload(pending, name, info.size, f"mounting {digest}", digest)
                try:
                    self.storage.link_blob(name, digest)
                finally:
                    ledger.drop_upload(pending)
                return True

            def mount_seen(mounted: bool) -> bool:
                if mounted:
                    self.collector.note_seen(digest)
                return mounted

            if await under_lock(self.lock, lambda: self._thread(mount).addCallback(mount_seen)):
                return self._blob_created(request, name, digest)
            upload = await self.uploads.create(name, plan["subject"])
        assert upload is not None
        return self._upload_accepted(request, name, upload)

    @app.route("/v2/<path:name>/blobs/uploads/<session>", methods=["PATCH"])
    async def upload_patch(self, request: IRequest, name: str, session: str) -> bytes:
        sink = self._sink(request)
        upload = await self._body(sink)
        sink.release()
        assert upload is not None
        return self._upload_accepted(request, name, upload)

    @app.route("/v2/<path:name>/blobs/uploads/<session>", methods=["PUT"])
    async def upload_put(self, request: IRequest, name: str, session: str) -> bytes:
        sink = self._sink(request)
        upload = await self._body(sink)
        assert upload is not None
        digest = sink.plan["digest"]
        await self._commit(sink, upload, digest)
        return self._blob_created(request, name, digest)

    @app.route("/v2/<path:name>/blobs/uploads/<session>", methods=["GET"])
    async def upload_status(self, request: IRequest, name: str, session: str) -> bytes:
        name = check_name(name)
        self.auth.require(request, "repository", name, "push", self._push_scopes(name))
        upload = self.uploads.get(check_upload_id(session), name)
        await self.uploads.settle(upload)
        if upload.gone:
            raise OCIError("BLOB_UPLOAD_UNKNOWN", "unknown upload")
        return _empty(request, 204, {
            "Location": f"/v2/{name}/blobs/uploads/{upload.id}",
            "Range": upload.range_header,
            "Docker-Upload-UUID": upload.id,
        })

    @app.route("/v2/<path:name>/blobs/uploads/<session>", methods=["DELETE"])
    async def upload_cancel(self, request: IRequest, name: str, session: str) -> bytes:
        name = check_name(name)
        self.auth.require(request, "repository", name, "push", self._push_scopes(name))
        upload = self.uploads.get(check_upload_id(session), name)
        await self.uploads.cancel(upload)
        return _empty(request, 204, {})
