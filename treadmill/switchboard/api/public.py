"""Routes without a user: health, the OpenAPI document, the capability keys and
the supervisors' WebSocket."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from treadmill.common.http import ApiError, respond
from treadmill.switchboard.api.base import RETRY_AFTER, Routes

app = Routes.app

HEALTH_FRESH = 1.0
"""Seconds for which a statement the database answered proves it reachable."""


class PublicRoutes(Routes):
    """``/healthz``, ``/api/v1/openapi.json``, the keys, ``/api/v1/supervisor``."""

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request: IRequest) -> bytes:
        """200 while the database is reachable: it answered within the last
        ``HEALTH_FRESH`` seconds (a busy instance's checks do not queue behind its
        work and time out), else as it answers a ping now."""
        try:
            if not self.store.pool.answered_within(HEALTH_FRESH):
                await self.store.ping()
        except Exception as e:
            request.setHeader(b"retry-after", RETRY_AFTER)
            raise ApiError(503, f"database unavailable: {type(e).__name__}") from None
        return respond(request, {"status": "ok"})

    @app.route("/api/v1/openapi.json", methods=["GET"])
    def openapi_document(self, request: IRequest) -> bytes:
        """The OpenAPI description of this API (the same as docs/openapi.json)."""
        if self._openapi is None:
            from treadmill.switchboard import openapi  # it imports this module

            self._openapi = openapi.render(openapi.build()).encode("utf-8")
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"public, max-age=300")
        return self._openapi

    @app.route("/.well-known/treadmill/capability-keys", methods=["GET"])
    def capability_keys(self, request: IRequest) -> bytes:
        return respond(request, self.signer.jwks())

    @app.route("/api/v1/supervisor", methods=["GET"])
    def supervisor_link(self, request: IRequest) -> Any:
        """The supervisors' WebSocket (docs/protocol.md); authenticated by host token."""
        if self.supervisor_resource is None:
            raise ApiError(503, "supervisor links are not served here")
        return self.supervisor_resource
