"""HTTP plumbing shared by the roles' JSON APIs (Klein).

- :class:`ApiError` and :func:`error_body`: the one error shape,
  ``{"error": {"code": ..., "message": ...}}``; :func:`http_exception_error` and
  :func:`respond_internal` for the handlers every role's API has.
- :func:`limited_site`: a ``Site`` whose requests stop buffering a body past a
  size limit, so that an oversized upload costs no memory and gets ``413``.
- :func:`read_json`: parse and validate a request body against a JSON Schema.
- :func:`dumps`: JSON with RFC 3339 timestamps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from jsonschema.exceptions import best_match
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request as HTTPRequest
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException

from treadmill.common.schema import validator

STATUS_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
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
    if error.status == 401:
        request.setHeader(b"www-authenticate", b'Bearer realm="treadmill"')
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return error_body(error.code, error.message)


def http_exception_error(error: HTTPException) -> ApiError:
    """The JSON error for a routing failure (Werkzeug's ``NotFound``, ``MethodNotAllowed``…)."""
    code = error.code or 500
    message = {404: "no such endpoint", 405: "method not allowed"}.get(
        code, error.description or "error")
    return ApiError(code, message)


def respond_internal(request: IRequest, failure: Failure, log: Logger) -> bytes:
    """Log an unhandled ``failure`` on ``log`` and answer ``500 internal error``."""
    log.failure("Unhandled error in {method} {path}", failure=failure,
                method=request.method, path=request.path)
    return respond_error(request, ApiError(500, "internal error"))


class LimitedRequest(Request):
    """A request that keeps at most ``max_body`` bytes of its body.

    Beyond the limit the rest of the body is read and dropped, and
    :attr:`too_large` is set; handlers answer ``413`` (see :func:`read_json`).
    """

    max_body = 64 * 1024
    too_large = False
    _received = 0
    _content_type: list[bytes] | None = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.started = time.monotonic()
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
        super().process()

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self.too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        HTTPRequest.handleContentChunk(self, data)


def limited_site(resource: Resource, max_body: int, **kwargs: Any) -> Site:
    """A ``Site`` whose requests buffer at most ``max_body`` body bytes."""
    request_class = type("LimitedRequest", (LimitedRequest,), {"max_body": max_body})
    site = Site(resource, **kwargs)
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
        return "expected " + " or ".join("an object" if k == "object" else f"a {k}"
                                         for k in kinds)
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
    if schema is not None:
        validate(value, schema)
    return value
