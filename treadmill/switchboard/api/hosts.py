"""Hosts (``/api/v1/hosts``)."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from treadmill.common.http import read_json, respond
from treadmill.switchboard import credentials, schemas, views
from treadmill.switchboard.api.base import Routes
from treadmill.switchboard.store import Store

app = Routes.app


class HostRoutes(Routes):
    """Hosts registered, read, re-tagged, drained, enabled, re-keyed and removed."""

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
            await store.update_host(name, **changes, actor=principal.name)
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
        return await self._admin_removal(request, lambda store: store.delete_host(name),
                                         "host.delete", "host", name)
