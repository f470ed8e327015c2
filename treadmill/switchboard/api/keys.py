"""Users' SSH public keys (``/api/v1/keys``)."""

from __future__ import annotations

from twisted.web.iweb import IRequest

from treadmill.common import sshkeys
from treadmill.common.http import ApiError, query_arg, read_json, respond
from treadmill.switchboard import schemas, views
from treadmill.switchboard.access import Principal
from treadmill.switchboard.api.args import path_uuid
from treadmill.switchboard.api.base import Routes

app = Routes.app


MAX_SSH_KEYS = 32
"""SSH public keys a user may register."""


class KeyRoutes(Routes):
    """A user's SSH keys, which jobs they own or manage receive."""

    @app.route("/api/v1/keys", methods=["GET"])
    async def list_ssh_keys(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        user_id = await self._key_owner(principal, query_arg(request, "user"))
        rows = await self.store.list_ssh_keys(user_id)
        return respond(request, {"keys": [views.ssh_key(row) for row in rows]})

    @app.route("/api/v1/keys", methods=["POST"])
    async def add_ssh_key(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        body = read_json(request, schemas.SSH_KEY_CREATE)
        user_id = await self._key_owner(principal, query_arg(request, "user"))
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
        key_id = path_uuid(key_id, "SSH key")
        row = await self.store.audited(
            lambda store: store.delete_ssh_key(None if principal.admin else principal.user_id,
                                               key_id),
            lambda row: self.audit.entry(request, principal, "key.remove", "user", row["user"],
                                         subject_user=row["user"], key_id=str(row["id"]),
                                         fingerprint=row["fingerprint"]))
        return respond(request, views.ssh_key(row))
