"""The proxy's HTTP endpoints (Klein), as documented in ``docs/proxy.md``.

    GET /healthz                 {"status": "ok", ...counts}
    GET /v1/control[?job=ID]     WebSocket: a job's control connection (capability token)
    GET /v1/tunnels/{id}         WebSocket: a client of a published service (binary frames)

The control endpoint checks ``Authorization: Bearer <token>`` before the
upgrade: a capability token for this proxy (``aud`` = the ``service``
setting) granting ``publish`` on ``{"type": "tunnel", "name": <job id>}``.
The job is the ``job`` query parameter, or the one job the token grants
``publish`` on. Refusals are ``401`` (no token, or a bad one) and ``403`` (a
valid token for another job) in the common error shape.

A tunnel path of a service that authenticates its users itself (an SSH
server) is public, like its TCP port; any other service's path needs a console
token for the job (``legs.TunnelSocket``).
"""

from __future__ import annotations

import re
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from treadmill.common.captoken import Claims
from treadmill.common.http import (
    ApiError,
    add_fallback_error_handlers,
    respond,
    respond_error,
)
from treadmill.common.keys import bearer_claims
from treadmill.proxy.control import ControlFactory
from treadmill.proxy.legs import TunnelFactory
from treadmill.proxy.tunnels import TunnelTable

__all__ = ["ProxyAPI"]

_JOB = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _is_upgrade(request: IRequest) -> bool:
    return (request.getHeader("upgrade") or "").lower() == "websocket"


class ProxyAPI:
    """Routes; the registry, the token verifier and the WebSocket factories are injected."""

    app = Klein()
    log = Logger()

    def __init__(self, registry: TunnelTable, verifier: Any, control: ControlFactory,
                 tunnels: TunnelFactory):
        self.registry = registry
        self.verifier = verifier
        self.control = control
        self.tunnels = tunnels

    def resource(self) -> Any:
        return self.app.resource()

    # -- errors ------------------------------------------------------------------------

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        return respond_error(request, failure.value)

    add_fallback_error_handlers(app)

    # -- routes ------------------------------------------------------------------------

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: IRequest) -> bytes:
        summary = self.registry.summary()
        return respond(request, {"status": "ok", "jobs": summary["jobs"],
                                 "tunnels": summary["tunnels"], "active": summary["active"]})

    @app.route("/v1/control", methods=["GET"])
    def control_socket(self, request: IRequest) -> Any:
        token, claims = bearer_claims(request, self.verifier, self._control_refused)
        job = self._job(request, claims)
        if not _JOB.fullmatch(job):
            raise ApiError(400, "invalid job id")
        if not _is_upgrade(request):
            raise ApiError(400, "this is a WebSocket endpoint")
        self.log.info("Job {job}: control connection from {subject} (token {jti})", job=job,
                      subject=claims.subject, jti=claims.raw.get("jti"))
        return WebSocketResource(self.control.for_job(job, claims.subject, token))

    def _control_refused(self) -> None:
        self.registry.counts["control_refused"] += 1

    def _job(self, request: IRequest, claims: Claims) -> str:
        raw = request.args.get(b"job") if request.args else None
        if raw:
            job = raw[-1].decode("utf-8", "replace")
            if not claims.allows("tunnel", job, "publish"):
                self.registry.counts["control_refused"] += 1
                raise ApiError(403, f"the token does not grant publish on tunnel {job}")
            return job
        jobs = sorted({entry.name for entry in claims.access
                       if entry.type == "tunnel" and "publish" in entry.actions})
        if len(jobs) != 1:
            self.registry.counts["control_refused"] += 1
            if not jobs:
                raise ApiError(403, "the token grants publish on no tunnel")
            raise ApiError(400, "the token grants several jobs: name one with ?job=")
        return jobs[0]

    @app.route("/v1/tunnels/<tunnel_id>", methods=["GET"])
    def tunnel_socket(self, request: IRequest, tunnel_id: str) -> Any:
        tunnel = self.registry.by_ws.get(tunnel_id)
        if tunnel is None or tunnel.closed:
            raise ApiError(404, "no such tunnel")
        if not _is_upgrade(request):
            raise ApiError(400, "this is a WebSocket endpoint (binary frames carry the bytes)")
        return WebSocketResource(self.tunnels.for_tunnel(tunnel))
