"""Snapshot requests: ``snapshot_job`` starts (or joins) a driver's snapshot of an
ended job's disk (``IHostSnapshots``); its ``snapshot_result`` is sent on whichever
connection is open until the switchboard acknowledges it (docs/protocol.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.drivers import IHostDriver, IHostSnapshots, SnapshotError
from treadmill.supervisor.outbox import UNAVAILABLE, Session

__all__ = ["SnapshotRequests"]


@dataclass(eq=False)
class SnapshotRequests:
    """The snapshots of one runner: those under way, and the results not yet
    acknowledged (by snapshot id).

    The runner lends what it owns: ``current()`` (the current job's id, if any),
    ``reply(session, message)`` (an answer on that session, if still open),
    ``later(delay, fn, *args)`` (a call cancelled when the runner closes) and
    ``backoff(attempt)`` (the pause before a resend).
    """

    log = Logger()

    driver: IHostDriver
    _: KW_ONLY
    current: Callable[[], str | None]
    reply: Callable[[Session, dict[str, Any]], None]
    later: Callable[..., None]
    backoff: Callable[[int], float]
    label: str = "supervisor"
    session: Session | None = field(default=None, init=False)
    _running: dict[str, Deferred[Any]] = field(default_factory=dict, init=False)
    _results: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)
    _sent: dict[int, str] = field(default_factory=dict, init=False)
    """Request id -> snapshot id."""

    @property
    def unacknowledged(self) -> dict[str, dict[str, Any]]:
        """Results not yet acknowledged: snapshot id -> ``snapshot_result``."""
        return dict(self._results)

    def opened(self, session: Session) -> None:
        """A connection opened: send every unacknowledged result again."""
        self.session = session
        self._sent = {}
        for snapshot_id in list(self._results):
            self._send(snapshot_id)

    def closed(self, session: Session) -> None:
        if session is self.session:
            self.session = None

    def ack(self, session: Session, message: dict[str, Any]) -> bool:
        """Whether ``message`` (an ``ack``) was for a result sent on ``session``."""
        if session is not self.session:
            return False
        snapshot_id = self._sent.pop(message["request_id"], None)
        if snapshot_id is None:
            return False
        self._acked(message, snapshot_id)
        return True

    def request(self, session: Session, message: dict[str, Any]) -> None:
        """Start (or join) a snapshot; its result follows as ``snapshot_result``."""
        rid, snapshot_id, job_id = message["request_id"], message["snapshot_id"], message["job_id"]
        if snapshot_id in self._running:
            self.reply(session, protocol.ack(rid))
            return
        if snapshot_id in self._results:
            self.reply(session, protocol.ack(rid))
            self._send(snapshot_id)
            return
        if not IHostSnapshots.providedBy(self.driver):
            self.reply(session, protocol.ack(rid, (
                "not_supported", f"the {self.driver.name} driver cannot make snapshots")))
            return
        if self.current() == job_id:
            self.reply(session, protocol.ack(rid, ("unknown_job", f"job {job_id} still runs")))
            return
        self.log.info("{name}: snapshot {snapshot} of job {job} into {repository} on {store}",
                      name=self.label, snapshot=snapshot_id, job=job_id,
                      repository=message["repository"], store=message["store"])
        self.reply(session, protocol.ack(rid))  # accepted; the outcome follows
        running = maybeDeferred(self.driver.snapshot, job_id, message["repository"],
                                message["store"])
        self._running[snapshot_id] = running

        def finished(result: Any) -> None:
            self._running.pop(snapshot_id, None)
            if isinstance(result, Failure):
                if result.check(SnapshotError):
                    error = (result.value.code, result.value.message)
                else:
                    self.log.failure("{name}: snapshot {snapshot} failed", result,
                                     name=self.label, snapshot=snapshot_id)
                    error = ("failed", f"the host driver failed: {result.type.__name__}")
                self.log.warn("{name}: snapshot {snapshot} of job {job} failed: {code}: "
                              "{text}", name=self.label, snapshot=snapshot_id, job=job_id,
                              code=error[0], text=error[1])
                outcome = protocol.snapshot_result(0, snapshot_id, job_id, error=error)
            else:
                self.log.info("{name}: snapshot {snapshot} of job {job} is {digest}",
                              name=self.label, snapshot=snapshot_id, job=job_id, digest=result)
                outcome = protocol.snapshot_result(0, snapshot_id, job_id, digest=str(result))
            self._results[snapshot_id] = outcome
            self._send(snapshot_id)

        running.addBoth(finished)

    def _acked(self, message: dict[str, Any], snapshot_id: str) -> None:
        error = None if message["ok"] else (message.get("error") or {})
        if error is not None and error.get("code") == UNAVAILABLE:
            self.later(self.backoff(0), self._resend, snapshot_id)
            return
        self._results.pop(snapshot_id, None)

    def _resend(self, snapshot_id: str) -> None:
        if snapshot_id not in self._sent.values():
            self._send(snapshot_id)

    def _send(self, snapshot_id: str) -> None:
        session, outcome = self.session, self._results.get(snapshot_id)
        if session is None or outcome is None:
            return
        rid = session.next_request_id()
        if session.send({**outcome, "request_id": rid}):
            self._sent[rid] = snapshot_id
            self.later(self.backoff(0), self._unacked, session, rid)

    def _unacked(self, session: Session, rid: int) -> None:
        if session is self.session and rid in self._sent:
            self._send(self._sent.pop(rid))  # no ack in time
