"""Users (``/api/v1/users``, ``/api/v1/whoami``)."""

from __future__ import annotations

from twisted.web.iweb import IRequest

from treadmill.common.http import ApiError, read_json, respond
from treadmill.switchboard import schemas, views
from treadmill.switchboard.api.base import Routes

app = Routes.app


class UserRoutes(Routes):
    """Who the caller is; users created, read and changed."""

    @app.route("/api/v1/whoami", methods=["GET"])
    async def whoami(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        return respond(request, views.user(await self.store.get_user(principal.name)))

    @app.route("/api/v1/users", methods=["GET"])
    async def list_users(self, request: IRequest) -> bytes:
        await self._admin(request)
        return respond(request, {"users": [views.user(r) for r in await self.store.list_users()]})

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
