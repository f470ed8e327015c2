"""The images catalogue (``/api/v1/images``)."""

from __future__ import annotations

from twisted.web.iweb import IRequest

from treadmill.common.http import ApiError, read_json, respond
from treadmill.switchboard import repositories, schemas, views
from treadmill.switchboard.access import Principal, effective
from treadmill.switchboard.api.args import console_patterns
from treadmill.switchboard.api.base import Routes
from treadmill.switchboard.api.grants import GrantRoutes
from treadmill.switchboard.api.stores import registered_stores
from treadmill.switchboard.store import Store
from treadmill.switchboard.store.errors import Conflict, NotFound

app = Routes.app


class ImageRoutes(GrantRoutes):
    """Catalogue images, their history and rollback (their grants: :class:`GrantRoutes`)."""

    @app.route("/api/v1/images", methods=["GET"])
    async def list_images(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        rows = await self.store.list_images(principal)
        return respond(request, {"images": [views.image(row) for row in rows]})

    @app.route("/api/v1/images", methods=["POST"])
    async def create_image(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        body = read_json(request, schemas.IMAGE_CREATE)
        await check_writable(self.store, principal, body["name"])
        stores = await registered_stores(self.store, "stores", body["stores"])
        try:
            await self.store.create_image(body["name"], body["digest"], stores,
                                          principal.user_id, body.get("description", ""),
                                          body.get("host_tags", ()), console_patterns(body),
                                          body.get("kind"))
        except Conflict:
            raise await name_taken(self.store, principal, body["name"]) from None
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
        stores = (await registered_stores(self.store, "stores", body["stores"])
                  if "stores" in body else None)
        results = console_patterns(body) if "results" in body else False

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
        return await self._audited_no_content(
            request,
            lambda store: store.delete_image(name),
            lambda _: self.audit.entry(request, principal, "image.delete", "image",
                                       row["name"], digest=row["digest"]))

    @app.route("/api/v1/images/<path:name>", methods=["POST"])
    async def post_image_path(self, request: IRequest, name: str) -> bytes:
        if name.endswith("/grants"):
            return await self._image_grants_dispatch(request, name)
        raise ApiError(405, "method not allowed")


async def check_writable(store: Store, principal: Principal, name: str) -> None:
    """403 unless ``principal`` may write the repository of image ``name``."""
    if principal.admin:
        return
    namespaces = await store.namespace_grants(principal.user_id)
    # the name's repository (oci.repository_of) unchecked: judged by its namespace alone
    if not repositories.may_write(name.lower(), principal.name, False, namespaces):
        own = principal.name.lower()
        raise ApiError(403, f"{name!r} is outside your namespaces: use {own}/NAME, or a "
                            "namespace an admin granted you (top-level names and other "
                            "users' namespaces are for admins)")


async def name_taken(store: Store, principal: Principal, name: str) -> ApiError:
    """The 409 for a taken image name: its spelling only to those who may see it.

    Whether the holder is invisible or absent from the caller's view, the
    answer is the same, so that it tells nothing about private images.
    """
    try:
        row = await store.get_image(name, principal)
    except NotFound:
        row = None
    if row is None or not effective("image", principal, row["owner_id"], row["grants"]):
        return ApiError(409, f"image name {name!r} is not available")
    return ApiError(409, f"image {row['name']!r} already exists")
