"""The switchboard's HTTP API (Klein), as documented in ``docs/api.md``.

State is injected: a test builds :class:`SwitchboardAPI` with a real store and
serves ``api.resource()``. Every handler authenticates first, then validates
its input, then checks privileges on the resource it names.

One Klein app (:attr:`base.Routes.app`) carries every route; each module
registers the routes of one domain on it, as methods of a
:class:`~treadmill.switchboard.api.base.Routes` subclass, and
:class:`SwitchboardAPI` combines those classes:

- ``base``: the app, the injected state, errors mapped to answers, the caller
  and resource lookups; ``limits`` (``Limits``, the configured bounds); ``args``:
  query arguments, ids, cursors, headers;
- ``public``: health, the OpenAPI document, capability keys, the supervisors'
  WebSocket;
- ``users``, ``tokens`` (login, API tokens), ``keys`` (SSH keys);
- ``hosts``, ``health`` (a host's health history, health checks), ``images`` (the
  catalogue), ``stores`` (registered image stores),
  ``imagetokens`` (the registry token flow), ``grants`` (on resources and
  namespaces), ``audit`` (the audit log);
- ``jobs``, ``snapshots``, ``events`` (a job's events, read or watched).
"""

from __future__ import annotations

from typing import Any

from treadmill.common.captoken import CapabilitySigner
from treadmill.switchboard.api.audit import AuditRoutes
from treadmill.switchboard.api.events import EventRoutes
from treadmill.switchboard.api.health import HealthRoutes
from treadmill.switchboard.api.hosts import HostRoutes
from treadmill.switchboard.api.images import ImageRoutes
from treadmill.switchboard.api.imagetokens import ImageTokenRoutes
from treadmill.switchboard.api.jobs import JobRoutes
from treadmill.switchboard.api.keys import KeyRoutes
from treadmill.switchboard.api.limits import Limits
from treadmill.switchboard.api.public import PublicRoutes
from treadmill.switchboard.api.snapshots import SnapshotRoutes
from treadmill.switchboard.api.stores import StoreRoutes
from treadmill.switchboard.api.users import UserRoutes
from treadmill.switchboard.audit import Recorder
from treadmill.switchboard.auth import Authenticator, PasswordGuard
from treadmill.switchboard.events import JobWatchers
from treadmill.switchboard.store import Store


class SwitchboardAPI(PublicRoutes, ImageTokenRoutes, StoreRoutes, UserRoutes, KeyRoutes,
                     HostRoutes, HealthRoutes, ImageRoutes, AuditRoutes, JobRoutes,
                     SnapshotRoutes,
                     EventRoutes):
    """Routes of ``/api/v1`` and the public well-known endpoints."""

    def __init__(self, reactor: Any, store: Store, authenticator: Authenticator,
                 signer: CapabilitySigner, watchers: JobWatchers, limits: Limits | None = None,
                 supervisor_resource: Any = None, passwords: PasswordGuard | None = None):
        self.reactor = reactor
        self.store = store
        self.auth = authenticator
        self.signer = signer
        self.watchers = watchers
        self.limits = limits or Limits()
        self.supervisor_resource = supervisor_resource
        self.passwords = passwords or PasswordGuard(reactor)
        self.audit = Recorder(store, self.passwords.trusted_proxies)
        self._openapi: bytes | None = None

    def resource(self) -> Any:
        return self.app.resource()
