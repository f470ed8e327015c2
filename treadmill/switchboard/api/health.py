"""Host health (``/api/v1/hosts/{name}/health``) and the health checks operators set
(``/api/v1/health-checks``); see ``docs/operations.md``, "Host health"."""

from __future__ import annotations

import re
from typing import Any

from twisted.web.iweb import IRequest

from treadmill.common.http import ApiError, read_json, respond
from treadmill.switchboard import schemas, views
from treadmill.switchboard.api.base import Routes
from treadmill.switchboard.api.jobs import JobRoutes
from treadmill.switchboard.store import Store

app = Routes.app

DEFAULT_CHECK_TIMEOUT = 600.0
"""Seconds a health-check job may run unless its check says otherwise."""


def _target(kind: str, name: str) -> dict[str, str | None]:
    """``hosts/NAME`` or ``tags/TAG`` (a tag may hold ``/``)."""
    if kind == "hosts":
        if not re.fullmatch(schemas.NAME_PATTERN, name):
            raise ApiError(400, "host: not a host name")
        return {"host": name, "tag": None}
    if kind == "tags":
        if not re.fullmatch(schemas.TAG_PATTERN, name):
            raise ApiError(400, "tag: not a tag")
        return {"host": None, "tag": name}
    raise ApiError(404, "no such resource: a health check is for hosts/NAME or tags/TAG")


class HealthRoutes(JobRoutes):
    """A host's health history, read like the host; health checks, set by admins (a
    check job is resolved like a job the admin enqueues)."""

    @app.route("/api/v1/hosts/<name>/health", methods=["GET"])
    async def host_health(self, request: IRequest, name: str) -> bytes:
        principal, row = await self._host(request, name, "read")
        found = await self.store.host_health(row["id"], principal)
        return respond(request, views.host_health(name, found))

    @app.route("/api/v1/health-checks", methods=["GET"])
    async def list_health_checks(self, request: IRequest) -> bytes:
        await self._admin(request)
        rows = await self.store.list_health_checks()
        return respond(request, {"checks": [views.health_check(row) for row in rows]})

    @app.route("/api/v1/health-checks/<kind>/<path:name>", methods=["PUT"])
    async def set_health_check(self, request: IRequest, kind: str, name: str) -> bytes:
        principal = await self._admin(request)
        target = _target(kind, name)
        body = read_json(request, schemas.HEALTH_CHECK)
        spec = await self._job_spec(principal, {
            "image": body["image"], "parameters": body.get("parameters", {}),
            "timeout": body.get("timeout", DEFAULT_CHECK_TIMEOUT)})

        async def put(store: Store) -> dict[str, Any]:
            return await store.set_health_check(
                **target, image=body["image"], spec=spec,
                expect_exit=body.get("expect_exit", 0), every_jobs=body.get("every_jobs"),
                every_hours=body.get("every_hours"), after_failures=body.get("after_failures"),
                set_by=principal.user_id)

        row = await self.store.audited(put, lambda row: self.audit.entry(
            request, principal, "host.health_check.set", "host", _subject(target),
            image=row["image"], digest=row["image_digest"], expect_exit=row["expect_exit"],
            every_jobs=row["every_jobs"], every_hours=row["every_hours"],
            after_failures=row["after_failures"]))
        return respond(request, views.health_check(row))

    @app.route("/api/v1/health-checks/<kind>/<path:name>", methods=["DELETE"])
    async def unset_health_check(self, request: IRequest, kind: str, name: str) -> bytes:
        principal = await self._admin(request)
        target = _target(kind, name)
        return await self._audited_no_content(
            request,
            lambda store: store.unset_health_check(**target),
            lambda _: self.audit.entry(request, principal, "host.health_check.unset", "host",
                                       _subject(target)))


def _subject(target: dict[str, str | None]) -> str:
    """The audit subject: the host's name, or ``tag:T`` for a tag's check."""
    return target["host"] or f"tag:{target['tag']}"
