"""Grants on hosts, jobs and images (``/api/v1/{hosts,jobs,images}/ID/grants``)
and on namespaces (``/api/v1/namespaces/NS/grants``, admins)."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from treadmill.common.http import ApiError, read_json, respond
from treadmill.images.oci import NAMESPACE
from treadmill.switchboard import schemas, views
from treadmill.switchboard.access import PRIVILEGES, Principal
from treadmill.switchboard.api.base import Routes

app = Routes.app


class GrantRoutes(Routes):
    """Grants listed, added and revoked, each recorded in the audit log."""

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
        return await self._audited_no_content(
            request,
            lambda store: store.remove_grant(kind, resource_id, user_id, privilege),
            lambda _: self._grant_entry(request, audited, "remove", kind, user, privilege))

    @staticmethod
    def _namespace(name: str) -> str:
        canonical = name.lower()
        if len(canonical) > 128 or not NAMESPACE.fullmatch(canonical):
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
