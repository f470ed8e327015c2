"""The audit log: an append-only record of every privileged action.

Each record says who (``actor``, ``actor_kind``), from where (``source``, the
client's address, through ``login.trusted_proxies`` like the login rate
limiter), what (``action``, one of :data:`ACTIONS`), on what (``subject_kind``,
``subject_id``, ``subject_user``) and ``details`` that never hold a secret
(token values, passwords, secret parameter values). The table refuses UPDATE,
DELETE and TRUNCATE (migration 0016) but for the retention pass of
:class:`RetentionService`. Console connections come from the supervisors
(:class:`ConsoleAudit`). See docs/operations.md, "Audit log".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from treadmill.common.ratelimit import RateLimiter
from treadmill.switchboard.access import Principal
from treadmill.switchboard.auth import client_address
from treadmill.switchboard.database import unavailable

#: Every action the switchboard records (a stable dotted name).
ACTIONS = frozenset({
    "login", "login.failure",
    "token.create", "token.revoke",
    "user.create", "user.update",
    "key.add", "key.remove",
    "grant.add", "grant.remove", "namespace.grant", "namespace.revoke",
    "host.create", "host.drain", "host.enable", "host.delete", "host.token", "host.tags",
    "host.health", "host.health_check.set", "host.health_check.unset",
    "image.create", "image.update", "image.delete", "image.rollback",
    "store.add", "store.remove", "store.push_token",
    "job.cancel", "job.extend", "job.snapshot", "job.console_token",
    "job.console_open", "job.console_close",
})

#: The action of a supervisor's ``console_event`` (protocol minor 7), by its ``event``.
CONSOLE_ACTIONS = {"opened": "job.console_open", "closed": "job.console_close"}

#: What a record may be about.
SUBJECT_KINDS = ("user", "host", "job", "image", "store", "namespace")


@dataclass(frozen=True)
class Entry:
    """One record, as written."""

    actor: str
    actor_kind: str
    action: str
    subject_kind: str
    subject_id: str
    source: str = ""
    subject_user: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.action in ACTIONS, self.action
        assert self.subject_kind in SUBJECT_KINDS, self.subject_kind


class Recorder:
    """Writes the API's records: right after the change it records, a failure
    logged, never the request's failure (the change is made)."""

    log = Logger()

    def __init__(self, store: Any, trusted_proxies: frozenset[str] = frozenset()):
        self.store = store
        self.trusted_proxies = trusted_proxies

    def entry(self, request: IRequest | None, principal: Principal | str, action: str,
              subject_kind: str, subject_id: Any, *, subject_user: str | None = None,
              **details: Any) -> Entry:
        """An entry for ``principal`` (or an actor name: 'manhole', 'system', or
        'host:NAME' for a host token) acting from ``request``."""
        if isinstance(principal, Principal):
            actor, kind = principal.name, "user"
        else:
            kind = (principal if principal in ("manhole", "system")
                    else "host" if principal.startswith("host:") else "user")
            actor = principal
        source = ((client_address(request, self.trusted_proxies) or "")[:200]
                  if request is not None else "")
        return Entry(actor=actor, actor_kind=kind, action=action, subject_kind=subject_kind,
                     subject_id=str(subject_id), source=source, subject_user=subject_user,
                     details=details)

    async def record(self, request: IRequest | None, principal: Principal | str, action: str,
                     subject_kind: str, subject_id: Any, *, subject_user: str | None = None,
                     **details: Any) -> None:
        entry = self.entry(request, principal, action, subject_kind, subject_id,
                           subject_user=subject_user, **details)
        try:
            await self.store.audit_append(entry)
        except Exception as e:
            if unavailable(e):
                self.log.error("Audit record lost (database unavailable): {actor} {action} "
                               "{subject_kind} {subject_id}", actor=entry.actor,
                               action=entry.action, subject_kind=entry.subject_kind,
                               subject_id=entry.subject_id)
            else:
                self.log.failure("Audit record lost: {actor} {action} {subject_kind} "
                                 "{subject_id}", actor=entry.actor, action=entry.action,
                                 subject_kind=entry.subject_kind, subject_id=entry.subject_id)


class ConsoleAudit:
    """Appends the records of console connections a supervisor reports (``console_event``).

    Only for a job on that supervisor's host (active, held, or ended at most
    ``ended_within`` seconds ago: a console closes after its job's end), so a host
    cannot write records about another's jobs, and only with an existing user as the
    actor; a token bucket per host (``burst``,
    then ``rate`` per second) bounds the rows a flood of connections (or a rogue
    supervisor) can add. The actor is the console token's user, the source the
    client's address as the proxy saw it, the host that reported it in ``details``.
    """

    log = Logger()

    def __init__(self, reactor: Any, store: Any, *, rate: float = 2.0, burst: int = 120,
                 ended_within: float = 600.0):
        self.store = store
        self.limiter = RateLimiter(reactor, rate, burst)
        self.ended_within = ended_within

    async def record(self, host_id: int, host_name: str,
                     message: dict[str, Any]) -> tuple[str, str] | None:
        """Store one validated ``console_event``: None, or the ack's error (code, text).
        A database failure raises (the report is then acked ``unavailable``)."""
        key = str(host_id)
        if self.limiter.wait(key) > 0:
            self.log.warn("{host}: console event of job {job} refused: over the rate bound",
                          host=host_name, job=message["job_id"])
            return ("rate_limited", "too many console events from this host; dropped")
        self.limiter.take(key)
        details = {k: message[k] for k in ("service", "access", "conn_id", "jti", "proxy",
                                           "suppressed") if k in message}
        details["host"] = host_name
        details["at"] = message["at"]
        entry = Entry(actor=message["user"], actor_kind="user",
                      action=CONSOLE_ACTIONS[message["event"]], subject_kind="job",
                      subject_id=message["job_id"], source=message["peer"][:200],
                      details=details)
        refused = await self.store.audit_console(host_id, message["job_id"], entry,
                                                 self.ended_within)
        if refused is None:
            return None
        self.log.warn("{host}: console event for job {job} refused: {why}", host=host_name,
                      job=message["job_id"], why=refused)
        return (refused, "that job is not on this host" if refused == "not_your_job"
                else "no such user")


class RetentionService(TimerService):
    """Deletes records older than ``days`` (0: keeps them for ever), on the leader only."""

    log = Logger()

    def __init__(self, reactor: Any, store: Any, days: float, is_leader: Any,
                 interval: float = 3600.0):
        super().__init__(interval, lambda: Deferred.fromCoroutine(self.expire()))
        self.clock = reactor
        self.store = store
        self.days = days
        self.is_leader = is_leader

    async def expire(self) -> int:
        """One pass: the number of records deleted."""
        if self.days <= 0 or not self.is_leader():
            return 0
        try:
            count = await self.store.audit_expire(self.days)
        except Exception as e:
            if unavailable(e):
                self.log.warn("Audit retention skipped: the database is unavailable")
            else:
                self.log.failure("Audit retention failed")
            return 0
        if count:
            self.log.info("Audit retention deleted {count} records older than {days:g} days",
                          count=count, days=self.days)
        return count
