"""Registered image stores (``/api/v1/stores``)."""

from __future__ import annotations

from twisted.web.iweb import IRequest

from treadmill.common.captoken import bearer_token
from treadmill.common.http import ApiError, read_json, respond
from treadmill.images.oci import canonical_store_url
from treadmill.switchboard import credentials, schemas, views
from treadmill.switchboard.api.base import Routes
from treadmill.switchboard.store import Store

app = Routes.app


class StoreRoutes(Routes):
    """Image stores and site caches: listed for all, registered by admins."""

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
        return await self._admin_removal(request, lambda store: store.delete_image_store(service),
                                         "store.remove", "store", service)


async def registered_stores(store: Store, field: str, urls: list[str]) -> list[str]:
    """``urls`` in canonical form, or a 400 naming the first one not registered."""
    registered = {row["url"] for row in await store.list_image_stores()}
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
