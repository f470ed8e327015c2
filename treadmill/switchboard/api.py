"""The switchboard's HTTP API (Klein), as documented in ``docs/api.md``.

State is injected: a test builds :class:`SwitchboardAPI` with a real store and
serves ``api.app.resource()``. Every handler authenticates first, then
validates its input, then checks privileges on the resource it names.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from treadmill.common import sshkeys
from treadmill.common.captoken import Access, CapabilitySigner, bearer_token
from treadmill.common.http import (
    ApiError,
    dumps,
    http_exception_error,
    read_json,
    respond,
    respond_error,
    respond_internal,
)
from treadmill.images.registry import canonical_store_url
from treadmill.protocol.results import ResultsError, check_patterns
from treadmill.protocol.supervisor import RESERVATION_PARAMETER
from treadmill.switchboard import credentials, repositories, schemas, views
from treadmill.switchboard.access import PRIVILEGES, Principal, effective
from treadmill.switchboard.audit import Recorder
from treadmill.switchboard.auth import Authenticator, PasswordGuard
from treadmill.switchboard.database import unavailable
from treadmill.switchboard.events import JobWatchers
from treadmill.switchboard.jobstate import InvalidTransition, Reason, State
from treadmill.switchboard.store import Store
from treadmill.switchboard.store.errors import Conflict, NotFound
from treadmill.switchboard.store.jobs import JobSpec


@dataclass(frozen=True)
class Limits:
    """Configured bounds and defaults of the API."""

    default_token_ttl: float = 30 * 24 * 3600
    default_timeout: float = 3600
    max_timeout: float = 7 * 24 * 3600
    default_queue_timeout: float = 24 * 3600
    max_queue_timeout: float = 30 * 24 * 3600
    max_page: int = 500
    keepalive: float = 15.0
    log_servers: tuple[str, ...] = ()
    log_replicas: int = 2
    log_service: str = "treadmill-logserver"
    log_read_ttl: float = 3600.0
    proxy_service: str = "treadmill-proxy"
    console_token_ttl: float = 300.0
    image_history: int = 50


def _uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ApiError(404, f"no {what} {value}") from None


def _arg(request: IRequest, name: str) -> str | None:
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, f"{name}: not UTF-8") from None


def _int_arg(request: IRequest, name: str, default: int, low: int, high: int) -> int:
    raw = _arg(request, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: expected an integer") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name}: must be between {low} and {high}")
    return value


def _patterns(body: dict[str, Any]) -> dict[str, str] | None:
    """A body's console patterns (``results``), compiled and checked (docs/results.md)."""
    patterns = body.get("results")
    if patterns is None:
        return None
    try:
        return check_patterns(patterns)
    except ResultsError as e:
        raise ApiError(400, str(e)) from None


def _encode_cursor(seq: int, tag: str = "j") -> str:
    return base64.urlsafe_b64encode(f"{tag}{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, tag: str = "j") -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith(tag) or not 0 <= int(raw[1:]) < 2 ** 63:
            raise ValueError(raw)
        return int(raw[1:])
    except ValueError:
        raise ApiError(400, "cursor: not a cursor this API issued") from None


def _uuid_arg(value: str, name: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ApiError(400, f"{name}: not a job id") from None


_ID_PREFIX = re.compile(r"[0-9a-fA-F-]{1,36}")
MAX_SSH_KEYS = 32
"""SSH public keys a user may register."""


def _id_range(prefix: str) -> tuple[str, str]:
    """The lowest and highest UUIDs starting with ``prefix`` (hex digits, dashes ignored)."""
    digits = prefix.replace("-", "").lower()
    if not _ID_PREFIX.fullmatch(prefix) or not digits or len(digits) > 32:
        raise ApiError(400, "id_prefix: expected 1 to 32 hexadecimal digits of a job id")

    def uuid_of(hex32: str) -> str:
        return str(uuid.UUID(hex32))

    return uuid_of(digits.ljust(32, "0")), uuid_of(digits.ljust(32, "f"))


_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")


def _idempotency_key(request: IRequest) -> str | None:
    """The request's ``Idempotency-Key`` header (1 to 255 printable ASCII characters)."""
    values = request.requestHeaders.getRawHeaders(b"idempotency-key")
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, "Idempotency-Key: send it once")
    try:
        key = values[0].decode("ascii")
    except UnicodeDecodeError:
        key = ""
    if not _IDEMPOTENCY_KEY.fullmatch(key) or not key.strip():
        raise ApiError(400, "Idempotency-Key: 1 to 255 printable ASCII characters")
    return key


def dumps_canonical(value: Any) -> bytes:
    """``value`` as JSON with sorted keys: equal requests, equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def _require(held: frozenset[str], privilege: str, what: str) -> None:
    if privilege not in held:
        raise ApiError(403, f"you may not {privilege} {what}")


Handler = Callable[..., Awaitable[Any]]

RETRY_AFTER = b"2"
"""Seconds a client waits before retrying a ``503`` (the database reconnects within one)."""


class SwitchboardAPI:
    """Routes of ``/api/v1`` and the public well-known endpoints."""

    app = Klein()
    log = Logger()

    def __init__(self, reactor: Any, store: Store, authenticator: Authenticator,
                 signer: CapabilitySigner, watchers: JobWatchers, limits: Limits | None = None,
                 supervisor_resource: Any = None, passwords: PasswordGuard | None = None):
        self.reactor = reactor
        self.store = store
        self.auth = authenticator
        self.signer = signer
        self.watchers = watchers
        self.limits = limits or Limits()
        self.supervisor_resource = supervisor_resource
        self.passwords = passwords or PasswordGuard(reactor)
        self.audit = Recorder(store, self.passwords.trusted_proxies)
        self._openapi: bytes | None = None

    def resource(self) -> Any:
        return self.app.resource()

    # -- errors ------------------------------------------------------------

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        return respond_error(request, failure.value)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return respond_error(request, ApiError(404, str(failure.value)))

    @app.handle_errors(Conflict, InvalidTransition)
    def _conflict(self, request: IRequest, failure: Failure) -> bytes:
        return respond_error(request, ApiError(409, str(failure.value)))

    @app.handle_errors(HTTPException)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        return respond_error(request, http_exception_error(failure.value))

    @app.handle_errors(CancelledError)
    def _cancelled(self, request: IRequest, failure: Failure) -> bytes:
        # The client went away while we waited; there is no one to answer.
        return b""

    @app.handle_errors(Exception)
    def _internal(self, request: IRequest, failure: Failure) -> bytes:
        if unavailable(failure):
            return self._unavailable(request, failure)
        return respond_internal(request, failure, self.log)

    def _unavailable(self, request: IRequest, failure: Failure) -> bytes:
        """``503`` with ``Retry-After`` while the database is away: one line, no traceback."""
        lines = str(failure.value).strip().splitlines()
        self.log.warn("{method} {path}: 503, the database is unavailable ({error})",
                      method=request.method.decode("ascii", "replace"),
                      path=request.path.decode("ascii", "replace"),
                      error=f"{type(failure.value).__name__}: {lines[0]}" if lines
                      else type(failure.value).__name__)
        request.setHeader(b"retry-after", RETRY_AFTER)
        return respond_error(request, ApiError(503, "the database is unavailable; "
                                                    "try again later"))

    # -- public ----------------------------------------------------------------

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request: IRequest) -> bytes:
        try:
            await self.store.ping()
        except Exception as e:
            request.setHeader(b"retry-after", RETRY_AFTER)
            raise ApiError(503, f"database unavailable: {type(e).__name__}") from None
        return respond(request, {"status": "ok"})

    @app.route("/api/v1/openapi.json", methods=["GET"])
    def openapi_document(self, request: IRequest) -> bytes:
        """The OpenAPI description of this API (the same as docs/openapi.json)."""
        if self._openapi is None:
            from treadmill.switchboard import openapi  # it imports this module

            self._openapi = openapi.render(openapi.build()).encode("utf-8")
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"public, max-age=300")
        return self._openapi

    @app.route("/.well-known/treadmill/capability-keys", methods=["GET"])
    def capability_keys(self, request: IRequest) -> bytes:
        return respond(request, self.signer.jwks())

    @app.route("/api/v1/supervisor", methods=["GET"])
    def supervisor_link(self, request: IRequest) -> Any:
        """The supervisors' WebSocket (docs/protocol.md); authenticated by host token."""
        if self.supervisor_resource is None:
            raise ApiError(503, "supervisor links are not served here")
        return self.supervisor_resource

    # -- registry tokens (image stores) ------------------------------------------

    @app.route("/api/v1/registry/token", methods=["GET"])
    async def registry_token(self, request: IRequest) -> bytes:
        """Docker registry token flow: a capability token for image store access."""
        service = _arg(request, "service")
        if service is None or not repositories.SERVICE.fullmatch(service):
            raise ApiError(400, "service: the image store's service name is required")
        try:
            scopes = repositories.parse_scopes(
                [value.decode("utf-8") for value in request.args.get(b"scope", [])])
        except UnicodeDecodeError:
            raise ApiError(400, "scope: not UTF-8") from None
        except repositories.ScopeError as e:
            raise ApiError(400, str(e)) from None
        if await self.store.image_store_by_service(service) is None:
            # A token's audience is one registered store: no token for anything else.
            raise ApiError(400, f"service: no image store is registered as {service!r}")
        subject, granted = await self._registry_grants(request, scopes)
        token = self.signer.sign(subject, service, granted, repositories.TOKEN_TTL)
        issued = datetime.fromtimestamp(self.reactor.seconds(), UTC)
        return respond(request, {"token": token, "access_token": token,
                                 "expires_in": int(repositories.TOKEN_TTL), "issued_at": issued})

    async def _registry_grants(self, request: IRequest, scopes: list[repositories.Scope]
                               ) -> tuple[str, list[Access]]:
        header = request.getHeader("authorization") or ""
        scheme, _, value = header.partition(" ")
        user, secret = None, value.strip()
        if scheme.lower() == "basic":
            try:
                user, _, secret = base64.b64decode(value.strip(), validate=True
                                                   ).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                raise ApiError(401, "malformed Basic credentials") from None
        elif scheme.lower() != "bearer":
            if header:
                raise ApiError(401, "use Basic or Bearer credentials")
            return "anonymous", []
        if credentials.looks_like_token(secret, credentials.HOST_TOKEN_PREFIX):
            host = await self.store.host_by_token(credentials.token_hash(secret))
            if host is None:
                raise ApiError(401, "unknown host token")
            running = frozenset(repositories.repository_of(name) for name in
                                await self.store.job_image_names(host["id"]))
            snapshots = frozenset(await self.store.snapshot_repositories(host["id"]))
            return f"host:{host['name']}", [
                a for s in scopes if (a := repositories.access(s, repositories.host_actions(
                    s, running, snapshots))) is not None]
        if credentials.looks_like_token(secret, credentials.USER_TOKEN_PREFIX):
            principal = await self.auth.for_token(secret)
            if user and user.lower() != principal.name.lower():
                raise ApiError(401, "the token belongs to another user")
        elif user:
            row = await self._check_password(request, user, secret)
            principal = Principal(row["id"], row["name"], row["admin"])
        else:
            raise ApiError(401, "invalid credentials")
        images: set[str] = set()
        namespaces: dict[str, frozenset[str]] = {}
        if not principal.admin and scopes:
            images = set(await self.store.readable_repositories(principal))
            namespaces = await self.store.namespace_grants(principal.user_id)
        granted = []
        for scope in scopes:
            actions = repositories.user_actions(scope, principal.name, principal.admin,
                                                images, namespaces)
            if (item := repositories.access(scope, actions)) is not None:
                granted.append(item)
        return principal.name, granted

    async def _check_writable(self, principal: Principal, name: str) -> None:
        """403 unless ``principal`` may write the repository of image ``name``."""
        if principal.admin:
            return
        repository = repositories.repository_of(name)
        namespaces = await self.store.namespace_grants(principal.user_id)
        if not repositories.may_write(repository, principal.name, False, namespaces):
            own = principal.name.lower()
            raise ApiError(403, f"{name!r} is outside your namespaces: use {own}/NAME, or a "
                                "namespace an admin granted you (top-level names and other "
                                "users' namespaces are for admins)")

    async def _name_taken(self, principal: Principal, name: str) -> ApiError:
        """The 409 for a taken image name: its spelling only to those who may see it.

        Whether the holder is invisible or absent from the caller's view, the
        answer is the same, so that it tells nothing about private images.
        """
        try:
            row = await self.store.get_image(name, principal)
        except NotFound:
            row = None
        if row is None or not effective("image", principal, row["owner_id"], row["grants"]):
            return ApiError(409, f"image name {name!r} is not available")
        return ApiError(409, f"image {row['name']!r} already exists")

    # -- registered image stores -------------------------------------------------

    @app.route("/api/v1/stores", methods=["GET"])
    async def list_stores(self, request: IRequest) -> bytes:
        """The registered image stores: for every user, and for hosts (host token)."""
        token = bearer_token(request.getHeader("authorization"))
        if token is not None and credentials.looks_like_token(
                token, credentials.HOST_TOKEN_PREFIX):
            if await self.store.host_by_token(credentials.token_hash(token)) is None:
                raise ApiError(401, "unknown host token")
        else:
            await self.auth.principal(request)
        rows = await self.store.list_image_stores()
        return respond(request, {"stores": [views.image_store(row) for row in rows]})

    @app.route("/api/v1/stores", methods=["POST"])
    async def create_store(self, request: IRequest) -> bytes:
        principal = await self._admin(request)
        body = read_json(request, schemas.STORE_CREATE)
        try:
            url = canonical_store_url(body["url"])
        except ValueError as e:
            raise ApiError(400, f"url: {e}") from None
        row = await self.store.audited(
            lambda store: store.create_image_store(url, body["service"],
                                                   body.get("description", ""),
                                                   body.get("cache", False)),
            lambda row: self.audit.entry(request, principal, "store.add", "store",
                                         row["service"], url=row["url"], cache=row["cache"]))
        return respond(request, views.image_store(row), 201)

    @app.route("/api/v1/stores/<service>", methods=["DELETE"])
    async def delete_store(self, request: IRequest, service: str) -> bytes:
        principal = await self._admin(request)
        await self.store.audited(
            lambda store: store.delete_image_store(service),
            lambda _: self.audit.entry(request, principal, "store.remove", "store", service))
        request.setResponseCode(204)
        return b""

    async def _registered(self, field: str, urls: list[str]) -> list[str]:
        """``urls`` in canonical form, or a 400 naming the first one not registered."""
        registered = {row["url"] for row in await self.store.list_image_stores()}
        canonical = []
        for url in urls:
            try:
                key = canonical_store_url(url)
            except ValueError as e:
                raise ApiError(400, f"{field}: {e}") from None
            if key not in registered:
                raise ApiError(400, f"{field}: {url!r} is not a registered image store "
                                    "(see GET /api/v1/stores)")
            if key not in canonical:
                canonical.append(key)
        return canonical

    # -- identity --------------------------------------------------------------

    @app.route("/api/v1/whoami", methods=["GET"])
    async def whoami(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        return respond(request, views.user(await self.store.get_user(principal.name)))

    @app.route("/api/v1/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        body = read_json(request, schemas.LOGIN)
        row = await self._check_password(request, body["user"], body["password"])
        ttl = self._ttl(body, admin=row["admin"])
        return await self._issue_token(request, row["id"], body.get("label", "login"), ttl,
                                       actor=row["name"], action="login")

    async def _check_password(self, request: IRequest, user: str, password: str) -> dict:
        """The user's row if ``password`` is theirs; ``429`` over the rate limits, before
        any work; else ``401``."""
        spent = self.passwords.admit(request, user)
        try:
            row = await self.store.get_user(user)
        except NotFound:
            row = None
        encoded = row["password_hash"] if row is not None and not row["disabled"] else None
        if not await self.passwords.verify(password, encoded):
            if row is not None:  # attempts on an account its user may see
                await self.audit.record(request, row["name"], "login.failure", "user",
                                        row["name"], subject_user=row["name"])
            raise ApiError(401, "wrong user name or password")
        assert row is not None
        self.passwords.succeeded(spent)
        return row

    def _ttl(self, body: dict[str, Any], admin: bool) -> float | None:
        if "expires_in" not in body:
            return self.limits.default_token_ttl
        ttl = body["expires_in"]
        if ttl is None and not admin:
            raise ApiError(403, "only admins may create tokens that never expire")
        return ttl

    async def _issue_token(self, request: IRequest, user_id: int, label: str,
                           ttl: float | None, actor: Principal | str,
                           action: str = "token.create") -> bytes:
        secret = credentials.new_token(credentials.USER_TOKEN_PREFIX)
        row = await self.store.audited(
            lambda store: store.create_token(user_id, credentials.token_hash(secret), label,
                                             ttl),
            lambda row: self.audit.entry(request, actor, action, "user", row["user"],
                                         subject_user=row["user"], token_id=str(row["id"]),
                                         label=label, expires_at=row["expires_at"]))
        return respond(request, {**views.token(row), "token": secret}, 201)

    @app.route("/api/v1/tokens", methods=["GET"])
    async def list_tokens(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        user_id = await self._target_user(principal, _arg(request, "user"))
        rows = await self.store.list_tokens(user_id)
        return respond(request, {"tokens": [views.token(row) for row in rows]})

    async def _target_user(self, principal: Principal, name: str | None) -> int:
        if name is None or name.lower() == principal.name.lower():
            return principal.user_id
        if not principal.admin:
            raise ApiError(403, "only admins may act on other users' tokens")
        return await self.store.user_id(name)

    @app.route("/api/v1/tokens", methods=["POST"])
    async def create_token(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        body = read_json(request, schemas.TOKEN_CREATE, empty=dict)
        user_id = await self._target_user(principal, body.get("user"))
        ttl = self._ttl(body, admin=principal.admin)
        return await self._issue_token(request, user_id, body.get("label", ""), ttl,
                                       actor=principal)

    @app.route("/api/v1/tokens/<token_id>", methods=["DELETE"])
    async def revoke_token(self, request: IRequest, token_id: str) -> bytes:
        principal = await self.auth.principal(request)
        token_id = _uuid(token_id, "token")
        row = await self.store.get_token(token_id)
        if row["user_id"] != principal.user_id and not principal.admin:
            raise ApiError(404, "no such token")
        row = await self.store.audited(
            lambda store: store.revoke_token(token_id),
            lambda row: self.audit.entry(request, principal, "token.revoke", "user",
                                         row["user"], subject_user=row["user"],
                                         token_id=str(row["id"]), label=row["label"]))
        self.auth.invalidate()
        return respond(request, views.token(row))

    @app.route("/api/v1/keys", methods=["GET"])
    async def list_ssh_keys(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        user_id = await self._key_owner(principal, _arg(request, "user"))
        rows = await self.store.list_ssh_keys(user_id)
        return respond(request, {"keys": [views.ssh_key(row) for row in rows]})

    @app.route("/api/v1/keys", methods=["POST"])
    async def add_ssh_key(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        body = read_json(request, schemas.SSH_KEY_CREATE)
        user_id = await self._key_owner(principal, _arg(request, "user"))
        try:
            key = sshkeys.parse(body["key"])
        except sshkeys.BadKey as e:
            raise ApiError(400, str(e)) from None
        row = await self.store.audited(
            lambda store: store.add_ssh_key(user_id, key.type, key.body, key.comment,
                                            key.fingerprint, MAX_SSH_KEYS),
            lambda row: self.audit.entry(request, principal, "key.add", "user", row["user"],
                                         subject_user=row["user"], key_id=str(row["id"]),
                                         fingerprint=row["fingerprint"]))
        return respond(request, views.ssh_key(row), 201)

    async def _key_owner(self, principal: Principal, name: str | None) -> int:
        if name is not None and name.lower() != principal.name.lower() and not principal.admin:
            raise ApiError(403, "only admins may act on other users' SSH keys")
        return await self._target_user(principal, name)

    @app.route("/api/v1/keys/<key_id>", methods=["DELETE"])
    async def delete_ssh_key(self, request: IRequest, key_id: str) -> bytes:
        principal = await self.auth.principal(request)
        key_id = _uuid(key_id, "SSH key")
        row = await self.store.audited(
            lambda store: store.delete_ssh_key(None if principal.admin else principal.user_id,
                                               key_id),
            lambda row: self.audit.entry(request, principal, "key.remove", "user", row["user"],
                                         subject_user=row["user"], key_id=str(row["id"]),
                                         fingerprint=row["fingerprint"]))
        return respond(request, views.ssh_key(row))

    @app.route("/api/v1/users", methods=["GET"])
    async def list_users(self, request: IRequest) -> bytes:
        await self._admin(request)
        return respond(request, {"users": [views.user(r) for r in await self.store.list_users()]})

    async def _admin(self, request: IRequest) -> Principal:
        principal = await self.auth.principal(request)
        if not principal.admin:
            raise ApiError(403, "only admins may do this")
        return principal

    @app.route("/api/v1/users", methods=["POST"])
    async def create_user(self, request: IRequest) -> bytes:
        principal = await self._admin(request)
        body = read_json(request, schemas.USER_CREATE)
        taken = await self.store.namespace_images(body["name"])
        if taken:
            raise ApiError(409, f"user {body['name']!r} would own namespace "
                                f"{body['name'].lower()!r}, which holds other users' images "
                                f"({', '.join(taken)}); choose another name")
        password_hash = None
        if "password" in body:
            password_hash = await self.passwords.hash(body["password"])
        row = await self.store.create_user(body["name"], body.get("admin", False), password_hash)
        await self.audit.record(request, principal, "user.create", "user", row["name"],
                                subject_user=row["name"], admin=row["admin"],
                                password="password" in body)
        return respond(request, views.user(row), 201)

    @app.route("/api/v1/users/<name>", methods=["GET"])
    async def show_user(self, request: IRequest, name: str) -> bytes:
        principal = await self.auth.principal(request)
        if name.lower() != principal.name.lower() and not principal.admin:
            raise ApiError(403, "only admins may read other users")
        return respond(request, views.user(await self.store.get_user(name)))

    @app.route("/api/v1/users/<name>", methods=["PATCH"])
    async def update_user(self, request: IRequest, name: str) -> bytes:
        principal = await self.auth.principal(request)
        body = read_json(request, schemas.USER_UPDATE)
        if not principal.admin:
            if name.lower() != principal.name.lower():
                raise ApiError(403, "only admins may change other users")
            if set(body) - {"password"}:
                raise ApiError(403, "only admins may change admin or disabled")
        password_hash = None
        if "password" in body:
            password_hash = await self.passwords.hash(body["password"])
        changes = {key: body[key] for key in ("admin", "disabled") if key in body}
        row = await self.store.audited(
            lambda store: store.update_user(name, admin=body.get("admin"),
                                            disabled=body.get("disabled"),
                                            password_hash=password_hash),
            lambda row: self.audit.entry(request, principal, "user.update", "user",
                                         row["name"], subject_user=row["name"],
                                         password="password" in body, **changes))
        self.auth.invalidate()
        return respond(request, views.user(row))

    # -- hosts -------------------------------------------------------------------

    async def _host(self, request: IRequest, name: str, privilege: str) -> tuple[Principal, dict]:
        principal = await self.auth.principal(request)
        row = await self.store.get_host(name, principal)
        held = effective("host", principal, row["owner_id"], row["grants"])
        if not held:
            raise ApiError(404, f"no host {name!r}")
        _require(held, privilege, f"host {name!r}")
        return principal, row

    @app.route("/api/v1/hosts", methods=["GET"])
    async def list_hosts(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        rows = await self.store.list_hosts(principal)
        return respond(request, {"hosts": [views.host(row) for row in rows]})

    @app.route("/api/v1/hosts", methods=["POST"])
    async def create_host(self, request: IRequest) -> bytes:
        principal = await self._admin(request)
        body = read_json(request, schemas.HOST_CREATE)
        owner_id = await self.store.user_id(body["owner"]) if "owner" in body else None
        secret = credentials.new_token(credentials.HOST_TOKEN_PREFIX)

        async def create(store: Store) -> dict:
            await store.create_host(body["name"], body.get("tags", []), owner_id,
                                    body.get("description", ""), credentials.token_hash(secret))
            return await store.get_host(body["name"], principal)

        row = await self.store.audited(create, lambda row: self.audit.entry(
            request, principal, "host.create", "host", row["name"], tags=row["tags"],
            owner=row["owner"]))
        return respond(request, {**views.host(row), "token": secret}, 201)

    @app.route("/api/v1/hosts/<name>", methods=["GET"])
    async def show_host(self, request: IRequest, name: str) -> bytes:
        _, row = await self._host(request, name, "read")
        return respond(request, views.host(row))

    async def _update_host(self, request: IRequest, name: str, action: str,
                           **changes: Any) -> bytes:
        principal, _ = await self._host(request, name, "manage")

        async def update(store: Store) -> dict:
            await store.update_host(name, **changes)
            return await store.get_host(name, principal)

        row = await self.store.audited(update, lambda row: self.audit.entry(
            request, principal, action, "host", row["name"],
            **({"tags": row["tags"]} if "tags" in changes else {})))
        return respond(request, views.host(row))

    @app.route("/api/v1/hosts/<name>/tags", methods=["PUT"])
    async def set_host_tags(self, request: IRequest, name: str) -> bytes:
        body = read_json(request, schemas.HOST_TAGS)
        return await self._update_host(request, name, "host.tags", tags=body["tags"])

    @app.route("/api/v1/hosts/<name>/drain", methods=["POST"])
    async def drain_host(self, request: IRequest, name: str) -> bytes:
        return await self._update_host(request, name, "host.drain", enabled=False)

    @app.route("/api/v1/hosts/<name>/enable", methods=["POST"])
    async def enable_host(self, request: IRequest, name: str) -> bytes:
        return await self._update_host(request, name, "host.enable", enabled=True,
                                       reset_health=True)

    @app.route("/api/v1/hosts/<name>/token", methods=["POST"])
    async def host_token(self, request: IRequest, name: str) -> bytes:
        principal = await self._admin(request)
        secret = credentials.new_token(credentials.HOST_TOKEN_PREFIX)

        async def replace(store: Store) -> dict:
            await store.update_host(name, digest=credentials.token_hash(secret))
            return await store.get_host(name, principal)

        row = await self.store.audited(replace, lambda row: self.audit.entry(
            request, principal, "host.token", "host", row["name"]))
        return respond(request, {**views.host(row), "token": secret})

    @app.route("/api/v1/hosts/<name>", methods=["DELETE"])
    async def delete_host(self, request: IRequest, name: str) -> bytes:
        principal = await self._admin(request)
        await self.store.audited(
            lambda store: store.delete_host(name),
            lambda _: self.audit.entry(request, principal, "host.delete", "host", name))
        request.setResponseCode(204)
        return b""

    # -- images ------------------------------------------------------------------

    async def _image(self, request: IRequest, name: str, privilege: str
                     ) -> tuple[Principal, dict]:
        principal = await self.auth.principal(request)
        row = await self.store.get_image(name, principal)
        held = effective("image", principal, row["owner_id"], row["grants"])
        if not held:
            raise ApiError(404, f"no image {name!r}")
        _require(held, privilege, f"image {name!r}")
        return principal, row

    @app.route("/api/v1/images", methods=["GET"])
    async def list_images(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        rows = await self.store.list_images(principal)
        return respond(request, {"images": [views.image(row) for row in rows]})

    @app.route("/api/v1/images", methods=["POST"])
    async def create_image(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        body = read_json(request, schemas.IMAGE_CREATE)
        await self._check_writable(principal, body["name"])
        stores = await self._registered("stores", body["stores"])
        try:
            await self.store.create_image(body["name"], body["digest"], stores,
                                          principal.user_id, body.get("description", ""),
                                          body.get("host_tags", ()), _patterns(body),
                                          body.get("kind"))
        except Conflict:
            raise await self._name_taken(principal, body["name"]) from None
        row = await self.store.get_image(body["name"], principal)
        await self.audit.record(request, principal, "image.create", "image", row["name"],
                                digest=row["digest"], stores=row["stores"])
        return respond(request, views.image(row), 201)

    @app.route("/api/v1/images/<path:name>", methods=["GET"])
    async def show_image(self, request: IRequest, name: str) -> bytes:
        if name.endswith("/grants"):
            return await self._image_grants_dispatch(request, name)
        _, row = await self._image(request, name, "use")
        return respond(request, views.image(row))

    @app.route("/api/v1/images/<path:name>/history", methods=["GET"])
    async def image_history(self, request: IRequest, name: str) -> bytes:
        _, row = await self._image(request, name, "use")
        rows = await self.store.image_history(row["id"])
        return respond(request, {"name": row["name"], "current": row["digest"],
                                 "versions": [views.image_version(r) for r in rows]})

    @app.route("/api/v1/images/<path:name>/rollback", methods=["POST"])
    async def rollback_image(self, request: IRequest, name: str) -> bytes:
        principal, row = await self._image(request, name, "manage")
        body = read_json(request, schemas.IMAGE_ROLLBACK)

        async def rollback(store: Store) -> dict:
            await store.rollback_image(row["name"], body["version"], principal.user_id,
                                       keep=self.limits.image_history)
            return await store.get_image(name, principal)

        row = await self.store.audited(rollback, lambda row: self.audit.entry(
            request, principal, "image.rollback", "image", row["name"],
            version=body["version"], digest=row["digest"]))
        return respond(request, views.image(row))

    @app.route("/api/v1/images/<path:name>", methods=["PUT"])
    async def update_image(self, request: IRequest, name: str) -> bytes:
        principal, _ = await self._image(request, name, "manage")
        body = read_json(request, schemas.IMAGE_UPDATE)
        stores = await self._registered("stores", body["stores"]) if "stores" in body else None
        results = _patterns(body) if "results" in body else False

        async def update(store: Store) -> dict:
            await store.update_image(name, digest=body.get("digest"), stores=stores,
                                     description=body.get("description"),
                                     host_tags=body.get("host_tags"), results=results,
                                     kind=body.get("kind"), by=principal.user_id,
                                     keep=self.limits.image_history)
            return await store.get_image(name, principal)

        row = await self.store.audited(update, lambda row: self.audit.entry(
            request, principal, "image.update", "image", row["name"], changed=sorted(body),
            digest=row["digest"]))
        return respond(request, views.image(row))

    @app.route("/api/v1/images/<path:name>", methods=["DELETE"])
    async def delete_image(self, request: IRequest, name: str) -> bytes:
        if "/grants/" in name:
            return await self._image_grants_dispatch(request, name)
        principal, row = await self._image(request, name, "manage")
        await self.store.audited(
            lambda store: store.delete_image(name),
            lambda _: self.audit.entry(request, principal, "image.delete", "image",
                                       row["name"], digest=row["digest"]))
        request.setResponseCode(204)
        return b""

    @app.route("/api/v1/images/<path:name>", methods=["POST"])
    async def post_image_path(self, request: IRequest, name: str) -> bytes:
        if name.endswith("/grants"):
            return await self._image_grants_dispatch(request, name)
        raise ApiError(405, "method not allowed")

    async def _image_grants_dispatch(self, request: IRequest, path: str) -> bytes:
        # Image names may contain "/", so their grant routes are parsed here:
        # NAME/grants (GET, POST) and NAME/grants/USER/PRIVILEGE (DELETE). No
        # image name has a segment "grants" (schemas.IMAGE_NAME_PATTERN).
        parts = path.split("/")
        method = request.method.decode()
        if len(parts) >= 2 and parts[-1] == "grants" and method in ("GET", "POST"):
            principal, row = await self._image(request, "/".join(parts[:-1]), "manage")
            return await self._grants(request, method, "image", row["id"],
                                      (principal, row["name"]))
        if len(parts) >= 4 and parts[-3] == "grants" and method == "DELETE":
            principal, row = await self._image(request, "/".join(parts[:-3]), "manage")
            return await self._revoke(request, "image", row["id"], parts[-2], parts[-1],
                                      (principal, row["name"]))
        raise ApiError(404, "no such endpoint")

    # -- grants --------------------------------------------------------------------

    async def _grant_target(self, request: IRequest, collection: str, ident: str
                            ) -> tuple[str, Any, tuple[Principal, str]]:
        """The kind and id of the resource, and who acts on it (named) for the audit log."""
        if collection == "hosts":
            principal, row = await self._host(request, ident, "manage")
            return "host", row["id"], (principal, row["name"])
        if collection == "jobs":
            principal, row = await self._job(request, ident, "manage")
            return "job", row["id"], (principal, str(row["id"]))
        if collection == "images":
            principal, row = await self._image(request, ident, "manage")
            return "image", row["id"], (principal, row["name"])
        raise ApiError(404, "no such endpoint")

    @app.route("/api/v1/<collection>/<ident>/grants", methods=["GET", "POST"])
    async def grants(self, request: IRequest, collection: str, ident: str) -> bytes:
        kind, resource_id, audited = await self._grant_target(request, collection, ident)
        return await self._grants(request, request.method.decode(), kind, resource_id, audited)

    async def _grants(self, request: IRequest, method: str, kind: str, resource_id: Any,
                      audited: tuple[Principal, str]) -> bytes:
        if method == "GET":
            rows = await self.store.list_grants(kind, resource_id)
            return respond(request, {"grants": [views.grant(row) for row in rows]})
        body = read_json(request, schemas.GRANT)
        if body["privilege"] not in PRIVILEGES[kind]:
            raise ApiError(400, f"privilege: {kind}s have {', '.join(PRIVILEGES[kind])}")
        user_id = None if body["user"] == "*" else await self.store.user_id(body["user"])
        row = await self.store.audited(
            lambda store: store.add_grant(kind, resource_id, user_id, body["privilege"]),
            lambda _: self._grant_entry(request, audited, "add", kind, body["user"],
                                        body["privilege"]))
        return respond(request, views.grant({**row, "user": body["user"]}), 201)

    def _grant_entry(self, request: IRequest, audited: tuple[Principal, str], what: str,
                     kind: str, user: str, privilege: str) -> Any:
        principal, subject = audited
        if kind == "namespace":
            action = "namespace.grant" if what == "add" else "namespace.revoke"
        else:
            action = f"grant.{what}"
        return self.audit.entry(request, principal, action, kind, subject,
                                subject_user=None if user == "*" else user, user=user,
                                privilege=privilege)

    @app.route("/api/v1/<collection>/<ident>/grants/<user>/<privilege>", methods=["DELETE"])
    async def revoke_grant(self, request: IRequest, collection: str, ident: str, user: str,
                           privilege: str) -> bytes:
        kind, resource_id, audited = await self._grant_target(request, collection, ident)
        return await self._revoke(request, kind, resource_id, user, privilege, audited)

    async def _revoke(self, request: IRequest, kind: str, resource_id: Any, user: str,
                      privilege: str, audited: tuple[Principal, str]) -> bytes:
        user_id = None if user == "*" else await self.store.user_id(user)
        await self.store.audited(
            lambda store: store.remove_grant(kind, resource_id, user_id, privilege),
            lambda _: self._grant_entry(request, audited, "remove", kind, user, privilege))
        request.setResponseCode(204)
        return b""

    # -- namespace grants (admin) -------------------------------------------------

    @staticmethod
    def _namespace(name: str) -> str:
        canonical = name.lower()
        if len(canonical) > 128 or not repositories.NAMESPACE.fullmatch(canonical):
            raise ApiError(400, f"namespace: {name[:130]!r} is not a namespace (a repository's "
                                "first component: lower-case letters and digits joined by "
                                "'.', '_', '__' or dashes)")
        return canonical

    @app.route("/api/v1/namespaces/<namespace>/grants", methods=["GET", "POST"])
    async def namespace_grants(self, request: IRequest, namespace: str) -> bytes:
        """Grants on a repository namespace: ``use`` pulls in it, ``manage`` also pushes,
        deletes and registers catalogue images there."""
        principal = await self._admin(request)
        canonical = self._namespace(namespace)
        return await self._grants(request, request.method.decode(), "namespace", canonical,
                                  (principal, canonical))

    @app.route("/api/v1/namespaces/<namespace>/grants/<user>/<privilege>", methods=["DELETE"])
    async def revoke_namespace_grant(self, request: IRequest, namespace: str, user: str,
                                     privilege: str) -> bytes:
        principal = await self._admin(request)
        canonical = self._namespace(namespace)
        return await self._revoke(request, "namespace", canonical, user, privilege,
                                  (principal, canonical))

    # -- audit log ------------------------------------------------------------------

    @app.route("/api/v1/audit", methods=["GET"])
    async def audit_log(self, request: IRequest) -> bytes:
        """Audit records, newest first: an admin's all, a user's those about themselves
        and the jobs, hosts and images they may read (docs/api.md, "Audit log")."""
        principal = await self.auth.principal(request)
        limit = _int_arg(request, "limit", 100, 1, self.limits.max_page)
        filters: dict[str, Any] = {}
        for name in ("user", "host", "image", "action"):
            value = _arg(request, name)
            if value is not None:
                if not value or len(value) > 256 or "\x00" in value:
                    raise ApiError(400, f"{name}: between 1 and 256 characters")
                filters[name] = value
        job = _arg(request, "job")
        if job is not None:
            filters["job"] = _uuid_arg(job, "job")
        after = _arg(request, "after")
        if after is not None:
            try:
                moment = datetime.fromisoformat(after)
            except ValueError:
                raise ApiError(400, "after: not an RFC 3339 time") from None
            filters["after"] = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        cursor = _arg(request, "cursor")
        rows = await self.store.audit_list(
            principal, before_id=_decode_cursor(cursor, "a") if cursor else None,
            limit=limit + 1, **filters)
        page = rows[:limit]
        body: dict[str, Any] = {"entries": [views.audit_entry(row) for row in page]}
        if len(rows) > limit:
            body["next_cursor"] = _encode_cursor(page[-1]["id"], "a")
        return respond(request, body)

    # -- jobs ------------------------------------------------------------------------

    async def _job(self, request: IRequest, job_id: str, privilege: str
                   ) -> tuple[Principal, dict]:
        principal = await self.auth.principal(request)
        job_id = _uuid(job_id, "job")
        row = await self.store.get_job(job_id, principal)
        held = effective("job", principal, row["owner_id"], row["grants"])
        if not held:
            raise ApiError(404, f"no job {job_id}")
        _require(held, privilege, f"job {job_id}")
        return principal, row

    @app.route("/api/v1/jobs", methods=["POST"])
    async def enqueue(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        body = read_json(request, schemas.JOB_CREATE)
        key = _idempotency_key(request)
        if key is None:
            spec = await self._job_spec(principal, body)
            row = await self.store.enqueue(principal.user_id, spec)
            return respond(request, views.job(row), 201)
        # A retry (same user, key and body) gets the first answer, not a second job.
        fingerprint = hashlib.sha256(dumps_canonical(body)).digest()
        answer = await self.store.remembered_job(principal.user_id, key, fingerprint)
        if answer is None:
            spec = await self._job_spec(principal, body)
            answer = await self.store.enqueue_once(principal.user_id, spec, key, fingerprint,
                                                   views.job)
        return respond(request, answer, 201)

    async def _job_spec(self, principal: Principal, body: dict[str, Any]) -> JobSpec:
        limits = self.limits
        timeout = body.get("timeout", limits.default_timeout)
        if timeout > limits.max_timeout:
            raise ApiError(400, f"timeout: at most {limits.max_timeout:g} seconds")
        queue_timeout = body.get("queue_timeout", limits.default_queue_timeout)
        if queue_timeout > limits.max_queue_timeout:
            raise ApiError(400, f"queue_timeout: at most {limits.max_queue_timeout:g} seconds")
        image = body["image"]
        name: str | None
        default_tags: list[str] = []
        image_results = None
        kind: str | None = None
        if image.startswith("sha256:"):
            name, digest = None, image
            usable = [row for row in await self.store.images_by_digest(digest, principal)
                      if "use" in effective("image", principal, row["owner_id"], row["grants"])]
            stores = sorted({store for row in usable for store in row["stores"]})
            kinds = {row["kind"] for row in usable} - {None}
            kind = kinds.pop() if len(kinds) == 1 else None  # unknown: any host
        else:
            # An image that exists but is not the caller's to use answers exactly
            # like one that does not exist.
            refusal = ApiError(400, f"image: no image named {image!r} that you may use")
            try:
                row = await self.store.get_image(image, principal)
            except NotFound:
                raise refusal from None
            if "use" not in effective("image", principal, row["owner_id"], row["grants"]):
                raise refusal
            if not principal.admin and not await self.store.image_lends(row["name"]):
                raise ApiError(403, f"image: {row['name']!r} lies in another user's namespace "
                                    "that its owner may not write; an admin must move or "
                                    "re-register it")
            name, digest, stores = row["name"], row["digest"], row["stores"]
            default_tags, kind = row["host_tags"], row["kind"]
            image_results = row["results"]
        parameters = {key: {"value": p["value"], "secret": p.get("secret", False)}
                      for key, p in body.get("parameters", {}).items()}
        if RESERVATION_PARAMETER in parameters:
            raise ApiError(400, f"parameters.{RESERVATION_PARAMETER}: reserved; "
                                "ask for a reservation with \"reservation\": true")
        for key, p in parameters.items():
            if len(p["value"].encode("utf-8")) > 4096:
                raise ApiError(400, f"parameters.{key}.value: longer than 4 KiB in UTF-8")
        return JobSpec(image_name=name, image_digest=digest, image_stores=stores,
                       tags=body["tags"] if "tags" in body else default_tags,
                       parameters=parameters, timeout=timeout,
                       queue_timeout=queue_timeout, max_restarts=body.get("max_restarts", 0),
                       label=body.get("label", ""), log_servers=self._pick_log_servers(),
                       results=_patterns(body) or image_results, image_kind=kind,
                       reservation=body.get("reservation", False))

    def _pick_log_servers(self) -> tuple[str, ...]:
        """``log_replicas`` of the configured log servers, rotating the first choice."""
        servers = self.limits.log_servers
        if not servers:
            return ()
        self._log_rotation = (getattr(self, "_log_rotation", -1) + 1) % len(servers)
        count = min(self.limits.log_replicas, len(servers))
        return tuple(servers[(self._log_rotation + i) % len(servers)] for i in range(count))

    @app.route("/api/v1/jobs", methods=["GET"])
    async def list_jobs(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        limit = _int_arg(request, "limit", 100, 1, self.limits.max_page)
        try:
            states = [part.decode("utf-8") for value in request.args.get(b"state", [])
                      for part in value.split(b",")]
        except UnicodeDecodeError:
            raise ApiError(400, "state: not UTF-8") from None
        for state in states:
            if state not in State.__members__.values():
                raise ApiError(400, f"state: no state {state!r}")
        cursor = _arg(request, "cursor")
        prefix = _arg(request, "id_prefix")
        restart_of = _arg(request, "restart_of")
        rows = await self.store.list_jobs(
            principal, states=states, owner=_arg(request, "owner"),
            before_seq=_decode_cursor(cursor) if cursor else None, limit=limit + 1,
            id_range=_id_range(prefix) if prefix is not None else None,
            restart_of=_uuid_arg(restart_of, "restart_of") if restart_of is not None else None)
        page = rows[:limit]
        body: dict[str, Any] = {"jobs": [views.job(row) for row in page]}
        if len(rows) > limit:
            body["next_cursor"] = _encode_cursor(page[-1]["seq"])
        return respond(request, body)

    @app.route("/api/v1/jobs/<job_id>", methods=["GET"])
    async def show_job(self, request: IRequest, job_id: str) -> bytes:
        _, row = await self._job(request, job_id, "read")
        return respond(request, views.job(row))

    @app.route("/api/v1/jobs/<job_id>/terminate", methods=["POST"])
    async def terminate(self, request: IRequest, job_id: str) -> bytes:
        principal, row = await self._job(request, job_id, "stop")
        await self.store.audited(
            lambda store: store.request_termination(row["id"], Reason.USER_TERMINATED,
                                                    message=f"terminated by {principal.name}"),
            lambda changed: self.audit.entry(request, principal, "job.cancel", "job",
                                             row["id"], subject_user=row["owner"],
                                             state=row["state"], changed=changed))
        return respond(request, views.job(await self.store.get_job(row["id"], principal)))

    @app.route("/api/v1/jobs/<job_id>/extend", methods=["POST"])
    async def extend(self, request: IRequest, job_id: str) -> bytes:
        """Move a job's deadline later (a reservation's end): manage privilege."""
        principal, row = await self._job(request, job_id, "manage")
        body = read_json(request, schemas.JOB_EXTEND)
        try:
            await self.store.extend_job(row["id"], body["by"], self.limits.max_timeout)
        except Conflict:
            raise
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return respond(request, views.job(await self.store.get_job(row["id"], principal)))

    @app.route("/api/v1/jobs/<job_id>/snapshots", methods=["POST"])
    async def snapshot_job(self, request: IRequest, job_id: str) -> bytes:
        """Ask the job's host to upload the disk the ended job left as a new image.

        ``manage``, not ``stop``: the image is a copy of everything the job wrote."""
        principal, row = await self._job(request, job_id, "manage")
        body = read_json(request, schemas.SNAPSHOT_CREATE)
        if row["state"] != "terminated":
            raise ApiError(409, f"job {row['id']} has not ended; stop it first")
        if row["host_id"] is None:
            raise ApiError(409, f"job {row['id']} never ran on a host")
        stores = row["image_stores"] or []
        store = body.get("store") or (stores[0] if stores else None)
        if store is None:
            raise ApiError(400, "store: the job's image names no image store; give one")
        store = (await self._registered("store", [store]))[0]
        name = body["name"]
        repository = repositories.repository_of(name)
        if not repositories.REPOSITORY.fullmatch(repository):
            raise ApiError(400, f"name: {name!r} is not a valid repository name")
        await self._check_writable(principal, name)
        try:
            snapshot = await self.store.audited(
                lambda s: s.create_snapshot(row["id"], row["host_id"], principal.user_id, name,
                                            repository, store, body.get("description", "")),
                lambda snapshot: self.audit.entry(
                    request, principal, "job.snapshot", "job", row["id"],
                    subject_user=row["owner"], name=name, store=store,
                    snapshot=str(snapshot["id"])))
        except Conflict:
            # As for POST /images: nothing about whose image or snapshot holds it.
            raise ApiError(409, f"image name {name!r} is not available (an image or a "
                                "snapshot under way holds it)") from None
        return respond(request, views.snapshot(snapshot), 202)

    @app.route("/api/v1/jobs/<job_id>/snapshots", methods=["GET"])
    async def job_snapshots(self, request: IRequest, job_id: str) -> bytes:
        _, row = await self._job(request, job_id, "read")
        rows = await self.store.job_snapshots(row["id"])
        return respond(request, {"snapshots": [views.snapshot(r) for r in rows]})

    @app.route("/api/v1/jobs/<job_id>/snapshots/<snapshot_id>", methods=["GET"])
    async def show_snapshot(self, request: IRequest, job_id: str, snapshot_id: str) -> bytes:
        _, row = await self._job(request, job_id, "read")
        snapshot = await self.store.get_snapshot(row["id"], _uuid(snapshot_id, "snapshot"))
        return respond(request, views.snapshot(snapshot))

    @app.route("/api/v1/jobs/<job_id>/logs/token", methods=["POST"])
    async def job_logs_token(self, request: IRequest, job_id: str) -> bytes:
        """A short-lived read token for the job's logs, and where they are."""
        principal, row = await self._job(request, job_id, "read")
        ttl = self.limits.log_read_ttl
        token = self.signer.sign(principal.name, self.limits.log_service,
                                 [Access("job", row["id"], ("read",))], ttl)
        return respond(request, {"servers": row["log_servers"], "token": token,
                                 "expires_in": int(ttl)})

    @app.route("/api/v1/jobs/<job_id>/console-token", methods=["POST"])
    async def job_console_token(self, request: IRequest, job_id: str) -> bytes:
        """A short-lived token for the job's consoles on its proxies: ``read`` watches
        (needs read on the job), ``manage`` types (needs manage)."""
        body = read_json(request, schemas.CONSOLE_TOKEN, empty=dict)
        access = body.get("access", "manage")
        principal, row = await self._job(request, job_id, access)
        ttl = self.limits.console_token_ttl
        actions = ("read", "manage") if access == "manage" else ("read",)
        token = self.signer.sign(principal.name, self.limits.proxy_service,
                                 [Access("tunnel", row["id"], actions)], ttl)
        # The token's id (not a secret) is what the proxy logs with each connection.
        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        await self.audit.record(request, principal, "job.console_token", "job", row["id"],
                                subject_user=row["owner"], access=access,
                                expires_in=int(ttl), token_jti=jti)
        return respond(request, {"token": token, "access": access, "expires_in": int(ttl),
                                 "endpoints": row["endpoints"] or []})

    @app.route("/api/v1/jobs/<job_id>/events", methods=["GET"])
    async def job_events(self, request: IRequest, job_id: str) -> bytes:
        _, row = await self._job(request, job_id, "read")
        after = _int_arg(request, "after", 0, 0, 2**31 - 1)
        rows = await self.store.job_events(row["id"], after)
        return respond(request, {"events": [views.event(r) for r in rows]})

    @app.route("/api/v1/jobs/<job_id>/events/watch", methods=["GET"])
    async def watch_job(self, request: IRequest, job_id: str) -> Deferred[bytes]:
        _, row = await self._job(request, job_id, "read")
        after = _int_arg(request, "after", 0, 0, 2**31 - 1)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b": watching job events\n\n")
        return await ensureDeferred(self._stream_events(request, row["id"], after))

    async def _stream_events(self, request: IRequest, job_id: str, after: int) -> bytes:
        finished = [False]
        request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))
        try:
            async for event in self.watchers.events(job_id, after, self.limits.keepalive):
                if finished[0]:
                    break
                if event is None:
                    request.write(b": keepalive\n\n")
                    continue
                request.write(b"id: %d\nevent: job\ndata: %s\n\n" % (
                    event["seq"], dumps(views.event(event))))
        except Exception as e:
            if not unavailable(e):
                raise
            # The status line is gone: end the stream; the client reconnects with ?after=.
            self.log.warn("Watch of job {job} ended: the database is unavailable ({error})",
                          job=job_id, error=type(e).__name__)
            if not finished[0]:
                request.write(b": the database is unavailable\nretry: %d\n\n"
                              % (int(RETRY_AFTER) * 1000))
        return b""
