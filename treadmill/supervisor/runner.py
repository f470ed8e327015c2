"""The job runner: the supervisor's side of the protocol's job semantics.

:class:`JobRunner` owns at most one current job. It answers the
switchboard's commands (``docs/protocol.md``):

- ``start_job``: the same job again acks ``ok`` (with the outcome of the first
  start if that is still under way); another job while one is current acks
  ``already_running``; a driver refusal acks its code and is followed by no
  event; a job this supervisor remembers as ended acks ``ok`` and resends its
  final event (a job is never run twice);
- ``stop_job``: stops the current job (a ``terminating`` event, then the
  driver's ``terminated``); for any other job acks ``ok`` and, if the job is
  remembered as ended, resends its final event;
- ``status_request``: answered with ``status`` only once every journaled
  event has been sent *and acknowledged*, so the switchboard reconciles
  against a database that already holds them; since minor 6 it names the
  ended job whose host is held (``held``), since minor 8 the current job's
  ``timeout`` as it knows it, since minor 9 the held job's (``held_timeout``) and
  the seconds its hold has left (``held_for``);
- ``renew_tokens`` (minor 8): the current job was extended; its new timeout and
  fresh log and proxy tokens replace those of its ``start_job`` (journaled in
  ``current-job.json``, handed to the observers: ``tokens_renewed``). Since minor 9
  one with ``held_for`` names the held ended job: its hold now ends ``held_for``
  seconds from now, and its fresh tokens replace the held job's (journaled in
  ``held.json``; the observers get ``tokens_renewed`` and ``hold_changed``). For any
  other job it acks ``ok`` and changes nothing.

A job with ``hold_on_failure`` (minor 6) that fails (its workload exits with a
non-zero status, or a ``stop_job`` ends it for ``execution_timeout``) on a driver
that ``holds`` is reported ended at once (``held: true``), and its host is kept
as it is (``hold.py``) until the hold expires or a ``stop_job`` names the ended
job; then the driver tears down, and that ``stop_job`` is acknowledged once it has.
A driver that has already torn the host down when it reports the failure (a guest
that powered itself off) holds nothing. The hold is journaled (``held.json``): a
restarted runner has the driver re-adopt the held host (``adopt_held``) and holds
it for the rest of its time, or, if the driver cannot, ends the hold. While it is
held, its host's console still goes to the observers (the job's log stream), and they
are told when the hold starts, resumes after a restart and ends (``hold_changed``).

Job events flow from the driver (:class:`IJobReporter`) through the journaled
outbox (``outbox.py``: journaled, then sent one at a time until acknowledged)
and to the runner's observers (``IJobObserver``). The runner also reports the
current job's public endpoints, resending them until acknowledged, and hands
``snapshot_job`` to its ``SnapshotRequests`` (``snapshots.py``). Execution
timeouts are the switchboard's business, not the runner's.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from treadmill.protocol import supervisor as protocol
from treadmill.protocol.results import ResultsError
from treadmill.supervisor.drivers import (
    REASONS,
    STAGES,
    IHostDriver,
    IJobReporter,
    StartRefused,
)
from treadmill.supervisor.hold import (
    RELEASE_WAIT,
    Hold,
    end_reason,
    hold_change,
    hold_for,
    hold_record,
)
from treadmill.supervisor.journal import ENDED_KEEP, StateFiles
from treadmill.supervisor.observers import IJobObserver
from treadmill.supervisor.outbox import UNAVAILABLE, EventOutbox, Session
from treadmill.supervisor.results import JobResults
from treadmill.supervisor.snapshots import SnapshotRequests

__all__ = ["ConsoleBuffer", "JobRunner"]

ACTIVE_STATES = ("assigned", "initializing", "ready", "terminating")
RESTART_MESSAGE = "supervisor restarted; the job could not be re-adopted"


class ConsoleBuffer:
    """Counts console bytes and keeps the last ``limit`` of them."""

    __slots__ = ("_data", "limit", "total")

    def __init__(self, limit: int):
        self.limit = max(0, limit)
        self.total = 0
        self._data = bytearray()

    def append(self, data: bytes) -> None:
        self.total += len(data)
        if not self.limit:
            return
        self._data += data[-self.limit:]
        excess = len(self._data) - self.limit
        if excess > 0:
            del self._data[:excess]

    def tail(self) -> bytes:
        return bytes(self._data)

    def reset(self) -> None:
        self.total = 0
        self._data = bytearray()


@implementer(IJobReporter)
class _Reporter:
    """The reporter of one job. Holds reports until the start is accepted."""

    __slots__ = ("_held", "_runner", "job_id")

    def __init__(self, runner: JobRunner, job_id: str):
        self._runner: JobRunner | None = runner
        self.job_id = job_id
        self._held: list[tuple[Callable[..., None], tuple[Any, ...]]] | None = []

    def accept(self) -> None:
        held, self._held = self._held or [], None
        for handler, args in held:
            self._call(handler, *args)

    def discard(self) -> None:
        """The job was refused or the runner closes: report nothing more."""
        self._runner = None
        self._held = None

    def _call(self, handler: Callable[..., None], *args: Any) -> None:
        """Have the runner apply ``handler`` (a ``JobRunner._on_*`` method) now, or once
        the start is accepted."""
        if self._runner is None:
            return
        if self._held is not None:
            self._held.append((handler, args))
            return
        self._runner._report(self.job_id, handler, args)

    def stage(self, name: str) -> None:
        self._call(JobRunner._on_stage, name)

    def ready(self) -> None:
        self._call(JobRunner._on_ready)

    def terminating(self, reason: str | None = None) -> None:
        self._call(JobRunner._on_terminating, reason)

    def exited(self, exit_status: int, message: str = "") -> None:
        self._call(JobRunner._on_exited, exit_status, message)

    def failed(self, reason: str, message: str = "") -> None:
        self._call(JobRunner._on_failed, reason, message)

    def stopped(self, reason: str, message: str = "") -> None:
        self._call(JobRunner._on_stopped, reason, message)

    def console(self, data: bytes) -> None:
        if self._runner is not None:
            self._runner._console(self.job_id, data)

    def services(self, services: dict[str, tuple[str, int]]) -> None:
        self._call(JobRunner._on_services, dict(services))

    def result(self, message: dict[str, Any]) -> None:
        self._call(JobRunner._on_result, dict(message))

    def ssh_host_keys(self, keys: list[str]) -> None:
        self._call(JobRunner._on_ssh_host_keys, list(keys))


@dataclass(eq=False)
class _Current:
    """The job the runner runs."""

    job: dict[str, Any]
    reporter: _Reporter
    state: str = "assigned"
    stage: str | None = None
    stop_reason: str | None = None
    results: JobResults | None = None
    # (exit status, message) once console patterns ended the run (docs/results.md)
    results_exit: tuple[int, str] | None = None
    # None while the driver's start is under way; then the ack error (or False if accepted).
    outcome: tuple[str, str] | bool | None = None
    _waiters: list[Deferred[Any]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.job["id"]

    def settle(self, error: tuple[str, str] | None) -> None:
        self.outcome = error if error is not None else False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(error)

    def started(self) -> Deferred[tuple[str, str] | None]:
        """Fires with the start's ack error, or None when it was accepted."""
        if self.outcome is not None:
            return succeed(self.outcome or None)
        waiter: Deferred[Any] = Deferred()
        self._waiters.append(waiter)
        return waiter


def _thread_io(reactor: Any) -> Callable[..., Deferred[Any]]:
    def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args, **kwargs)

    return run


class JobRunner(Service):
    """Runs the switchboard's jobs on one host driver; see the module docstring.

    ``run_io(fn, *args)`` runs blocking state-directory I/O and returns a
    Deferred; by default in the reactor's thread pool. Calls are serialised,
    so the journal is written in event order. ``ack_timeout`` and
    ``resend_max`` bound the resending of unacknowledged events; ``jitter()``
    returns a number in [0, 1) that scales a random extra delay.
    """

    log = Logger()

    def __init__(self, reactor: Any, driver: IHostDriver, files: StateFiles, *,
                 run_io: Callable[..., Deferred[Any]] | None = None,
                 console_buffer: int = 64 * 1024, label: str = "supervisor",
                 ack_timeout: float = 5.0, resend_max: float = 60.0,
                 jitter: Callable[[], float] = random.random):
        self.reactor = reactor
        self.driver = driver
        self.files = files
        self.label = label
        self._run_io = run_io or _thread_io(reactor)
        self._io_lock = DeferredLock()
        self._current: _Current | None = None
        self._held: Hold | None = None  # the ended job whose host is kept (hold.py)
        self._ended: list[dict[str, Any]] = []
        self.ack_timeout = ack_timeout
        self._backoff = backoffPolicy(ack_timeout, max(ack_timeout, resend_max), factor=2,
                                      jitter=lambda: jitter() * ack_timeout)
        self.outbox = EventOutbox(reactor, files, self._io, backoff=self._backoff, label=label)
        self._session: Session | None = None
        self._stopping = False
        self._closed = False
        self.console = ConsoleBuffer(console_buffer)
        self.observers: list[IJobObserver] = []  # add_observer
        self._services: dict[str, tuple[str, int]] = {}
        # The current job's public endpoints until the switchboard acknowledged them.
        self._endpoints: tuple[str, list[dict[str, Any]]] | None = None
        self._endpoints_sent: tuple[int, tuple[str, list[dict[str, Any]]]] | None = None
        # The current job's last endpoints and the guest's SSH host keys (sent with them).
        self._last_endpoints: tuple[str, list[dict[str, Any]]] | None = None
        self._ssh_host_keys: tuple[str, list[str]] | None = None
        self._calls: set[Any] = set()  # delayed resends of endpoints and snapshot results
        self.snapshots = SnapshotRequests(
            driver, current=lambda: self._current.id if self._current is not None else None,
            reply=self._reply, later=self._later, backoff=self._backoff, label=label)

    # -- observers -----------------------------------------------------------------------

    def add_observer(self, observer: IJobObserver) -> None:
        """Tell ``observer`` about every job from now on (see :class:`IJobObserver`)."""
        self.observers.append(observer)

    def _tell(self, call: Callable[[IJobObserver], Any], what: str) -> None:
        """``call(observer)`` for each observer; one that raises is logged, not fatal."""
        for observer in list(self.observers):
            try:
                call(observer)
            except Exception:
                self.log.failure("{name}: a job observer failed ({what})", name=self.label,
                                 what=what)

    # -- introspection (tests, manhole) -----------------------------------------------

    def status(self) -> dict[str, Any] | None:
        """The current job as ``status`` reports it: ``{id, state, stage}`` or None."""
        cur = self._current
        if cur is None:
            return None
        return {"id": cur.id, "state": cur.state,
                "stage": cur.stage if cur.state == "initializing" else None}

    @property
    def held(self) -> str | None:
        """The ended job whose host is held for debugging, if any."""
        return self._held.job_id if self._held is not None else None

    @property
    def current_job(self) -> dict[str, Any] | None:
        return self._current.job if self._current is not None else None

    @property
    def pending_events(self) -> list[dict[str, Any]]:
        """Events not yet acknowledged, in order."""
        return self.outbox.events

    @property
    def ended(self) -> list[dict[str, Any]]:
        """Final events of the last jobs that ended here, oldest first."""
        return [dict(e) for e in self._ended]

    @property
    def connected(self) -> bool:
        return self._session is not None

    @property
    def services(self) -> dict[str, tuple[str, int]]:
        """The current job's services, as its driver last reported them."""
        return dict(self._services)

    # -- public endpoints ----------------------------------------------------------------

    def report_endpoints(self, job_id: str, endpoints: list[dict[str, Any]]) -> None:
        """The current job's public endpoints changed: tell the switchboard (``job_endpoints``,
        protocol minor 2), now or after the next reconnect, until it acknowledges."""
        cur = self._current
        if (cur is None or cur.id != job_id) and self.held != job_id:
            return  # a held job's endpoints may change too (re-published after a restart)
        self._endpoints = (job_id, [dict(e) for e in endpoints])
        self._last_endpoints = self._endpoints
        self._send_endpoints()

    def _send_endpoints(self) -> None:
        session, pending = self._session, self._endpoints
        if session is None or pending is None:
            return
        if getattr(session, "minor", protocol.MINOR) < 2:
            return  # the switchboard cannot take them
        rid = session.next_request_id()
        minor = getattr(session, "minor", protocol.MINOR)
        keys = self._ssh_host_keys
        host_keys = (keys[1] if keys is not None and keys[0] == pending[0]
                     and minor >= protocol.SSH_KEYS_MINOR else None)
        job_id, endpoints = pending
        if minor < protocol.ENDPOINT_AUTH_MINOR:  # an older switchboard refuses the field
            endpoints = [{k: v for k, v in e.items() if k != "auth"} for e in endpoints]
        if session.send(protocol.job_endpoints(rid, job_id, endpoints,
                                               ssh_host_keys=host_keys)):
            self._endpoints_sent = (rid, pending)
            self._later(self._backoff(0), self._endpoints_unacked, session, rid)

    def _endpoints_unacked(self, session: Session, rid: int) -> None:
        sent = self._endpoints_sent
        if session is self._session and sent is not None and sent[0] == rid:
            self._endpoints_sent = None  # no ack in time: send them again
            self._send_endpoints()

    def _on_endpoints_ack(self, message: dict[str, Any], pending: tuple[str, Any]) -> None:
        self._endpoints_sent = None
        error = None if message["ok"] else (message.get("error") or {})
        if error is not None and error.get("code") == UNAVAILABLE:
            self._later(self._backoff(0), self._resend_endpoints, pending)
            return
        if self._endpoints is pending:
            self._endpoints = None
        if error is not None:
            self.log.warn("{name}: the switchboard refused the endpoints of job {job}: "
                          "{code}: {text}", name=self.label, job=pending[0],
                          code=error.get("code"), text=error.get("message"))

    def _resend_endpoints(self, pending: tuple[str, Any]) -> None:
        if self._endpoints is pending and self._endpoints_sent is None:
            self._send_endpoints()

    def _later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` after ``delay`` seconds unless the runner closes first."""
        def run() -> None:
            self._calls.discard(call)
            fn(*args)

        call = self.reactor.callLater(delay, run)
        self._calls.add(call)

    # -- lifecycle ---------------------------------------------------------------------

    def _io(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        return self._io_lock.run(self._run_io, fn, *args, **kwargs)

    async def start(self) -> None:
        """Lock and read the state directory; re-adopt or report the job it names."""
        loaded = await self._io(self.files.open)
        self._ended = loaded.ended[-ENDED_KEEP:]
        await self.outbox.load(loaded.next_seq, loaded.events)
        await self._resume(loaded.current)
        if loaded.held is not None:
            await self._resume_hold(loaded.held)

    async def _resume(self, record: dict[str, Any] | None) -> None:
        """Re-adopt or report the job ``current-job.json`` names (``record``)."""
        if record is None:
            return
        job = record.get("job") if isinstance(record, dict) else None
        if not isinstance(job, dict) or not isinstance(job.get("id"), str):
            self.log.error("{name}: unusable current-job.json; ignoring it", name=self.label)
            await self._io(self.files.record, None, None, clear_current=True)
            return
        journaled = [event for event in self.outbox.events
                     if event["job_id"] == job["id"] and event.get("state") == "terminated"]
        if journaled or self._final_event(job["id"]) is not None:
            # It ended before the restart; the cleanup after its end was cut short.
            if self._final_event(job["id"]) is None:
                self._ended = [*self._ended[-(ENDED_KEEP - 1):], dict(journaled[-1])]
            await self._io(self.files.record, None, None, clear_current=True,
                           ended=list(self._ended))
            return
        state = record.get("state") if record.get("state") in ACTIVE_STATES else "assigned"
        stage = record.get("stage") if state == "initializing" else None
        if state == "initializing" and stage not in STAGES:
            stage = STAGES[0]
        cur = _Current(job, _Reporter(self, job["id"]), state=state, stage=stage, outcome=False)
        cur.results = self._job_results(cur)
        cur.results.resumed = True
        if state in ("ready", "terminating") or stage == "booting":
            cur.results.listen()
        self._current = cur
        self._notify_start(job)
        try:
            adopted = bool(self.driver.adopt(job, cur.reporter))
        except Exception:
            self.log.failure("{name}: the driver failed to adopt job {job}", name=self.label,
                             job=cur.id)
            adopted = False
        if adopted:
            self.log.info("{name}: re-adopted job {job} ({state})", name=self.label, job=cur.id,
                          state=state)
            cur.reporter.accept()
        else:
            self.log.warn("{name}: job {job} could not be re-adopted after a restart; "
                          "reporting it as host_dropped_job", name=self.label, job=cur.id)
            cur.reporter.discard()
            self._terminated(cur, "host_dropped_job", message=RESTART_MESSAGE)

    def stop_accepting(self) -> None:
        """Shutting down: ignore new start_job commands (the switchboard resends them)."""
        self._stopping = True

    async def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every event to be acknowledged."""
        return await self.outbox.flush(timeout)

    async def close(self) -> None:
        """Release the driver and the state directory; the job's files stay."""
        self._closed = True
        self.outbox.stop()
        for call in list(self._calls):
            if call.active():
                call.cancel()
        self._calls.clear()
        if self._current is not None:
            self._current.reporter.discard()
        if self._held is not None:
            self._held.cancel_timer()
        try:
            await maybeDeferred(self.driver.shutdown)
        except Exception:
            self.log.failure("{name}: driver shutdown failed", name=self.label)
        await self._io(self.files.close)
        self.outbox.wake()

    def stopService(self) -> Deferred[None]:
        """As a child of the supervisor's service: :meth:`close` (the supervisor calls
        :meth:`start` itself: start-up may fail)."""
        super().stopService()
        return Deferred.fromCoroutine(self.close())

    # -- the link ----------------------------------------------------------------------

    def link_opened(self, session: Session) -> None:
        self._session = session
        self._endpoints_sent = None
        self.outbox.opened(session)
        self._send_endpoints()
        self.snapshots.opened(session)

    def link_closed(self, session: Session) -> None:
        if session is self._session:
            self._session = None
        self.outbox.closed(session)
        self.snapshots.closed(session)

    def message_received(self, session: Session, message: dict[str, Any]) -> None:
        """Handle one validated message of ``protocol.TO_SUPERVISOR``."""
        kind = message["type"]
        if kind == "ack":
            self._on_ack(session, message)
        elif kind == "start_job":
            self._spawn(session, message, self._start_job)
        elif kind == "stop_job":
            self._spawn(session, message, self._stop_job)
        elif kind == "status_request":
            self._spawn(session, message, self._status_request)
        elif kind == "snapshot_job":
            self.snapshots.request(session, message)
        elif kind == "renew_tokens":
            self._spawn(session, message, self._renew_tokens)

    def _spawn(self, session: Session, message: dict[str, Any], handler: Any) -> None:
        def crashed(failure: Failure) -> None:
            self.log.failure("{name}: handling {kind} failed", failure, name=self.label,
                             kind=message["type"])
            if message["type"] != "status_request":
                self._reply(session, protocol.ack(message["request_id"], (
                    "internal_error", "the supervisor failed to handle the command")))

        Deferred.fromCoroutine(handler(session, message)).addErrback(crashed)

    def _reply(self, session: Session, message: dict[str, Any]) -> None:
        if session is self._session:
            session.send(message)

    # -- commands ----------------------------------------------------------------------

    async def _start_job(self, session: Session, message: dict[str, Any]) -> None:
        rid = message["request_id"]
        job = message["job"]
        job_id = job["id"]
        cur = self._current
        if cur is not None and cur.id == job_id:
            self._reply(session, protocol.ack(rid, await cur.started()))
            return
        if cur is not None:
            self._reply(session, protocol.ack(rid, (
                "already_running", f"job {cur.id} is running on this host")))
            return
        held = self._held
        if held is not None and held.job_id != job_id:
            self._reply(session, protocol.ack(rid, (
                "already_running", f"the host is held for debugging failed job {held.job_id}")))
            return
        if self._stopping or self._closed:
            self.log.info("{name}: shutting down; not starting job {job}", name=self.label,
                          job=job_id)
            return
        final = self._final_event(job_id)
        if final is not None:
            self.log.info("{name}: job {job} already ended here; resending its final event",
                          name=self.label, job=job_id)
            self._reply(session, protocol.ack(rid))
            self._resend(final)
            return

        cur = _Current(job, _Reporter(self, job_id))
        cur.results = self._job_results(cur)
        self._current = cur
        self.console.reset()
        self._notify_start(job)
        error: tuple[str, str] | None = None
        try:
            await self._io(self.files.record, None, None, current=self._record(cur))
        except Exception:
            self.log.failure("{name}: cannot write current-job.json", name=self.label)
            error = ("internal_error", "the supervisor cannot write its state directory")
        if error is None:
            try:
                await maybeDeferred(self.driver.start, job, cur.reporter)
            except StartRefused as e:
                error = (e.code, e.message)
            except Exception as e:
                self.log.failure("{name}: the driver failed to start job {job}",
                                 name=self.label, job=job_id)
                error = ("internal_error", f"the host driver failed: {type(e).__name__}")
        if error is not None:
            cur.reporter.discard()
            if self._current is cur:
                self._current = None
                self._io(self.files.record, None, None, clear_current=True).addErrback(
                    lambda f: self.log.failure("{name}: cannot remove current-job.json", f,
                                               name=self.label))
            self.log.warn("{name}: refused job {job}: {code}: {message}", name=self.label,
                          job=job_id, code=error[0], message=error[1])
        else:
            self.log.info("{name}: started job {job}", name=self.label, job=job_id)
        self._reply(session, protocol.ack(rid, error))
        if error is None:
            cur.reporter.accept()  # held reports first, then whatever waited for the start
        cur.settle(error)

    async def _stop_job(self, session: Session, message: dict[str, Any]) -> None:
        rid = message["request_id"]
        job_id = message["job_id"]
        held = self._held
        if held is not None and held.job_id == job_id:
            await self._release(held, message["reason"])  # acked once torn down
            self._reply(session, protocol.ack(rid))
            return
        cur = self._current
        if cur is not None and cur.id == job_id and cur.outcome is None:
            await cur.started()
            cur = self._current
        if cur is None or cur.id != job_id:
            self._reply(session, protocol.ack(rid))
            final = self._final_event(job_id)
            if final is not None:
                self._resend(final)
            return
        if cur.stop_reason is None:
            hold = self._hold_for(cur, message["reason"], None)
            if hold is not None and cur.state != "terminating" and not cur.outcome:
                # Timed out: report the end now and keep the host as it is.
                cur.stop_reason = message["reason"]
                self._terminated(cur, cur.stop_reason, message="the job's time is up; its "
                                 "host is held for debugging", hold=hold)
                self._reply(session, protocol.ack(rid))
                return
            cur.stop_reason = message["reason"]
            self.log.info("{name}: stopping job {job} ({reason})", name=self.label, job=job_id,
                          reason=cur.stop_reason)
        if cur.state != "terminating":
            self._begin_terminating(cur, cur.stop_reason)
        try:
            await maybeDeferred(self.driver.stop, job_id, cur.stop_reason)
        except Exception:
            self.log.failure("{name}: the driver failed to stop job {job}", name=self.label,
                             job=job_id)
            self._reply(session, protocol.ack(rid, ("internal_error",
                                                    "the host driver failed to stop the job")))
            return
        self._reply(session, protocol.ack(rid))

    async def _renew_tokens(self, session: Session, message: dict[str, Any]) -> None:
        rid = message["request_id"]
        renewed = {key: message[key] for key in ("log_servers", "proxies") if message.get(key)}
        held = self._held
        if (held is not None and held.job_id == message["job_id"] and not held.releasing
                and message.get("held_for") is not None):
            await self._extend_hold(held, message["held_for"],
                                    {**held.job, "timeout": message["timeout"], **renewed})
            self._reply(session, protocol.ack(rid))
            return
        cur = self._current
        if cur is None or cur.id != message["job_id"]:
            self._reply(session, protocol.ack(rid))  # ended (or never here): nothing to renew
            return
        cur.job = {**cur.job, "timeout": message["timeout"], **renewed}
        self.log.info("{name}: job {job} extended to a timeout of {timeout:g} s; fresh tokens "
                      "for {what}", name=self.label, job=cur.id, timeout=message["timeout"],
                      what=", ".join(sorted(renewed)) or "nothing")
        job = cur.job
        self._tell(lambda observer: observer.tokens_renewed(job), "tokens_renewed")
        # Journaled after the writes queued before it: a restart re-adopts the fresh tokens.
        await self._io(self.files.record, None, None, current=self._record(cur))
        self._reply(session, protocol.ack(rid))

    async def _status_request(self, session: Session, message: dict[str, Any]) -> None:
        # Every journaled event first: the switchboard must see them before the status.
        await self.outbox.drained()
        if session is self._session:
            minor = getattr(session, "minor", protocol.MINOR)
            kinds = getattr(self.driver, "kinds", None)
            if minor < protocol.KINDS_MINOR:
                kinds = None  # An older switchboard refuses the field.
            job = self.status()
            if job is not None and minor >= protocol.RENEW_MINOR and self._current is not None:
                job["timeout"] = self._current.job["timeout"]  # older: refused
            held, hold = self._held, {}
            if held is not None and minor >= protocol.HOLD_RENEW_MINOR:  # older: refused
                hold = {"held_for": max(0.0, held.until - self.reactor.seconds()),
                        "held_timeout": held.job["timeout"]}
            session.send(protocol.status(
                message["request_id"], job,
                list(kinds) if kinds is not None else None,
                held=self.held if minor >= protocol.HOLD_MINOR else None, **hold))

    # -- reports from the driver ---------------------------------------------------------

    def _report(self, job_id: str, handler: Callable[..., None], args: tuple[Any, ...]) -> None:
        """A driver's report (``handler``, a ``_on_*`` method, with ``args``) about a job."""
        cur = self._current
        if self._closed or cur is None or cur.id != job_id:
            held = self._held
            if (not self._closed and held is not None and held.job_id == job_id
                    and handler in (JobRunner._on_exited, JobRunner._on_failed,
                                    JobRunner._on_stopped)
                    and (held.releasing or getattr(self.driver, "current", None) != job_id)):
                self._hold_over(held)  # the driver tore the held host down
                return
            if (not self._closed and held is not None and held.job_id == job_id
                    and handler is JobRunner._on_services and not held.releasing):
                # A re-adopted held host publishes its services again (jobexposure.py).
                services = dict(args[0])
                self._tell(lambda observer: observer.services(job_id, services), "services")
                return
            self.log.debug("{name}: ignoring {what} for job {job}, which is not current",
                           name=self.label, what=handler.__name__.removeprefix("_on_"),
                           job=job_id)
            return
        handler(self, cur, *args)

    def _console(self, job_id: str, data: bytes) -> None:
        cur = self._current
        if cur is not None and cur.id == job_id:
            self.console.append(data)
            if cur.results is not None:
                cur.results.console(data)
            self._tell(lambda observer: observer.console(job_id, data), "console")
        elif not self._closed and self._held is not None and self._held.job_id == job_id:
            # A held host's console goes on (to the job's log) until the hold is over.
            self._tell(lambda observer: observer.console(job_id, data), "console")

    def _job_results(self, cur: _Current) -> JobResults:
        """The job's results: its console patterns, lines to the results observers."""
        job_id = cur.id

        def write(line: bytes) -> None:
            self._tell(lambda observer: observer.results(job_id, line), "results")

        try:
            return JobResults(job_id, cur.job.get("results"), write,
                              lambda status, message: self._results_end(cur, status, message))
        except ResultsError as e:
            self.log.error("{name}: job {job}: console patterns ignored: {problem}",
                           name=self.label, job=job_id, problem=str(e))
            return JobResults(job_id, None, write, lambda *_: None)

    def _on_result(self, cur: _Current, message: dict[str, Any]) -> None:
        if cur.results is not None:
            cur.results.agent(message)

    def _results_end(self, cur: _Current, exit_status: int, message: str) -> None:
        """Console patterns saw the end of the run: stop the job, ``workload_exited``."""
        if self._current is not cur or cur.stop_reason is not None:
            return
        self.log.info("{name}: job {job}: the console shows the end of the run (exit status "
                      "{status})", name=self.label, job=cur.id, status=exit_status)
        cur.results_exit = (exit_status, message)
        cur.stop_reason = "workload_exited"
        hold = self._hold_for(cur, "workload_exited", exit_status)
        if hold is not None:
            def held() -> None:  # on a later turn, as the stop below; the host stays as it is
                if self._current is cur:
                    self._terminated(cur, "workload_exited", exit_status=exit_status,
                                     message=message, hold=hold)

            self._later(0, held)
            return
        if cur.state != "terminating":
            self._begin_terminating(cur, cur.stop_reason)

        def stop() -> None:  # on a later turn: the driver may be reporting console output
            if self._current is cur:
                maybeDeferred(self.driver.stop, cur.id, "workload_exited").addErrback(
                    lambda f: self.log.failure("{name}: the driver failed to stop job {job}",
                                               f, name=self.label, job=cur.id))

        self._later(0, stop)

    def _on_services(self, cur: _Current, services: dict[str, tuple[str, int]]) -> None:
        if services == self._services:
            return
        self._services = services
        self._tell(lambda observer: observer.services(cur.id, dict(services)), "services")

    def _on_ssh_host_keys(self, cur: _Current, keys: list[str]) -> None:
        """The guest reported its SSH host keys: send them with the endpoints (minor 5)."""
        if self._ssh_host_keys == (cur.id, keys):
            return
        self._ssh_host_keys = (cur.id, keys)
        last = self._last_endpoints
        self._endpoints = (cur.id, list(last[1]) if last is not None and last[0] == cur.id
                           else [])
        self._send_endpoints()

    def _notify_start(self, job: dict[str, Any]) -> None:
        self._tell(lambda observer: observer.job_started(job), "job_started")

    def _on_stage(self, cur: _Current, name: str) -> None:
        if name not in STAGES:
            self.log.error("{name}: driver reported unknown stage {stage!r}", name=self.label,
                           stage=name)
            return
        if cur.state == "assigned" or (cur.state == "initializing" and cur.stage in STAGES
                                       and STAGES.index(name) > STAGES.index(cur.stage)):
            if name == "booting" and cur.results is not None:
                cur.results.listen()
            cur.state, cur.stage = "initializing", name
            self._emit(cur.id, "initializing", stage=name, current=self._record(cur))

    def _on_ready(self, cur: _Current) -> None:
        if cur.state in ("assigned", "initializing"):
            if cur.results is not None:
                cur.results.listen()
            cur.state, cur.stage = "ready", None
            self._emit(cur.id, "ready", current=self._record(cur))

    def _on_terminating(self, cur: _Current, reason: str | None = None) -> None:
        if cur.state != "terminating":
            if reason not in REASONS:
                reason = cur.stop_reason or "workload_exited"
            self._begin_terminating(cur, reason)

    def _on_exited(self, cur: _Current, exit_status: int, message: str = "") -> None:
        status = int(exit_status)
        status = max(-(2**31), min(status, 2**31 - 1))
        # A driver that holds kept the host when a held job's workload failed (hold.py).
        self._terminated(cur, "workload_exited", exit_status=status, message=message,
                         hold=self._hold_for(cur, "workload_exited", status))

    def _on_failed(self, cur: _Current, reason: str, message: str = "") -> None:
        if reason not in REASONS:
            self.log.error("{name}: driver reported unknown reason {reason!r}", name=self.label,
                           reason=reason)
            reason = "internal_error"
        self._terminated(cur, reason, message=message)

    def _on_stopped(self, cur: _Current, reason: str, message: str = "") -> None:
        if reason not in REASONS:
            reason = cur.stop_reason or "internal_error"
        if reason == "workload_exited" and cur.results_exit is not None:
            self._terminated(cur, reason, exit_status=cur.results_exit[0],
                             message=cur.results_exit[1])
            return
        self._terminated(cur, reason, message=message)

    def _begin_terminating(self, cur: _Current, reason: str) -> None:
        cur.state, cur.stage = "terminating", None
        self._emit(cur.id, "terminating", reason=reason, current=self._record(cur))

    def _terminated(self, cur: _Current, reason: str, *, exit_status: int | None = None,
                    message: str | None = None, hold: float | None = None) -> None:
        """The job ended: its final event; with ``hold`` (seconds) its host is then held,
        unless the driver no longer runs it (it tore the host down: nothing to hold)."""
        if hold is not None and getattr(self.driver, "current", cur.id) != cur.id:
            self.log.info("{name}: job {job} failed but its host is already torn down; "
                          "nothing to hold", name=self.label, job=cur.id)
            hold = None
        if cur.results is not None:  # the summary goes before the final event closes the logs
            cur.results.finish(reason, exit_status, message or "")
        final: dict[str, Any] = {"job_id": cur.id, "state": "terminated", "reason": reason}
        if exit_status is not None:
            final["exit_status"] = exit_status
        if message:
            final["message"] = str(message)[:4096]
        self._ended = [e for e in self._ended if e.get("job_id") != cur.id]
        self._ended = [*self._ended[-(ENDED_KEEP - 1):], final]
        if self._current is cur:
            self._current = None
            self._services = {}
        if self._endpoints is not None and self._endpoints[0] == cur.id:
            self._endpoints = None
        self._last_endpoints = self._ssh_host_keys = None
        until = self.reactor.seconds() + hold if hold is not None else None
        self._emit(**final, held=hold is not None, clear_current=True, ended=list(self._ended),
                   hold=hold_record(cur.job, until) if until is not None else None)
        if until is not None:
            self._begin_hold(cur.job, until)

    # -- holding a failed job's host (hold.py) -----------------------------------------

    def _hold_for(self, cur: _Current, reason: str, exit_status: int | None) -> float | None:
        """Seconds to hold ``cur``'s host if it ends so, or None (see ``hold_for``); only
        a driver that ``holds`` keeps a host."""
        seconds = hold_for(cur.job, reason, exit_status)
        if seconds is not None and not getattr(self.driver, "holds", False):
            self.log.warn("{name}: the {driver} driver cannot hold a host; job {job} is torn "
                          "down", name=self.label, driver=getattr(self.driver, "name", "?"),
                          job=cur.id)
            return None
        return seconds

    def _begin_hold(self, job: dict[str, Any], until: float, resumed: bool = False) -> None:
        """Hold ended ``job``'s host until ``until`` (reactor seconds); the driver is told
        (``hold(job_id)``, if it has it) that the job it still runs is held."""
        job_id = str(job["id"])
        seconds = max(0.0, until - self.reactor.seconds())
        held = Hold(job, until)
        held.timer = self.reactor.callLater(seconds, self._hold_expired, held)
        self._held = held
        hold = getattr(self.driver, "hold", None)
        if callable(hold) and not resumed:
            try:
                hold(job_id)
            except Exception:
                self.log.failure("{name}: the driver failed to hold job {job}'s host",
                                 name=self.label, job=job_id)
        self.log.info("{name}: job {job} failed; its host is held for {seconds:g} s",
                      name=self.label, job=job_id, seconds=seconds)
        change = hold_change(job_id, "resumed" if resumed else "started",
                             self.reactor.seconds(), until=until)
        self._tell(lambda observer: observer.hold_changed(change), "hold_changed")

    async def _extend_hold(self, held: Hold, seconds: float, job: dict[str, Any]) -> None:
        """The switchboard moved the hold's end (``renew_tokens.held_for``, minor 9): it now
        ends ``seconds`` from now, and ``job`` carries the fresh tokens (journaled in
        ``held.json``, so a restart that re-adopts the host keeps both)."""
        until = self.reactor.seconds() + seconds
        held.job, held.until = job, until
        held.cancel_timer()
        held.timer = self.reactor.callLater(seconds, self._hold_expired, held)
        self.log.info("{name}: the hold of job {job} now ends in {seconds:.0f} s; fresh tokens "
                      "for {what}", name=self.label, job=held.job_id, seconds=seconds,
                      what=", ".join(k for k in ("log_servers", "proxies") if job.get(k)))
        self._tell(lambda observer: observer.tokens_renewed(job), "tokens_renewed")
        change = hold_change(held.job_id, "extended", self.reactor.seconds(), until=until)
        self._tell(lambda observer: observer.hold_changed(change), "hold_changed")
        # After the writes queued before it (the hold's own record among them).
        await self._io(self.files.record, None, None, held=hold_record(job, until))

    async def _resume_hold(self, record: dict[str, Any]) -> None:
        """After a restart: the driver re-adopts the host ``held.json`` (``record``) says is
        held, and the hold goes on until its end; or the hold is over (the driver could
        not re-adopt the host, and left nothing of it running)."""
        job = record.get("job")
        until = record.get("until")
        job_id = job.get("id") if isinstance(job, dict) else None
        cur = self._current
        if (not isinstance(job_id, str) or not isinstance(until, int | float)
                or isinstance(until, bool) or self._final_event(job_id) is None
                or (cur is not None and cur.id == job_id)):
            # Unusable, or the job never ended (a crash before its final event).
            await self._io(self.files.record, None, None, clear_held=True)
            return
        reporter = _Reporter(self, job_id)
        reporter.accept()
        adopt_held = getattr(self.driver, "adopt_held", None)
        adopted = False
        if callable(adopt_held):
            try:
                adopted = bool(adopt_held(job, reporter))
            except Exception:
                self.log.failure("{name}: the driver failed to re-adopt held job {job}",
                                 name=self.label, job=job_id)
        if not adopted:
            reporter.discard()
            self.log.warn("{name}: the hold of job {job} is over: its host could not be "
                          "re-adopted after a restart", name=self.label, job=job_id)
            await self._io(self.files.record, None, None, clear_held=True)
            return
        self._notify_start(job)  # its proxies, to publish the held host's services again
        self._begin_hold(job, float(until), resumed=True)
        self.log.info("{name}: re-adopted the held host of job {job}", name=self.label,
                      job=job_id)

    def _hold_expired(self, held: Hold) -> None:
        held.timer = None
        Deferred.fromCoroutine(self._release(held, "execution_timeout")).addErrback(
            lambda f: self.log.failure("{name}: ending the hold of job {job} failed", f,
                                       name=self.label, job=held.job_id))

    async def _release(self, held: Hold, reason: str) -> None:
        """End the hold: the driver tears the host down; returns once it has (or after
        ``RELEASE_WAIT`` seconds)."""
        if not held.releasing:
            held.releasing = True
            held.reason = end_reason(reason)
            held.cancel_timer()
            self.log.info("{name}: ending the hold of job {job} ({reason})", name=self.label,
                          job=held.job_id, reason=reason)
            self._later(RELEASE_WAIT, self._hold_over, held)
            try:
                await maybeDeferred(self.driver.stop, held.job_id, reason)
            except Exception:
                self.log.failure("{name}: the driver failed to stop held job {job}",
                                 name=self.label, job=held.job_id)
                self._hold_over(held)
            if getattr(self.driver, "current", held.job_id) != held.job_id:
                self._hold_over(held)  # nothing left of it
        await held.wait()

    def _hold_over(self, held: Hold) -> None:
        if held.ended:
            return
        if self._held is held:
            self._held = None
        if not self._closed:
            self._io(self.files.record, None, None, clear_held=True).addErrback(
                lambda f: self.log.failure("{name}: cannot remove held.json", f,
                                           name=self.label))
        held.over()
        self.log.info("{name}: the hold of job {job} is over ({reason}); the host is free",
                      name=self.label, job=held.job_id, reason=held.reason)
        change = hold_change(held.job_id, "ended", self.reactor.seconds(), reason=held.reason)
        self._tell(lambda observer: observer.hold_changed(change), "hold_changed")
        self._tell(lambda observer: observer.hold_ended(held.job_id), "hold_ended")

    @staticmethod
    def _record(cur: _Current) -> dict[str, Any]:
        return {"job": cur.job, "state": cur.state, "stage": cur.stage}

    def _final_event(self, job_id: str) -> dict[str, Any] | None:
        for event in reversed(self._ended):
            if event.get("job_id") == job_id:
                return event
        return None

    def _resend(self, final: dict[str, Any]) -> None:
        if self.outbox.has_final(final["job_id"]):
            return  # still on its way
        self._emit(**final)

    # -- events ----------------------------------------------------------------------------

    def _emit(self, job_id: str, state: str, *, stage: str | None = None,
              reason: str | None = None, exit_status: int | None = None,
              message: str | None = None, held: bool = False,
              current: dict[str, Any] | None = None,
              clear_current: bool = False, ended: list[dict[str, Any]] | None = None,
              hold: dict[str, Any] | None = None) -> None:
        """Journal an event (and the state files that change with it), then send it."""
        event: dict[str, Any] = {"job_id": job_id, "state": state}
        for key, value in (("stage", stage), ("reason", reason), ("exit_status", exit_status),
                           ("message", message)):
            if value is not None:
                event[key] = value
        if held:
            event["held"] = True
        self.log.info("{name}: job {job} {state}{detail}", name=self.label, job=job_id,
                      state=state, detail=f" ({stage or reason})" if stage or reason else "")
        self.outbox.add(event, current=current, clear_current=clear_current, ended=ended,
                        held=hold)
        self._tell(lambda observer: observer.event(dict(event)), "event")

    def _on_ack(self, session: Session, message: dict[str, Any]) -> None:
        rid = message["request_id"]
        if self.snapshots.ack(session, message):
            return
        sent = self._endpoints_sent
        if session is self._session and sent is not None and sent[0] == rid:
            self._on_endpoints_ack(message, sent[1])
            return
        self.outbox.ack(session, message)
