"""HTTP plumbing shared by the roles' JSON APIs (Klein).

- :class:`ApiError` and :func:`error_body`: the one error shape,
  ``{"error": {"code": ..., "message": ...}}``; :func:`http_exception_error` and
  :func:`respond_internal` for the handlers every role's API has, registered by
  :func:`add_fallback_error_handlers`; :func:`query_arg` reads a query parameter.
- :func:`limited_site`: a ``Site`` whose requests stop buffering a body past a
  size limit, so that an oversized upload costs no memory and gets ``413``;
  whose requests with invalid UTF-8, NUL or control characters in a header,
  Basic credentials, path segment or query value get ``400`` before any
  route sees them (:func:`head_problem`); and whose connections must deliver
  a request head within :attr:`HardenedSite.head_timeout` seconds and may sit
  idle between requests for at most :attr:`HardenedSite.idle_timeout`
  (:class:`HardenedChannel`).
- :func:`log_requests`: a site's access log (optional) and request metrics.
- :func:`read_json`: parse and validate a request body against a JSON Schema.
- :func:`dumps`: JSON with RFC 3339 timestamps.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes
from uuid import UUID

from jsonschema.exceptions import best_match
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http import Request as HTTPRequest
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from treadmill.common.schema import validator

if TYPE_CHECKING:  # Werkzeug comes with Klein (the `server` extra); `tml` reaches this
    from werkzeug.exceptions import HTTPException  # module without either.

STATUS_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    431: "head_too_large",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
}


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code or STATUS_CODES.get(status, "error")
        self.message = message
        self.headers = headers or {}


def timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def dumps(value: Any) -> bytes:
    """Compact JSON bytes; datetimes as RFC 3339."""
    return json.dumps(value, default=_default, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(raw: bytes | str) -> Any:
    """Strict JSON: no NaN or Infinity; nesting too deep is a ValueError."""
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def error_body(code: str, message: str) -> bytes:
    return dumps({"error": {"code": code, "message": message}})


def respond(request: IRequest, value: Any, status: int = 200) -> bytes:
    """Set the status and JSON content type; return the encoded body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return dumps(value)


def respond_error(request: IRequest, error: ApiError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("utf-8"))
    if error.status == 401:
        request.setHeader(b"www-authenticate", b'Bearer realm="treadmill"')
    return error_body(error.code, error.message)


def http_exception_error(error: HTTPException) -> ApiError:
    """The JSON error for a routing failure (Werkzeug's ``NotFound``, ``MethodNotAllowed``…).

    A ``405`` carries the ``Allow`` header naming the methods the path serves.
    """
    from werkzeug.exceptions import MethodNotAllowed

    code = error.code or 500
    message = {404: "no such endpoint", 405: "method not allowed"}.get(
        code, error.description or "error")
    headers = {}
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        headers["Allow"] = allow_header(error.valid_methods)
    return ApiError(code, message, headers=headers)


def allow_header(methods: Any) -> str:
    """The ``Allow`` value for ``methods`` (werkzeug adds ``HEAD`` and ``OPTIONS``
    to its rules; we list what a client may really use, sorted)."""
    return ", ".join(sorted({m.upper() for m in methods} - {"OPTIONS"}))


def respond_internal(request: IRequest, failure: Failure, log: Logger) -> bytes:
    """Log an unhandled ``failure`` on ``log`` and answer ``500 internal error``."""
    log.failure("Unhandled error in {method} {path}", failure=failure,
                method=request.method, path=request.path)
    return respond_error(request, ApiError(500, "internal error"))


def add_fallback_error_handlers(app: Any) -> None:
    """Give a Klein ``app`` the handlers every JSON API ends with: Werkzeug's routing
    errors (:func:`http_exception_error`) and any other exception (``500``, logged on
    the API object's ``log``). Call it after the API's own ``handle_errors``, at the end
    of its class body: the first handler that matches answers."""
    from werkzeug.exceptions import HTTPException

    @app.handle_errors(HTTPException)
    def _http_error(api: Any, request: IRequest, failure: Failure) -> bytes:
        return respond_error(request, http_exception_error(failure.value))

    @app.handle_errors(Exception)
    def _internal(api: Any, request: IRequest, failure: Failure) -> bytes:
        return respond_internal(request, failure, api.log)


_ENCODINGS = {"ascii": "ASCII", "utf-8": "UTF-8"}


def query_arg(request: IRequest, name: str, encoding: str = "utf-8") -> str | None:
    """The last value of the query parameter ``name``, None if absent; ``400`` if it
    is not text in ``encoding``."""
    values = request.args.get(name.encode("ascii")) if request.args else None
    if not values:
        return None
    try:
        return values[-1].decode(encoding)  # type: ignore[no-any-return]
    except UnicodeDecodeError:
        raise ApiError(400, f"{name}: not {_ENCODINGS.get(encoding, encoding)}") from None


def log_requests(site: Site, access_log: bool,
                 observe: Callable[[IRequest], None] | None = None) -> None:
    """Send each answered request of ``site`` to ``observe`` (the role's request
    metrics) and, with ``access_log``, to the site's access log."""
    access = site.log

    def log(request: IRequest) -> None:
        if observe is not None:
            observe(request)
        if access_log:
            access(request)

    site.log = log  # type: ignore[method-assign]


_HEADER_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
_PLAIN = re.compile(rb"[\x09\x20-\x7e]*")  # printable ASCII and tab: nothing to check


def _text(raw: bytes, what: str, controls: re.Pattern[str] | None = None) -> str | None:
    """What is wrong with ``raw`` as text (not UTF-8, a NUL, a control), or None."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"{what}: not valid UTF-8"
    if "\x00" in text or (controls is not None and controls.search(text)):
        return f"{what}: contains a control character"
    return None


def head_problem(headers: Headers, uri: bytes | None) -> str | None:
    """Why a request head must be refused with ``400``, or None.

    Every header value, the decoded user and password of ``Basic``
    credentials, every percent-decoded path segment and query name and value
    must be UTF-8 (so no lone surrogates) without NUL; header values and
    credentials also without other control characters. Handlers can then
    decode any of them without a second thought.
    """
    for name, values in headers.getAllRawHeaders():
        for value in values:
            if _PLAIN.fullmatch(value):
                continue
            problem = _text(value, f"header {name.decode('ascii', 'replace')}",
                            _HEADER_CONTROLS)
            if problem is not None:
                return problem
    for value in headers.getRawHeaders(b"authorization", []):
        scheme, _, encoded = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            continue
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            continue  # The handler answers malformed credentials itself.
        problem = _text(decoded, "Basic credentials", _HEADER_CONTROLS)
        if problem is not None:
            return problem
    if uri is None:
        return None
    if b"%" not in uri and _PLAIN.fullmatch(uri):
        return None
    path, _, query = uri.partition(b"?")
    for segment in path.split(b"/"):
        problem = _text(unquote_to_bytes(segment), "path")
        if problem is not None:
            return problem
    for field in query.replace(b"+", b" ").split(b"&"):
        name, _, value = field.partition(b"=")
        raw_name = unquote_to_bytes(name)
        problem = _text(raw_name, "query parameter name") or _text(
            unquote_to_bytes(value), f"query parameter {raw_name.decode('utf-8')[:64]}")
        if problem is not None:
            return problem
    return None


class LimitedRequest(Request):
    """A request that keeps at most ``max_body`` bytes of its body, and refuses
    a head that fails :func:`head_problem`.

    Beyond the limit the rest of the body is read and dropped, and
    :attr:`too_large` is set; handlers answer ``413`` (see :func:`read_json`).
    A refused head is answered ``400`` in the role's error shape
    (:meth:`error_body`) before any resource sees it; its body is dropped.
    """

    max_body = 64 * 1024
    too_large = False
    bad_input: str | None = None
    _head_checked = False
    _received = 0
    _content_type: list[bytes] | None = None

    @classmethod
    def error_body(cls, status: int, message: str) -> bytes:
        """The body of an error this class answers by itself (the role's error shape)."""
        return error_body(STATUS_CODES.get(status, "error"), message)

    def check_head(self) -> str | None:
        """Check the head once the headers are in; the problem found, if any."""
        if not self._head_checked:
            self._head_checked = True
            self.bad_input = head_problem(self.requestHeaders,
                                          getattr(self.channel, "_path", None))
        return self.bad_input

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.started = time.monotonic()
        if not self._head_checked:  # Not through gotLength (not HTTP/1.1).
            self._head_checked = True
            self.bad_input = head_problem(self.requestHeaders, path)
        # twisted.web would parse form bodies into request.args (mixing them
        # with the query) and answer a malformed one with a bare 400; to find
        # out whether a body is a form it parses every Content-Type through
        # the email package, a seventh of a log append's cost. Our APIs take
        # JSON or raw bytes: hide the header until dispatch, where read_json
        # answers a form with 415 in the documented shape.
        raw = self.requestHeaders.getRawHeaders(b"content-type")
        if raw:
            self._content_type = raw
            self.requestHeaders.removeHeader(b"content-type")
        super().requestReceived(command, path, version)

    def process(self) -> None:
        if self._content_type is not None:
            self.requestHeaders.setRawHeaders(b"content-type", self._content_type)
        if self.bad_input is not None:
            self.site = self.channel.site
            self.answer_error(400, self.bad_input)
            return
        super().process()

    def answer_error(self, status: int, message: str) -> None:
        """Answer ``status`` with :meth:`error_body` and finish, without a resource."""
        body = self.error_body(status, message)
        self.setResponseCode(status)
        self.setHeader(b"content-type", b"application/json")
        self.setHeader(b"cache-control", b"no-store")
        self.setHeader(b"content-length", str(len(body)).encode("ascii"))
        self.write(body)
        self.finish()

    def gotLength(self, length: int | None) -> None:
        if self.check_head() is not None or (length is not None and length > self.max_body):
            self.too_large = self.bad_input is None
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large or self.bad_input is not None:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self.too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        HTTPRequest.handleContentChunk(self, data)


class HardenedChannel(HTTPChannel):
    """An HTTP/1.1 channel that bounds the time a client may take to send a request
    head, and to sit idle between requests.

    A new connection, and a kept-alive one from the first byte of its next
    request, must deliver a complete request head within the site's
    ``head_timeout``; a kept-alive connection may wait at most ``idle_timeout``
    for that first byte. Neither applies once a head is in: request bodies,
    long responses (SSE, log follow) and WebSocket upgrades run unbounded by
    them. A malformed request line or header is answered ``400`` in the
    site's error shape instead of twisted.web's bare status line.
    """

    log = Logger()
    _deadline: Any = None
    _idle = False
    _head_started = False

    def _limit(self, name: str) -> float | None:
        value = getattr(getattr(self, "site", None), name, None)
        return value if value else None

    def _arm(self, name: str) -> None:
        self._disarm()
        seconds = self._limit(name)
        if seconds is not None:
            self._deadline = self.callLater(seconds, self._expired, name, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _expired(self, name: str, seconds: float) -> None:
        self._deadline = None
        if self._handlingRequest or self.transport is None:
            return
        self.log.debug("Closing a connection from {peer}: {what} after {seconds} s",
                       peer=str(self.transport.getPeer()), seconds=seconds,
                       what="idle" if self._idle else "no complete request head")
        if not self._idle and self._head_started:
            self._write_error(408, "no complete request head in time")
        self.transport.loseConnection()

    def _write_error(self, status: int, message: str) -> None:
        factory = getattr(self, "requestFactory", None)
        render = getattr(factory, "error_body", None)
        body = render(status, message) if render is not None else error_body(
            STATUS_CODES.get(status, "error"), message)
        reason = {400: b"Bad Request", 408: b"Request Timeout",
                  431: b"Request Header Fields Too Large"}.get(status, b"Error")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, reason, len(body), body))

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm("head_timeout")

    def dataReceived(self, data: bytes) -> None:
        if data and not self._handlingRequest:
            self._head_started = True
            if self._idle:
                self._idle = False
                self._arm("head_timeout")
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._disarm()
        self._head_started = False
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        if self.persistent:
            self._idle = True
            self._head_started = False
            self._arm("idle_timeout")
        super().requestDone(request)

    def connectionLost(self, reason: Failure) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._disarm()
        if (self._receivedHeaderSize > self.totalHeadersSize
                or self._receivedHeaderCount > self.maxHeaders):
            self._head_too_large()
            return
        self._write_error(400, "malformed HTTP request")
        self.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header over ``MAX_LENGTH``: ``431``, not twisted.web's silent
        close (a client saw an empty reply and could not tell why)."""
        self._disarm()
        self._head_too_large()

    def _head_too_large(self) -> None:
        self._write_error(431, f"request head too large: at most {self.totalHeadersSize} "
                               f"bytes, {self.maxHeaders} header fields and "
                               f"{self.MAX_LENGTH} bytes a line")
        self.loseConnection()
        self.dataReceived = lambda data: None  # type: ignore[method-assign]


class HardenedSite(Site):
    """A ``Site`` of :class:`HardenedChannel` connections (HTTP/1.1 only).

    :attr:`head_timeout` and :attr:`idle_timeout` are set for every site of the
    process by :func:`configure_timeouts` (settings ``http.head_timeout`` and
    ``http.idle_timeout``); 0 or None disables one.
    """

    protocol = HardenedChannel
    head_timeout: float | None = 10.0
    idle_timeout: float | None = 60.0


def configure_timeouts(head_timeout: float | None, idle_timeout: float | None) -> None:
    """Set the request-head and keep-alive idle limits of every :class:`HardenedSite`."""
    HardenedSite.head_timeout = head_timeout
    HardenedSite.idle_timeout = idle_timeout


def limited_site(resource: Resource, max_body: int, **kwargs: Any) -> Site:
    """A :class:`HardenedSite` whose requests buffer at most ``max_body`` body bytes."""
    request_class = type("LimitedRequest", (LimitedRequest,), {"max_body": max_body})
    site = HardenedSite(resource, **kwargs)
    site.requestFactory = request_class
    return site


def _where(path: Any) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) if parts else "body"


def _describe(error: Any) -> str:
    """What is wrong, without quoting the offending value (it may be a secret)."""
    kind, expected = error.validator, error.validator_value
    if kind == "type":
        kinds = expected if isinstance(expected, list) else [expected]
        return "expected " + " or ".join(f"an {k}" if k in ("object", "integer", "array")
                                         else f"a {k}" for k in kinds)
    if kind == "required":
        return error.message  # "'name' is a required property": a field name, no value.
    if kind == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return "unknown field" + ("s " if len(extra) > 1 else " ") + ", ".join(
            repr(name[:64]) for name in extra)
    if kind == "minLength":
        return f"must be at least {expected} characters long"
    if kind == "maxLength":
        return f"must be at most {expected} characters long"
    if kind == "pattern":
        return f"has an invalid format (must match {expected})"
    if kind in ("minimum", "exclusiveMinimum"):
        return f"must be {'at least' if kind == 'minimum' else 'greater than'} {expected}"
    if kind in ("maximum", "exclusiveMaximum"):
        return f"must be {'at most' if kind == 'maximum' else 'less than'} {expected}"
    if kind == "enum":
        return "must be one of " + ", ".join(map(str, expected))
    if kind == "maxItems":
        return f"must have at most {expected} items"
    if kind == "maxProperties":
        return f"must have at most {expected} entries"
    if kind == "uniqueItems":
        return "must not repeat items"
    if kind == "propertyNames":
        return "has an invalid name"
    if kind == "x-printable":
        return ("must hold printable characters only (no control, format, private-use or "
                "separator characters)")
    if kind == "anyOf":
        return "matches none of the allowed forms"
    return f"is invalid ({kind})"


def validate(value: Any, schema: dict[str, Any]) -> None:
    """Raise a ``400`` :class:`ApiError` naming the first offending field.

    Messages name the field and the rule, never the value: a value may be
    a password or a secret parameter.
    """
    error = best_match(validator(schema).iter_errors(value))
    if error is None:
        return
    raise ApiError(400, f"{_where(error.absolute_path)}: {_describe(error)}")


def text_problem(value: Any, path: tuple[Any, ...] = ()) -> str | None:
    """Where a JSON value holds a string no store can keep: a NUL (PostgreSQL text
    refuses it) or a lone surrogate (``"\\ud800"``, not encodable as UTF-8)."""
    if isinstance(value, str):
        if "\x00" in value:
            return f"{_where(path)}: contains a NUL character"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{_where(path)}: contains a lone surrogate"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            problem = text_problem(key, path) or text_problem(item, (*path, key))
            if problem is not None:
                return problem
    elif isinstance(value, list):
        for index, item in enumerate(value):
            problem = text_problem(item, (*path, index))
            if problem is not None:
                return problem
    return None


def read_json(request: IRequest, schema: dict[str, Any] | None = None,
              *, empty: Callable[[], Any] | None = None) -> Any:
    """The request's JSON body, checked for size, media type and ``schema``.

    ``empty`` supplies the value of a request with no body at all (for
    endpoints whose body is optional).
    """
    if getattr(request, "too_large", False):
        raise ApiError(413, f"request body exceeds {LimitedRequest.max_body} bytes"
                       if not hasattr(request, "max_body") else
                       f"request body exceeds {request.max_body} bytes")
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        if empty is not None:
            value = empty()
            if schema is not None:
                validate(value, schema)
            return value
        raise ApiError(400, "a JSON request body is required")
    ctype = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise ApiError(415, f"expected application/json, got {ctype}")
    try:
        value = loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    try:
        problem = text_problem(value)
    except RecursionError:
        problem = "malformed JSON: nested too deeply"
    if problem is not None:
        raise ApiError(400, problem)
    if schema is not None:
        validate(value, schema)
    return value
