"""The web console on the switchboard (``docs/console.md``): its assets at ``/``, cookie
sessions and the privileges the pages ask about.

    GET    /                                     the console's page
    GET    /console/assets/{path}                its scripts, styles and vendored xterm.js
    POST   /console/session                      log in: the token goes into a cookie
    DELETE /console/session                      log out: the session's token is revoked
    GET    /console/privileges/{kind}/{ident}    what the user may do on a job or host

Everything else goes to the API. The session is an ordinary API token from
``POST /api/v1/login``, held in an HttpOnly, SameSite=Strict cookie (Secure
over TLS); :mod:`treadmill.switchboard.auth` checks the CSRF header of
state-changing requests that the cookie authenticates.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException

from treadmill.common.http import (
    ApiError,
    http_exception_error,
    respond,
    respond_error,
    respond_internal,
)
from treadmill.protocol import supervisor as supervisor_protocol
from treadmill.switchboard.access import effective
from treadmill.switchboard.auth import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE, csrf_token
from treadmill.switchboard.database import unavailable
from treadmill.switchboard.store.errors import NotFound

SESSION_TTL = 12 * 3600
"""Seconds a console session lasts (its token's ``expires_in``)."""

TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".svg": "image/svg+xml", ".png": "image/png", ".txt": "text/plain; charset=utf-8"}
"""The content types of the assets the console serves; other files are not served."""


def origin(url: str) -> str | None:
    """``scheme://host[:port]`` of ``url`` (None: not an http(s) or ws(s) URL)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}"


def content_security_policy(connect: list[str]) -> str:
    """The console's policy: scripts only from here, connections to here and ``connect``.

    Inline styles are allowed (xterm.js positions its rows with them); inline
    scripts are not."""
    sources = " ".join(["'self'", *sorted(set(connect))])
    return ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            f"img-src 'self' data:; font-src 'self'; connect-src {sources}; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class Assets:
    """The console's files from the ``treadmill.web`` package, read once."""

    def __init__(self, package: str = "treadmill.web"):
        self.root = resources.files(package)
        self._cache: dict[str, tuple[bytes, str, str] | None] = {}

    def get(self, path: str) -> tuple[bytes, str, str] | None:
        """``(body, content type, etag)`` of an asset, None if there is none."""
        if path not in self._cache:
            self._cache[path] = self._read(path)
        return self._cache[path]

    def _read(self, path: str) -> tuple[bytes, str, str] | None:
        parts = path.split("/")
        if not path or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            return None
        kind = TYPES.get("." + parts[-1].rpartition(".")[2]) if "." in parts[-1] else None
        if parts[-1] in ("LICENSE", "VERSION"):
            kind = TYPES[".txt"]
        if kind is None:
            return None
        node = self.root
        for part in parts:
            node = node / part
        if not node.is_file():
            return None
        body = node.read_bytes()
        return body, kind, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


class WebConsole:
    """Routes of the console; the API (for login and token revocation) is injected."""

    app = Klein()
    log = Logger()

    def __init__(self, api: Any, connect: list[str] | None = None,
                 assets: Assets | None = None, session_ttl: int = SESSION_TTL):
        self.api = api
        self.assets = assets or Assets()
        self.session_ttl = session_ttl
        origins = [o for url in (connect or []) if (o := origin(url)) is not None]
        self.policy = content_security_policy(origins).encode("ascii")

    def resource(self) -> Any:
        return self.app.resource()

    # -- errors ----------------------------------------------------------------------

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        """Errors in the API's one shape (``docs/api.md``)."""
        error = failure.value
        if isinstance(error, NotFound):
            error = ApiError(404, str(error))
        elif isinstance(error, HTTPException):
            error = http_exception_error(error)
        elif unavailable(failure):
            request.setHeader(b"retry-after", b"2")
            error = ApiError(503, "the database is unavailable; try again later")
        if isinstance(error, ApiError):
            return respond_error(request, error)
        return respond_internal(request, failure, self.log)

    # -- assets ----------------------------------------------------------------------

    def _asset(self, request: IRequest, path: str) -> bytes:
        found = self.assets.get(path)
        if found is None:
            raise ApiError(404, "no such file")
        body, kind, etag = found
        request.setHeader(b"content-type", kind.encode("ascii"))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"content-security-policy", self.policy)
        request.setHeader(b"etag", etag.encode("ascii"))
        # Vendored files change only when xterm.js is upgraded: cached for a day. The
        # console's own files are revalidated on every load (cheap: an ETag).
        request.setHeader(b"cache-control", b"public, max-age=86400"
                          if path.startswith("vendor/") else b"no-cache")
        if request.getHeader("if-none-match") == etag:
            request.setResponseCode(304)
            return b""
        return body

    @app.route("/", methods=["GET", "HEAD"])
    def index(self, request: IRequest) -> bytes:
        return self._asset(request, "index.html")

    @app.route("/console/assets/<path:path>", methods=["GET", "HEAD"])
    def asset(self, request: IRequest, path: str) -> bytes:
        return self._asset(request, path)

    # -- sessions --------------------------------------------------------------------

    @app.route("/console/session", methods=["POST"])
    async def log_in(self, request: IRequest) -> bytes:
        """``POST /api/v1/login``, with the token put into the session cookie."""
        if request.getHeader(CSRF_HEADER) is None:
            # A page elsewhere cannot send a custom header here: no login CSRF.
            raise ApiError(403, f"send {CSRF_HEADER} (any value) to log in")
        try:
            body = json.loads(request.content.read() or b"null")
        except ValueError:
            raise ApiError(400, "expected a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "expected a JSON object")
        body = {**body, "label": "web console", "expires_in": self.session_ttl}
        request.content.seek(0)
        request.content.truncate()
        request.content.write(json.dumps(body).encode("utf-8"))
        request.content.seek(0)
        issued = json.loads(await self.api.login(request))
        token = issued.pop("token")
        secure = request.isSecure()
        csrf = csrf_token(token)
        request.addCookie(SESSION_COOKIE, token, path="/", max_age=str(self.session_ttl),
                          httpOnly=True, secure=secure, sameSite="strict")
        request.addCookie(CSRF_COOKIE, csrf, path="/", max_age=str(self.session_ttl),
                          secure=secure, sameSite="strict")
        request.setHeader(b"cache-control", b"no-store")
        return respond(request, {"user": issued["user"], "expires_at": issued["expires_at"],
                                 "csrf": csrf}, 201)

    @app.route("/console/session", methods=["DELETE"])
    async def log_out(self, request: IRequest) -> bytes:
        """Revoke the session's token (``DELETE /api/v1/tokens/{id}``); clear the cookies."""
        if request.getHeader("authorization") is not None:
            raise ApiError(400, "log out ends a console session; revoke API tokens with "
                                "DELETE /api/v1/tokens/{id}")
        try:
            principal = await self.api.auth.principal(request)
        except ApiError as e:
            if e.status != 401:
                raise
            principal = None  # expired or revoked already: only the cookies are left
        if principal is not None and principal.token_id is not None:
            await self.api.revoke_token(request, principal.token_id)
        self._clear(request)
        request.setResponseCode(204)
        return b""

    @staticmethod
    def _clear(request: IRequest) -> None:
        secure = request.isSecure()
        for name, http_only in ((SESSION_COOKIE, True), (CSRF_COOKIE, False)):
            request.addCookie(name, "", path="/", max_age="0", httpOnly=http_only,
                              secure=secure, sameSite="strict")

    # -- privileges ------------------------------------------------------------------

    @app.route("/console/privileges/<kind>/<ident>", methods=["GET"])
    async def privileges(self, request: IRequest, kind: str, ident: str) -> bytes:
        """The privileges the user holds on one job or host (to show only the buttons that
        would work; the API checks them anyway)."""
        principal = await self.api.auth.principal(request)
        store = self.api.store
        if kind == "job":
            try:
                row = await store.get_job(str(uuid.UUID(ident)), principal)
            except ValueError:
                raise ApiError(404, f"no job {ident}") from None
        elif kind == "host":
            row = await store.get_host(ident, principal)
        else:
            raise ApiError(404, "privileges are shown for jobs and hosts")
        held = effective(kind, principal, row["owner_id"], row["grants"])
        if not held:
            raise ApiError(404, f"no {kind} {ident}")
        return respond(request, {"privileges": sorted(held), "admin": principal.admin})


class ConsoleRoot(Resource):
    """The site's root: the console's paths to the console, a supervisor's upgrade
    (``GET /api/v1/supervisor``) straight to ``supervisor`` when there is one, everything
    else to the API. (Klein's routing of the upgrades was about 5 % of a surviving
    instance's CPU in a failover; the route stays, for other methods and for an API
    without supervisor links.)"""

    isLeaf = True

    def __init__(self, console: Any, api: Any, supervisor: Any = None):
        super().__init__()
        self.console = console
        self.api = api
        self.supervisor = supervisor

    def render(self, request: IRequest) -> Any:
        path = request.path
        if path == _SUPERVISOR_PATH and request.method == b"GET" and self.supervisor is not None:
            return self.supervisor.render(request)
        if path == b"/" or path.startswith(b"/console/"):
            return self.console.render(request)
        return self.api.render(request)


_SUPERVISOR_PATH = supervisor_protocol.PATH.encode()


def console_root(api: Any, connect: list[str] | None = None) -> ConsoleRoot:
    """The switchboard's root resource: the console at ``/``, ``api`` everywhere else
    (the supervisors' upgrades to its ``supervisor_resource``).

    ``connect`` lists the URLs (log servers, proxies) the page may connect to."""
    return ConsoleRoot(WebConsole(api, connect).resource(), api.resource(),
                       getattr(api, "supervisor_resource", None))


__all__ = ["Assets", "ConsoleRoot", "WebConsole", "console_root", "content_security_policy"]
