"""Login and API tokens (``/api/v1/login``, ``/api/v1/tokens``)."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from treadmill.common.http import ApiError, query_arg, read_json, respond
from treadmill.switchboard import credentials, schemas, views
from treadmill.switchboard.access import Principal
from treadmill.switchboard.api.args import path_uuid
from treadmill.switchboard.api.base import Routes
from treadmill.switchboard.store.errors import NotFound

app = Routes.app


class TokenRoutes(Routes):
    """Passwords in, tokens out; a user's tokens listed and revoked."""

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
        user_id = await self._target_user(principal, query_arg(request, "user"))
        rows = await self.store.list_tokens(user_id)
        return respond(request, {"tokens": [views.token(row) for row in rows]})

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
        token_id = path_uuid(token_id, "token")
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
