"""The switchboard's HTTP API (Klein), as documented in ``docs/api.md``.

State is injected: a test builds :class:`SwitchboardAPI` with a real store and
serves ``api.app.resource()``. Every handler authenticates first, then
validates its input, then checks privileges on the resource it names.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from treadmill.common.captoken import Access, CapabilitySigner
from treadmill.common.http import (
    ApiError,
    dumps,
    http_exception_error,
    read_json,
    respond,
    respond_error,
    respond_internal,
)
from treadmill.protocol.results import ResultsError, check_patterns
from treadmill.switchboard import credentials, registry, schemas, views
from treadmill.switchboard.access import PRIVILEGES, Principal, effective
from treadmill.switchboard.auth import Authenticator
from treadmill.switchboard.events import JobWatchers
from treadmill.switchboard.jobstate import InvalidTransition, Reason, State
from treadmill.switchboard.store import Conflict, JobSpec, NotFound, Store


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


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"j{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith("j"):
            raise ValueError(raw)
        return int(raw[1:])
    except ValueError:
        raise ApiError(400, "cursor: not a cursor this API issued") from None


def _require(held: frozenset[str], privilege: str, what: str) -> None:
    if privilege not in held:
        raise ApiError(403, f"you may not {privilege} {what}")


Handler = Callable[..., Awaitable[Any]]


class SwitchboardAPI:
    """Routes of ``/api/v1`` and the public well-known endpoints."""

    app = Klein()
    log = Logger()

    def __init__(self, reactor: Any, store: Store, authenticator: Authenticator,
                 signer: CapabilitySigner, watchers: JobWatchers, limits: Limits | None = None,
                 supervisor_resource: Any = None):
        self.reactor = reactor
        self.store = store
        self.auth = authenticator
        self.signer = signer
        self.watchers = watchers
        self.limits = limits or Limits()
        self.supervisor_resource = supervisor_resource

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
        return respond_internal(request, failure, self.log)

    # -- public ----------------------------------------------------------------

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request: IRequest) -> bytes:
        try:
            await self.store.ping()
        except Exception as e:
            raise ApiError(503, f"database unavailable: {type(e).__name__}") from None
        return respond(request, {"status": "ok"})

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
        if service is None or not registry.SERVICE.fullmatch(service):
            raise ApiError(400, "service: the image store's service name is required")
        try:
            scopes = registry.parse_scopes(
                [value.decode("utf-8") for value in request.args.get(b"scope", [])])
        except UnicodeDecodeError:
            raise ApiError(400, "scope: not UTF-8") from None
        except registry.ScopeError as e:
            raise ApiError(400, str(e)) from None
        subject, granted = await self._registry_grants(request, scopes)
        token = self.signer.sign(subject, service, granted, registry.TOKEN_TTL)
        issued = datetime.fromtimestamp(self.reactor.seconds(), UTC)
        return respond(request, {"token": token, "access_token": token,
                                 "expires_in": int(registry.TOKEN_TTL), "issued_at": issued})

    async def _registry_grants(self, request: IRequest, scopes: list[registry.Scope]
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
            repositories = frozenset(registry.repository_of(name) for name in
                                     await self.store.job_image_names(host["id"]))
            snapshots = frozenset(await self.store.snapshot_repositories(host["id"]))
            return f"host:{host['name']}", [
                a for s in scopes if (a := registry.access(s, registry.host_actions(
                    s, repositories, snapshots))) is not None]
        if credentials.looks_like_token(secret, credentials.USER_TOKEN_PREFIX):
            principal = await self.auth.for_token(secret)
            if user not in (None, "", principal.name):
                raise ApiError(401, "the token belongs to another user")
        elif user:
            try:
                row = await self.store.get_user(user)
            except NotFound:
                row = None
            encoded = row["password_hash"] if row is not None and not row["disabled"] else None
            if not await credentials.verify_password(self.reactor, secret, encoded):
                raise ApiError(401, "wrong user name or password")
            assert row is not None
            principal = Principal(row["id"], row["name"], row["admin"])
        else:
            raise ApiError(401, "invalid credentials")
        images: dict[str, frozenset[str]] = {}
        if not principal.admin:
            for row in await self.store.list_images(principal):
                held = effective("image", principal, row["owner_id"], row["grants"])
                repo = registry.repository_of(row["name"])
                images[repo] = images.get(repo, frozenset()) | held
        granted = []
        for scope in scopes:
            claimed = True
            if not principal.admin and scope.type == "repository" and scope.name not in images:
                claimed = await self.store.repository_claimed(scope.name)
            actions = registry.user_actions(scope, principal.name, principal.admin, images,
                                            claimed)
            if (item := registry.access(scope, actions)) is not None:
                granted.append(item)
        return principal.name, granted

    # -- identity --------------------------------------------------------------

    @app.route("/api/v1/whoami", methods=["GET"])
    async def whoami(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        return respond(request, views.user(await self.store.get_user(principal.name)))

    @app.route("/api/v1/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        body = read_json(request, schemas.LOGIN)
        try:
            row = await self.store.get_user(body["user"])
        except NotFound:
            row = None
        encoded = row["password_hash"] if row is not None and not row["disabled"] else None
        ok = await credentials.verify_password(self.reactor, body["password"], encoded)
        if not ok:
            raise ApiError(401, "wrong user name or password")
        assert row is not None
        ttl = self._ttl(body, admin=row["admin"])
        return await self._issue_token(request, row["id"], body.get("label", "login"), ttl)

    def _ttl(self, body: dict[str, Any], admin: bool) -> float | None:
        if "expires_in" not in body:
            return self.limits.default_token_ttl
        ttl = body["expires_in"]
        if ttl is None and not admin:
            raise ApiError(403, "only admins may create tokens that never expire")
        return ttl

    async def _issue_token(self, request: IRequest, user_id: int, label: str,
                           ttl: float | None) -> bytes:
        secret = credentials.new_token(credentials.USER_TOKEN_PREFIX)
        row = await self.store.create_token(user_id, credentials.token_hash(secret), label, ttl)
        return respond(request, {**views.token(row), "token": secret}, 201)

    @app.route("/api/v1/tokens", methods=["GET"])
    async def list_tokens(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        user_id = await self._target_user(principal, _arg(request, "user"))
        rows = await self.store.list_tokens(user_id)
        return respond(request, {"tokens": [views.token(row) for row in rows]})

    async def _target_user(self, principal: Principal, name: str | None) -> int:
        if name is None or name == principal.name:
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
        return await self._issue_token(request, user_id, body.get("label", ""), ttl)

    @app.route("/api/v1/tokens/<token_id>", methods=["DELETE"])
    async def revoke_token(self, request: IRequest, token_id: str) -> bytes:
        principal = await self.auth.principal(request)
        token_id = _uuid(token_id, "token")
        row = await self.store.get_token(token_id)
        if row["user_id"] != principal.user_id and not principal.admin:
            raise ApiError(404, "no such token")
        row = await self.store.revoke_token(token_id)
        self.auth.invalidate()
        return respond(request, views.token(row))

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
        await self._admin(request)
        body = read_json(request, schemas.USER_CREATE)
        password_hash = None
        if "password" in body:
            password_hash = await credentials.hash_password(self.reactor, body["password"])
        row = await self.store.create_user(body["name"], body.get("admin", False), password_hash)
        return respond(request, views.user(row), 201)

    @app.route("/api/v1/users/<name>", methods=["GET"])
    async def show_user(self, request: IRequest, name: str) -> bytes:
        principal = await self.auth.principal(request)
        if name != principal.name and not principal.admin:
            raise ApiError(403, "only admins may read other users")
        return respond(request, views.user(await self.store.get_user(name)))

    @app.route("/api/v1/users/<name>", methods=["PATCH"])
    async def update_user(self, request: IRequest, name: str) -> bytes:
        principal = await self.auth.principal(request)
        body = read_json(request, schemas.USER_UPDATE)
        if not principal.admin:
            if name != principal.name:
                raise ApiError(403, "only admins may change other users")
            if set(body) - {"password"}:
                raise ApiError(403, "only admins may change admin or disabled")
        password_hash = None
        if "password" in body:
            password_hash = await credentials.hash_password(self.reactor, body["password"])
        row = await self.store.update_user(name, admin=body.get("admin"),
                                           disabled=body.get("disabled"),
                                           password_hash=password_hash)
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
        await self.store.create_host(body["name"], body.get("tags", []), owner_id,
                                     body.get("description", ""),
                                     credentials.token_hash(secret))
        row = await self.store.get_host(body["name"], principal)
        return respond(request, {**views.host(row), "token": secret}, 201)

    @app.route("/api/v1/hosts/<name>", methods=["GET"])
    async def show_host(self, request: IRequest, name: str) -> bytes:
        _, row = await self._host(request, name, "read")
        return respond(request, views.host(row))

    async def _update_host(self, request: IRequest, name: str, **changes: Any) -> bytes:
        principal, _ = await self._host(request, name, "manage")
        await self.store.update_host(name, **changes)
        return respond(request, views.host(await self.store.get_host(name, principal)))

    @app.route("/api/v1/hosts/<name>/tags", methods=["PUT"])
    async def set_host_tags(self, request: IRequest, name: str) -> bytes:
        body = read_json(request, schemas.HOST_TAGS)
        return await self._update_host(request, name, tags=body["tags"])

    @app.route("/api/v1/hosts/<name>/drain", methods=["POST"])
    async def drain_host(self, request: IRequest, name: str) -> bytes:
        return await self._update_host(request, name, enabled=False)

    @app.route("/api/v1/hosts/<name>/enable", methods=["POST"])
    async def enable_host(self, request: IRequest, name: str) -> bytes:
        return await self._update_host(request, name, enabled=True, reset_health=True)

    @app.route("/api/v1/hosts/<name>/token", methods=["POST"])
    async def host_token(self, request: IRequest, name: str) -> bytes:
        principal = await self._admin(request)
        secret = credentials.new_token(credentials.HOST_TOKEN_PREFIX)
        await self.store.update_host(name, digest=credentials.token_hash(secret))
        row = await self.store.get_host(name, principal)
        return respond(request, {**views.host(row), "token": secret})

    @app.route("/api/v1/hosts/<name>", methods=["DELETE"])
    async def delete_host(self, request: IRequest, name: str) -> bytes:
        await self._admin(request)
        await self.store.delete_host(name)
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
        await self.store.create_image(body["name"], body["digest"], body["stores"],
                                      principal.user_id, body.get("description", ""),
                                      body.get("host_tags", ()), _patterns(body))
        row = await self.store.get_image(body["name"], principal)
        return respond(request, views.image(row), 201)

    @app.route("/api/v1/images/<path:name>", methods=["GET"])
    async def show_image(self, request: IRequest, name: str) -> bytes:
        if name.endswith("/grants"):
            return await self._image_grants_dispatch(request, name)
        _, row = await self._image(request, name, "use")
        return respond(request, views.image(row))

    @app.route("/api/v1/images/<path:name>", methods=["PUT"])
    async def update_image(self, request: IRequest, name: str) -> bytes:
        principal, _ = await self._image(request, name, "manage")
        body = read_json(request, schemas.IMAGE_UPDATE)
        await self.store.update_image(name, digest=body.get("digest"),
                                      stores=body.get("stores"),
                                      description=body.get("description"),
                                      host_tags=body.get("host_tags"),
                                      results=_patterns(body) if "results" in body else False)
        return respond(request, views.image(await self.store.get_image(name, principal)))

    @app.route("/api/v1/images/<path:name>", methods=["DELETE"])
    async def delete_image(self, request: IRequest, name: str) -> bytes:
        if "/grants/" in name:
            return await self._image_grants_dispatch(request, name)
        await self._image(request, name, "manage")
        await self.store.delete_image(name)
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
            _, row = await self._image(request, "/".join(parts[:-1]), "manage")
            return await self._grants(request, method, "image", row["id"])
        if len(parts) >= 4 and parts[-3] == "grants" and method == "DELETE":
            _, row = await self._image(request, "/".join(parts[:-3]), "manage")
            return await self._revoke(request, "image", row["id"], parts[-2], parts[-1])
        raise ApiError(404, "no such endpoint")

    # -- grants --------------------------------------------------------------------

    async def _grant_target(self, request: IRequest, collection: str, ident: str
                            ) -> tuple[str, Any]:
        if collection == "hosts":
            _, row = await self._host(request, ident, "manage")
            return "host", row["id"]
        if collection == "jobs":
            _, row = await self._job(request, ident, "manage")
            return "job", row["id"]
        if collection == "images":
            _, row = await self._image(request, ident, "manage")
            return "image", row["id"]
        raise ApiError(404, "no such endpoint")

    @app.route("/api/v1/<collection>/<ident>/grants", methods=["GET", "POST"])
    async def grants(self, request: IRequest, collection: str, ident: str) -> bytes:
        kind, resource_id = await self._grant_target(request, collection, ident)
        return await self._grants(request, request.method.decode(), kind, resource_id)

    async def _grants(self, request: IRequest, method: str, kind: str, resource_id: Any) -> bytes:
        if method == "GET":
            rows = await self.store.list_grants(kind, resource_id)
            return respond(request, {"grants": [views.grant(row) for row in rows]})
        body = read_json(request, schemas.GRANT)
        if body["privilege"] not in PRIVILEGES[kind]:
            raise ApiError(400, f"privilege: {kind}s have {', '.join(PRIVILEGES[kind])}")
        user_id = None if body["user"] == "*" else await self.store.user_id(body["user"])
        row = await self.store.add_grant(kind, resource_id, user_id, body["privilege"])
        return respond(request, views.grant({**row, "user": body["user"]}), 201)

    @app.route("/api/v1/<collection>/<ident>/grants/<user>/<privilege>", methods=["DELETE"])
    async def revoke_grant(self, request: IRequest, collection: str, ident: str, user: str,
                           privilege: str) -> bytes:
        kind, resource_id = await self._grant_target(request, collection, ident)
        return await self._revoke(request, kind, resource_id, user, privilege)

    async def _revoke(self, request: IRequest, kind: str, resource_id: Any, user: str,
                      privilege: str) -> bytes:
        user_id = None if user == "*" else await self.store.user_id(user)
        await self.store.remove_grant(kind, resource_id, user_id, privilege)
        request.setResponseCode(204)
        return b""

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
        spec = await self._job_spec(principal, body)
        row = await self.store.enqueue(principal.user_id, spec)
        return respond(request, views.job(row), 201)

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
        if image.startswith("sha256:"):
            name, digest = None, image
            usable = [row for row in await self.store.images_by_digest(digest, principal)
                      if "use" in effective("image", principal, row["owner_id"], row["grants"])]
            stores = sorted({store for row in usable for store in row["stores"]})
        else:
            try:
                row = await self.store.get_image(image, principal)
            except NotFound:
                raise ApiError(400, f"image: no image named {image!r}") from None
            held = effective("image", principal, row["owner_id"], row["grants"])
            if "use" not in held:
                raise ApiError(400 if not held else 403, f"image: you may not use {image!r}")
            name, digest, stores = image, row["digest"], row["stores"]
            default_tags = row["host_tags"]
            image_results = row["results"]
        parameters = {key: {"value": p["value"], "secret": p.get("secret", False)}
                      for key, p in body.get("parameters", {}).items()}
        for key, p in parameters.items():
            if len(p["value"].encode("utf-8")) > 4096:
                raise ApiError(400, f"parameters.{key}.value: longer than 4 KiB in UTF-8")
        return JobSpec(image_name=name, image_digest=digest, image_stores=stores,
                       tags=body["tags"] if "tags" in body else default_tags,
                       parameters=parameters, timeout=timeout,
                       queue_timeout=queue_timeout, max_restarts=body.get("max_restarts", 0),
                       label=body.get("label", ""), log_servers=self._pick_log_servers(),
                       results=_patterns(body) or image_results)

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
        rows = await self.store.list_jobs(
            principal, states=states, owner=_arg(request, "owner"),
            before_seq=_decode_cursor(cursor) if cursor else None, limit=limit + 1)
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
        await self.store.request_termination(row["id"], Reason.USER_TERMINATED,
                                             message=f"terminated by {principal.name}")
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
        name = body["name"]
        repository = registry.repository_of(name)
        if not registry.REPOSITORY.fullmatch(repository):
            raise ApiError(400, f"name: {name!r} is not a valid repository name")
        scope = registry.Scope("repository", repository, ("push",))
        claimed = await self.store.repository_claimed(repository)
        if not registry.user_actions(scope, principal.name, principal.admin, {}, claimed):
            raise ApiError(403, f"you may not push to repository {repository!r}")
        snapshot = await self.store.create_snapshot(
            row["id"], row["host_id"], principal.user_id, name, repository, store,
            body.get("description", ""))
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
        async for event in self.watchers.events(job_id, after, self.limits.keepalive):
            if finished[0]:
                break
            if event is None:
                request.write(b": keepalive\n\n")
                continue
            request.write(b"id: %d\nevent: job\ndata: %s\n\n" % (
                event["seq"], dumps(views.event(event))))
        return b""
