"""The log server's HTTP API (Klein), as documented in ``docs/logserver.md``.

    GET  /healthz
    GET  /v1/jobs/{job}/streams                      list: names, lengths, closed   (read|append)
    POST /v1/jobs/{job}/streams/{stream}?offset=N    append the body at N [&close=1] (append)
    POST /v1/jobs/{job}/streams/{stream}/close       close [?length=N]               (append)
    GET  /v1/jobs/{job}/streams/{stream}             bytes: Range, ?offset=, ?follow=1 (read)
    HEAD /v1/jobs/{job}/streams/{stream}             its length in X-Stream-Length   (read)
    GET  /v1/jobs/{job}/streams/{stream}/follow      WebSocket: live binary messages (read)

Every request carries a capability token (``Authorization: Bearer``) granting
the action on ``{"type": "job", "name": <job id>}``; the server verifies it
offline with the switchboard's public keys. Errors use the common shape
``{"error": {"code", "message"}}``; refused appends add ``"length"`` (also
in the ``X-Stream-Length`` header) so that a writer knows where to resume.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

from autobahn.twisted.resource import WebSocketResource
from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from treadmill.common.captoken import Claims
from treadmill.common.http import (
    ApiError,
    add_fallback_error_handlers,
    dumps,
    query_arg,
    respond,
    respond_error,
)
from treadmill.common.keys import bearer_claims
from treadmill.common.ranges import Unsatisfiable, parse_range
from treadmill.logserver.follow import FollowFactory, Pump, RequestSink, serve
from treadmill.logserver.names import InvalidName, check_job, check_stream
from treadmill.logserver.streams import StorageError, StreamError, StreamStore, TooManyStreams

__all__ = ["LENGTH_HEADER", "LogServerAPI"]

LENGTH_HEADER = b"x-stream-length"
CLOSED_HEADER = b"x-stream-closed"
MAX_OFFSET = 2**62


def _set_stream_headers(request: IRequest, length: int, closed: bool | None = None) -> None:
    request.setHeader(LENGTH_HEADER, str(length).encode("ascii"))
    if closed is not None:
        request.setHeader(CLOSED_HEADER, b"1" if closed else b"0")


def _int_arg(request: IRequest, name: str, *, required: bool = False) -> int | None:
    raw = query_arg(request, name, "ascii")
    if raw is None or raw == "":
        if required:
            raise ApiError(400, f"the query parameter {name} is required")
        return None
    if not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_OFFSET:
        raise ApiError(400, f"{name}: expected a non-negative integer")
    return int(raw)


def _bool_arg(request: IRequest, name: str) -> bool:
    raw = query_arg(request, name, "ascii")
    if raw is None:
        return False
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", ""):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise ApiError(400, f"{name}: expected 1 or 0")


class LogServerAPI:
    """Routes of ``/v1``; the store, the token verifier and the follow factory are injected."""

    app = Klein()
    log = Logger()

    def __init__(self, store: StreamStore, verifier: Any, *, max_append: int = 1024 * 1024,
                 follow_factory: FollowFactory | None = None):
        self.store = store
        self.verifier = verifier
        self.max_append = max_append
        self.follow_factory = follow_factory or FollowFactory(store.reactor)
        self.outcomes: dict[str, int] = {}
        self.http_followers = 0

    def resource(self) -> Any:
        return self.app.resource()

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    # -- errors ------------------------------------------------------------------------

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        return respond_error(request, failure.value)

    @app.handle_errors(InvalidName)
    def _invalid_name(self, request: IRequest, failure: Failure) -> bytes:
        return respond_error(request, ApiError(400, str(failure.value)))

    @app.handle_errors(StreamError)
    def _stream_error(self, request: IRequest, failure: Failure) -> bytes:
        error: StreamError = failure.value
        self._count(error.code)
        request.setResponseCode(409)
        request.setHeader(b"content-type", b"application/json")
        _set_stream_headers(request, error.length)
        return dumps({"error": {"code": error.code, "message": error.message},
                      "length": error.length})

    @app.handle_errors(TooManyStreams)
    def _too_many(self, request: IRequest, failure: Failure) -> bytes:
        return respond_error(request, ApiError(409, str(failure.value), "too_many_streams"))

    @app.handle_errors(StorageError)
    def _storage(self, request: IRequest, failure: Failure) -> bytes:
        self._count("storage_error")
        request.setHeader(b"retry-after", b"5")
        return respond_error(request, ApiError(503, str(failure.value)))

    add_fallback_error_handlers(app)

    # -- helpers -----------------------------------------------------------------------

    def _authorize(self, request: IRequest, job: str, *actions: str) -> Claims:
        """The request's verified claims, granting one of ``actions`` on ``job``."""
        _, claims = bearer_claims(request, self.verifier)
        if not any(claims.allows("job", job, action) for action in actions):
            raise ApiError(403, f"the token does not grant {' or '.join(actions)} "
                           f"on job {job}")
        return claims

    # -- public ------------------------------------------------------------------------

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: IRequest) -> bytes:
        return respond(request, {"status": "ok"})

    # -- streams -----------------------------------------------------------------------

    @app.route("/v1/jobs/<job>/streams", methods=["GET"])
    def list_streams(self, request: IRequest, job: str) -> bytes:
        job = check_job(job)
        self._authorize(request, job, "read", "append")
        return respond(request, {"job": job,
                                 "streams": [s.info() for s in self.store.streams(job)]})

    @app.route("/v1/jobs/<job>/streams/<stream>", methods=["POST"])
    async def append(self, request: IRequest, job: str, stream: str) -> bytes:
        job, stream = check_job(job), check_stream(stream)
        self._authorize(request, job, "append")
        if getattr(request, "too_large", False):
            self._count("too_large")
            raise ApiError(413, f"an append may carry at most {self.max_append} bytes")
        offset = _int_arg(request, "offset", required=True)
        assert offset is not None
        close = _bool_arg(request, "close")
        data = request.content.read() if request.content is not None else b""
        if len(data) > self.max_append:
            self._count("too_large")
            raise ApiError(413, f"an append may carry at most {self.max_append} bytes")
        result = await self.store.append(job, stream, offset, data, close=close)
        self._count("ok")
        _set_stream_headers(request, result.length, result.closed)
        return respond(request, {"length": result.length, "closed": result.closed})

    @app.route("/v1/jobs/<job>/streams/<stream>/close", methods=["POST"])
    async def close(self, request: IRequest, job: str, stream: str) -> bytes:
        job, stream = check_job(job), check_stream(stream)
        self._authorize(request, job, "append")
        length = _int_arg(request, "length")
        result = await self.store.close(job, stream, length)
        _set_stream_headers(request, result.length, True)
        return respond(request, {"length": result.length, "closed": True})

    @app.route("/v1/jobs/<job>/streams/<stream>", methods=["GET", "HEAD"])
    def read(self, request: IRequest, job: str, stream: str) -> Any:
        job, stream = check_job(job), check_stream(stream)
        self._authorize(request, job, "read")
        offset = _int_arg(request, "offset")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        if _bool_arg(request, "follow"):
            return self._follow_http(request, job, stream, offset or 0)
        found = self.store.lookup(job, stream)
        if found is None:
            raise ApiError(404, f"job {job} has no stream {stream}")
        total = found.length
        _set_stream_headers(request, total, found.closed)
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"content-type", b"application/octet-stream")
        try:
            wanted = parse_range(request.getHeader("range"), total)
            if offset is not None and offset > total:
                raise Unsatisfiable()
        except Unsatisfiable:
            request.setHeader(b"content-range", f"bytes */{total}".encode())
            raise ApiError(416, f"the stream has {total} bytes", "range_not_satisfiable") from None
        if wanted is not None:
            start, end = wanted[0], wanted[1] + 1
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {start}-{end - 1}/{total}".encode())
        else:
            start, end = offset or 0, total
        request.setHeader(b"content-length", str(end - start).encode())
        if request.method == b"HEAD" or end == start:
            return b""
        return serve(request, Pump(self.store, found, start, RequestSink(request), end=end))

    def _follow_http(self, request: IRequest, job: str, name: str, offset: int) -> Any:
        request.setHeader(b"content-type", b"application/octet-stream")
        if request.method == b"HEAD":
            found = self.store.lookup(job, name)
            _set_stream_headers(request, found.length if found else 0)
            return b""
        stream = self.store.stream(job, name)
        _set_stream_headers(request, stream.length)
        self.http_followers += 1
        request.write(b"")  # the headers now: a curl user sees the response begin

        def done(result: Any) -> Any:
            self.http_followers -= 1
            return result

        pump = Pump(self.store, stream, offset, RequestSink(request), follow=True)
        return serve(request, pump).addBoth(done)

    @app.route("/v1/jobs/<job>/streams/<stream>/follow", methods=["GET"])
    def follow(self, request: IRequest, job: str, stream: str) -> Any:
        job, stream = check_job(job), check_stream(stream)
        self._authorize(request, job, "read")
        offset = _int_arg(request, "offset") or 0
        upgrade = (request.getHeader("upgrade") or "").lower()
        if upgrade != "websocket":
            raise ApiError(400, "this is a WebSocket endpoint; for HTTP streaming use "
                           f"GET /v1/jobs/{job}/streams/{stream}?follow=1")
        return WebSocketResource(self.follow_factory.for_stream(self.store, job, stream,
                                                                offset))

    # -- anything else under streams/: say why a name was refused --------------------------

    @app.route("/v1/jobs/<job>/streams/<path:rest>", methods=["GET", "HEAD", "POST", "PUT",
                                                               "DELETE"])
    def bad_stream(self, request: IRequest, job: str, rest: str) -> bytes:
        check_job(job)
        # The first segment as sent (a "%2F" in it must not split it): the stream name.
        raw = request.path.split(b"/streams/", 1)[-1].split(b"/", 1)[0]
        check_stream(unquote_to_bytes(raw).decode("utf-8", "replace"))
        raise ApiError(404, "no such endpoint")
