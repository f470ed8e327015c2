"""Cross-origin reads for browsers: a resource wrapper that answers CORS preflights and
marks responses readable by a configured list of origins (the web console's).

Only the listed origins get ``Access-Control-Allow-*`` headers; credentials
(cookies) are never allowed: browsers send capability tokens in the
``Authorization`` header, which the preflight permits.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource


def normalize_origin(value: str) -> str:
    """``scheme://host[:port]``, lower-case, as browsers send ``Origin``; ValueError if
    ``value`` is not an http(s) origin."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or \
            parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"not an http(s) origin: {value!r}")
    return f"{parts.scheme}://{parts.netloc.lower()}"


class CorsResource(Resource):
    """Wraps a (leaf) resource: preflights answered here, the rest passed on with the
    ``Access-Control-Allow-Origin`` of an allowed ``Origin``."""

    isLeaf = True

    def __init__(self, wrapped: Any, origins: Iterable[str], *,
                 methods: str = "GET, HEAD", headers: str = "Authorization, Range",
                 expose: str = "", max_age: int = 600):
        super().__init__()
        self.wrapped = wrapped
        self.origins = frozenset(normalize_origin(o) for o in origins)
        self.methods = methods.encode("ascii")
        self.headers = headers.encode("ascii")
        self.expose = expose.encode("ascii")
        self.max_age = str(max_age).encode("ascii")

    def _allowed(self, request: IRequest) -> bytes | None:
        request.setHeader(b"vary", b"Origin")
        origin = request.getHeader("origin")
        if origin is None or origin.lower() not in self.origins:
            return None
        return origin.encode("ascii", "replace")

    def render(self, request: IRequest) -> Any:
        origin = self._allowed(request)
        if request.method == b"OPTIONS" and request.getHeader(
                "access-control-request-method") is not None:
            request.setResponseCode(204 if origin else 403)
            if origin:
                request.setHeader(b"access-control-allow-origin", origin)
                request.setHeader(b"access-control-allow-methods", self.methods)
                request.setHeader(b"access-control-allow-headers", self.headers)
                request.setHeader(b"access-control-max-age", self.max_age)
            return b""
        if origin:
            request.setHeader(b"access-control-allow-origin", origin)
            if self.expose:
                request.setHeader(b"access-control-expose-headers", self.expose)
        return self.wrapped.render(request)


def with_cors(resource: Any, origins: Iterable[str], **options: Any) -> Any:
    """``resource`` itself without origins; else wrapped in a :class:`CorsResource`."""
    origins = list(origins)
    return CorsResource(resource, origins, **options) if origins else resource


def origins(value: Any) -> list[str]:
    """A configuration value: a list of http(s) origins (a string is one origin)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError("expected a list of origins (https://host[:port])")
    return [normalize_origin(item) for item in items]
