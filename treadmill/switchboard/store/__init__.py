"""The switchboard's data layer: every SQL statement lives in this package.

Methods take and return plain values and dict rows; each write that touches
more than one row runs in one transaction, so a failed request writes nothing.
Authorisation decisions are made by the caller from the privileges that the
read methods return alongside the rows (see :mod:`treadmill.switchboard.access`).

:class:`Store` is the one object callers hold; it combines one component (a
:class:`~treadmill.switchboard.store.base.Queries` subclass) per domain:

- ``base``: the component base, SQL fragments and statements shared by several domains;
- ``errors``: ``NotFound``, ``Conflict``, ``IdempotencyKeyReused``, ``NotYourJob``;
- ``users``, ``tokens`` (API tokens), ``keys`` (SSH keys);
- ``hosts``, ``links`` (supervisor links and their reports, the row a ``JobStart``
  is built from), ``instances`` (switchboard instances, the capability key);
- ``images`` (the catalogue and its versions), ``imagestores`` (registered image
  stores), ``grants`` (on resources and namespaces);
- ``jobs`` (``JobSpec``, enqueueing, reading, termination), ``lifecycle`` (the
  ``transition`` every state change goes through, and what follows a termination);
- ``health`` (host health in a job's terminating transaction), ``healthchecks``
  (health checks as set, health histories, checks due by the clock, queued jobs'
  messages);
- ``holds`` (failed jobs' held hosts), ``scheduler`` (the scheduling transaction),
  ``snapshots``, ``audit`` (the audit log).
"""

from __future__ import annotations

from treadmill.switchboard.database import Pool
from treadmill.switchboard.store.audit import AuditQueries
from treadmill.switchboard.store.grants import GrantQueries
from treadmill.switchboard.store.healthchecks import HealthQueries
from treadmill.switchboard.store.holds import HoldQueries
from treadmill.switchboard.store.hosts import HostQueries
from treadmill.switchboard.store.images import ImageQueries
from treadmill.switchboard.store.imagestores import ImageStoreQueries
from treadmill.switchboard.store.instances import InstanceQueries
from treadmill.switchboard.store.jobs import JobQueries
from treadmill.switchboard.store.keys import KeyQueries
from treadmill.switchboard.store.links import LinkQueries
from treadmill.switchboard.store.scheduler import SchedulerQueries
from treadmill.switchboard.store.snapshots import SnapshotQueries
from treadmill.switchboard.store.tokens import TokenQueries
from treadmill.switchboard.store.users import UserQueries


class Store(UserQueries, TokenQueries, KeyQueries, HostQueries, ImageQueries,
            ImageStoreQueries, GrantQueries, JobQueries, LinkQueries, HoldQueries,
            SchedulerQueries, InstanceQueries, SnapshotQueries, AuditQueries, HealthQueries):
    """All reads and writes of switchboard state.

    ``max_host_failures`` consecutive failures blamed on a host run its health check
    (only a failing check takes it out of service, ``healthy = false``, until an
    operator enables it again), or take it out when no check applies.
    """

    def __init__(self, pool: Pool, *, max_host_failures: int = 3):
        self.pool = pool
        self.max_host_failures = max_host_failures

    async def ping(self) -> None:
        await self.pool.fetchone("SELECT 1")
