"""What every route module shares: :class:`Routes`, holding the one Klein app, the
injected state, the mapping of errors to answers, and the lookups of the caller
and of the resource a route names."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from treadmill.common.captoken import CapabilitySigner
from treadmill.common.http import ApiError, http_exception_error, respond_error, respond_internal
from treadmill.switchboard.access import Principal, effective
from treadmill.switchboard.api.args import path_uuid
from treadmill.switchboard.api.limits import Limits
from treadmill.switchboard.audit import Recorder
from treadmill.switchboard.auth import Authenticator, PasswordGuard
from treadmill.switchboard.database import unavailable
from treadmill.switchboard.events import JobWatchers
from treadmill.switchboard.jobstate import InvalidTransition
from treadmill.switchboard.store import Store
from treadmill.switchboard.store.errors import Conflict, NotFound

RETRY_AFTER = b"2"
"""Seconds a client waits before retrying a ``503`` (the database reconnects within one)."""


def require(held: frozenset[str], privilege: str, what: str) -> None:
    if privilege not in held:
        raise ApiError(403, f"you may not {privilege} {what}")


class Routes:
    """The one Klein app of ``/api/v1`` and the public well-known endpoints.

    Each route module subclasses this class and registers its routes on
    :attr:`app`; :class:`~treadmill.switchboard.api.SwitchboardAPI` combines them
    and injects the state declared here.
    """

    app = Klein()
    log = Logger()

    reactor: Any
    store: Store
    auth: Authenticator
    signer: CapabilitySigner
    watchers: JobWatchers
    limits: Limits
    supervisor_resource: Any
    passwords: PasswordGuard
    audit: Recorder

    # -- errors ------------------------------------------------------------

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        return respond_error(request, failure.value)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return respond_error(request, ApiError(404, str(failure.value)))

    @app.handle_errors(Conflict, InvalidTransition)
    def _conflict(self, request: IRequest, failure: Failure) -> bytes:
        return respond_error(request, ApiError(409, str(failure.value)))

    @app.handle_errors(HTTPException)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        return respond_error(request, http_exception_error(failure.value))

    @app.handle_errors(CancelledError)
    def _cancelled(self, request: IRequest, failure: Failure) -> bytes:
        # The client went away while we waited; there is no one to answer.
        return b""

    @app.handle_errors(Exception)
    def _internal(self, request: IRequest, failure: Failure) -> bytes:
        if unavailable(failure):
            return self._unavailable(request, failure)
        return respond_internal(request, failure, self.log)

    def _unavailable(self, request: IRequest, failure: Failure) -> bytes:
        """``503`` with ``Retry-After`` while the database is away: one line, no traceback."""
        lines = str(failure.value).strip().splitlines()
        self.log.warn("{method} {path}: 503, the database is unavailable ({error})",
                      method=request.method.decode("ascii", "replace"),
                      path=request.path.decode("ascii", "replace"),
                      error=f"{type(failure.value).__name__}: {lines[0]}" if lines
                      else type(failure.value).__name__)
        request.setHeader(b"retry-after", RETRY_AFTER)
        return respond_error(request, ApiError(503, "the database is unavailable; "
                                                    "try again later"))

    # -- answers -------------------------------------------------------------

    async def _audited_no_content(self, request: IRequest,
                                  change: Callable[[Store], Awaitable[Any]],
                                  describe: Callable[[Any], Any]) -> bytes:
        """Make ``change`` and its audit record (``describe``) in one transaction, and
        answer 204 (a removal, an unset)."""
        await self.store.audited(change, describe)
        request.setResponseCode(204)
        return b""

    async def _admin_removal(self, request: IRequest, change: Callable[[Store], Awaitable[Any]],
                             action: str, kind: str, subject: str) -> bytes:
        """An admin's ``change`` audited as ``action`` on the ``kind`` named ``subject``
        (:meth:`_audited_no_content`); 403 to others."""
        principal = await self._admin(request)
        return await self._audited_no_content(
            request, change,
            lambda _: self.audit.entry(request, principal, action, kind, subject))

    # -- the caller and the resource it names ------------------------------

    async def _admin(self, request: IRequest) -> Principal:
        principal = await self.auth.principal(request)
        if not principal.admin:
            raise ApiError(403, "only admins may do this")
        return principal

    async def _target_user(self, principal: Principal, name: str | None) -> int:
        if name is None or name.lower() == principal.name.lower():
            return principal.user_id
        if not principal.admin:
            raise ApiError(403, "only admins may act on other users' tokens")
        return await self.store.user_id(name)

    async def _host(self, request: IRequest, name: str, privilege: str) -> tuple[Principal, dict]:
        principal = await self.auth.principal(request)
        row = await self.store.get_host(name, principal)
        return principal, _holding(principal, "host", row, privilege, f"host {name!r}")

    async def _image(self, request: IRequest, name: str, privilege: str
                     ) -> tuple[Principal, dict]:
        principal = await self.auth.principal(request)
        row = await self.store.get_image(name, principal)
        return principal, _holding(principal, "image", row, privilege, f"image {name!r}")

    async def _job(self, request: IRequest, job_id: str, privilege: str
                   ) -> tuple[Principal, dict]:
        principal = await self.auth.principal(request)
        job_id = path_uuid(job_id, "job")
        row = await self.store.get_job(job_id, principal)
        return principal, _holding(principal, "job", row, privilege, f"job {job_id}")


def _holding(principal: Principal, kind: str, row: dict, privilege: str, what: str) -> dict:
    """``row`` if ``principal`` holds ``privilege`` on it; ``404`` if they hold nothing
    (it does not exist for them), ``403`` if they hold less."""
    held = effective(kind, principal, row["owner_id"], row["grants"])
    if not held:
        raise ApiError(404, f"no {what}")
    require(held, privilege, what)
    return row
