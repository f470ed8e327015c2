"""The Docker registry token flow (``/api/v1/registry/token``): capability
tokens for image stores, granted by :mod:`treadmill.switchboard.repositories`."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import jwt
from twisted.web.iweb import IRequest

from treadmill.common.captoken import Access
from treadmill.common.http import ApiError, query_arg, respond
from treadmill.switchboard import credentials, repositories
from treadmill.switchboard.access import Principal
from treadmill.switchboard.api.base import Routes
from treadmill.switchboard.api.tokens import TokenRoutes

app = Routes.app

WRITE_ACTIONS = frozenset({"push", "delete"})
"""Registry token actions that change a store: a token granting one is audited."""


class ImageTokenRoutes(TokenRoutes):
    """Image store tokens for users (password or API token) and hosts (host token)."""

    @app.route("/api/v1/registry/token", methods=["GET"])
    async def registry_token(self, request: IRequest) -> bytes:
        """Docker registry token flow: a capability token for image store access."""
        service = query_arg(request, "service")
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
        writes = {a.name: sorted(a.actions) for a in granted
                  if set(a.actions) & WRITE_ACTIONS}
        if writes:  # pulls are not recorded: every job start asks for one
            jti = jwt.decode(token, options={"verify_signature": False})["jti"]
            await self.audit.record(
                request, subject, "store.push_token", "store", service,
                subject_user=None if subject.startswith("host:") else subject,
                repositories=writes, expires_in=int(repositories.TOKEN_TTL), token_jti=jti)
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
            running = frozenset(name.lower() for name in  # their repositories, unchecked
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
