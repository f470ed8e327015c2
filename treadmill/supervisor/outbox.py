"""The runner's outbox: job events, journaled, then sent until acknowledged.

An entry is a job event (``{"job_id", "state", ...}``: a ``job_event``) or a
console notice (``{"job_id", "console": {...}}``: a ``console_event``, minor 7,
``consolenotices``); a switchboard older than minor 7 gets no console notices
(they are dropped from the outbox, counted in ``dropped``).

Each event is written to the journal (in a thread, ``fsync``-ed) before it is
sent; events are sent one at a time, in order, each after the previous one was
acknowledged, on whichever connection is open, and deleted from the journal
when acknowledged. After a reconnect the outbox simply starts again from its
head. An event not acknowledged within ``ack_timeout`` seconds is sent again
on the same connection (a new request id; the switchboard applies a repeat as
a no-op), and so is one acknowledged with the retryable error
``unavailable`` (the switchboard could not store it), after a pause; both
delays double with each attempt, with jitter, up to ``resend_max``. An ack for
any of the request ids the event went out with acknowledges it. Other refusals
are logged and the event dropped.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.journal import StateFiles

__all__ = ["UNAVAILABLE", "EventOutbox", "Session"]

# An ack error meaning "not stored, send it again later" (docs/protocol.md). The literal
# stands until treadmill/protocol/supervisor.py names it (the switchboard's side).
UNAVAILABLE = "unavailable"


class Session(Protocol):
    """What the runner needs of an open connection (``link.SupervisorProtocol``)."""

    def send(self, message: dict[str, Any]) -> bool: ...

    def next_request_id(self) -> int: ...


def message(request_id: int, entry: dict[str, Any]) -> dict[str, Any]:
    """The wire message of an outbox entry."""
    if "console" in entry:
        return protocol.console_event(request_id, entry["job_id"], **entry["console"])
    return dict(protocol.job_event(request_id, **entry))


def describe(entry: dict[str, Any]) -> str:
    """What an entry is, for the log: a job state, or ``console opened``."""
    if "console" in entry:
        return f"console {entry['console'].get('event')}"
    return str(entry.get("state"))


class _Pending:
    """One event in the outbox."""

    __slots__ = ("event", "seq", "written")

    def __init__(self, seq: int, event: dict[str, Any], written: bool = False):
        self.seq = seq
        self.event = event
        self.written = written


class EventOutbox:
    """The job events of one runner not yet acknowledged (see the module docstring).

    ``io(fn, *args)`` runs the state directory's blocking calls, serialised
    (the runner's); ``backoff(attempt)`` is the pause before the next send of
    an event sent ``attempt + 1`` times.
    """

    log = Logger()

    def __init__(self, reactor: Any, files: StateFiles, io: Callable[..., Deferred[Any]], *,
                 backoff: Callable[[int], float], label: str = "supervisor"):
        self.reactor = reactor
        self.files = files
        self._io = io
        self._backoff = backoff
        self.label = label
        self._queue: collections.deque[_Pending] = collections.deque()
        # The outbox's head once sent on the open connection, until acknowledged; the
        # request ids it went out with; the timer that sends it again; how many times.
        self._inflight: _Pending | None = None
        self._sent_rids: set[int] = set()
        self._late_rids: set[int] = set()  # other ids of the last acknowledged event
        self._retry_call: Any = None
        self._attempts = 0
        self._seq = 1
        self.session: Session | None = None
        self.dropped = 0  # console notices an older switchboard could not take
        self._drain_waiters: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def events(self) -> list[dict[str, Any]]:
        """Events not yet acknowledged, in order."""
        return [dict(p.event) for p in self._queue]

    async def load(self, next_seq: int, events: Iterable[tuple[int, dict[str, Any]]]) -> None:
        """After a restart: the journal's events (``(seq, event)``) come first."""
        self._seq = next_seq
        for seq, event in events:
            try:
                protocol.validate(message(0, event))
            except (TypeError, protocol.ProtocolError):
                # Sending it would only get the link closed for a violation, forever.
                self.log.error("{name}: dropping invalid journal entry {seq}", name=self.label,
                               seq=seq)
                await self._io(self.files.remove_event, seq)
                continue
            self._queue.append(_Pending(seq, event, written=True))
        if self._queue:
            self.log.info("{name}: {count} job events to resend from the journal",
                          name=self.label, count=len(self._queue))

    def add(self, event: dict[str, Any], **record: Any) -> None:
        """Journal ``event`` with the state files that change with it (``record``: the
        journal's ``current``, ``clear_current``, ``ended``), then send it."""
        pending = _Pending(self._seq, event)
        self._seq += 1
        self._queue.append(pending)

        def written(_: Any) -> None:
            pending.written = True
            self._pump()

        def failed(failure: Failure) -> None:
            # Better sent unjournaled than not at all.
            self.log.failure("{name}: cannot journal an event of job {job}", failure,
                             name=self.label, job=event["job_id"])
            written(None)

        self._io(self.files.record, pending.seq, event, **record).addCallbacks(written, failed)

    def has_final(self, job_id: str) -> bool:
        """Whether the job's ``terminated`` event is still on its way."""
        return any(p.event["job_id"] == job_id and p.event.get("state") == "terminated"
                   for p in self._queue)

    def opened(self, session: Session) -> None:
        """A connection opened: send from the head again."""
        self.session = session
        self._forget_inflight()
        self._attempts = 0
        self._pump()

    def closed(self, session: Session) -> None:
        if session is self.session:
            self.session = None
            self._forget_inflight()
            self._fire_drain_waiters()

    async def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every event to be acknowledged."""
        if not self._queue:
            return True
        if self.session is None:
            return False
        waiter = self.drained()
        timer = self.reactor.callLater(timeout, lambda: waiter.called or waiter.callback(None))
        await waiter
        if timer.active():
            timer.cancel()
        return not self._queue

    def stop(self) -> None:
        """The runner closes: send nothing more."""
        self._cancel_retry()

    def _pump(self) -> None:
        """Send the outbox's head if nothing is awaiting an ack."""
        session = self.session
        if session is None or self._inflight is not None or not self._queue:
            return
        head = self._queue[0]
        if not head.written:
            return
        if "console" in head.event and \
                getattr(session, "minor", protocol.MINOR) < protocol.CONSOLE_MINOR:
            self._drop_head(head)  # the switchboard cannot take it (minor < 7)
            return
        self._send_head(session, head)

    def _drop_head(self, head: _Pending) -> None:
        self.dropped += 1
        self._queue.popleft()
        self._forget(head)

    def _forget(self, head: _Pending) -> None:
        """``head`` left the queue: off the journal, and on with the next."""
        self._io(self.files.remove_event, head.seq).addErrback(
            lambda f: self.log.failure("{name}: cannot remove a journal entry", f,
                                       name=self.label))
        self._pump()
        if not self._queue:
            self._fire_drain_waiters()

    def _send_head(self, session: Session, head: _Pending) -> None:
        """Send ``head`` (again) and wait ``ack_timeout`` (backing off) for its ack."""
        rid = session.next_request_id()
        if not session.send(message(rid, head.event)):
            return  # closing: link_closed follows, and the next connection sends it
        if self._inflight is not head:
            self._inflight, self._sent_rids = head, set()
        self._sent_rids.add(rid)
        self._attempts += 1
        self._retry_after(self._backoff(self._attempts - 1), "timeout")

    def _retry_after(self, delay: float, why: str) -> None:
        self._cancel_retry()
        self._retry_call = self.reactor.callLater(delay, self._retry, delay, why)

    def _cancel_retry(self) -> None:
        call, self._retry_call = self._retry_call, None
        if call is not None and call.active():
            call.cancel()

    def _forget_inflight(self) -> None:
        """The connection changed: what was sent on the old one is not awaited."""
        self._cancel_retry()
        self._inflight = None
        self._sent_rids = set()
        self._late_rids = set()

    def _retry(self, delay: float, why: str) -> None:
        self._retry_call = None
        head, session = self._inflight, self.session
        if head is None or session is None:
            return
        if not self._queue or self._queue[0] is not head:  # cannot happen; stay safe
            self._forget_inflight()
            self._pump()
            return
        if why == "timeout":
            self.log.warn("{name}: no ack for the {state} event of job {job} within "
                          "{delay:.1f} s; sending it again (attempt {attempt})",
                          name=self.label, state=describe(head.event), job=head.event["job_id"],
                          delay=delay, attempt=self._attempts + 1)
        self._send_head(session, head)

    def ack(self, session: Session, answer: dict[str, Any]) -> None:
        """An ``ack`` that is not the runner's (endpoints, snapshots): for the event in flight."""
        rid = answer["request_id"]
        head = self._inflight
        if session is not self.session or head is None or rid not in self._sent_rids:
            if session is self.session and rid in self._late_rids:
                self._late_rids.discard(rid)  # a resent event's other copy: already done
                return
            self.log.warn("{name}: ignoring an ack for unknown request {rid}", name=self.label,
                          rid=rid)
            return
        error = None if answer["ok"] else (answer.get("error") or {})
        if error is not None and error.get("code") == UNAVAILABLE:
            # Not stored (the switchboard's database is away): the same event, later.
            delay = self._backoff(self._attempts - 1)
            self.log.warn("{name}: the switchboard could not store the {state} event of job "
                          "{job} ({text}); sending it again in {delay:.1f} s",
                          name=self.label, state=describe(head.event),
                          job=head.event["job_id"], text=error.get("message"), delay=delay)
            self._retry_after(delay, UNAVAILABLE)
            return
        self._cancel_retry()
        self._inflight = None
        self._late_rids = self._sent_rids - {rid}
        self._sent_rids = set()
        self._attempts = 0
        if self._queue and self._queue[0] is head:
            self._queue.popleft()
        if error is not None:
            self.log.warn("{name}: the switchboard refused the {state} event of job {job}: "
                          "{code}: {text}", name=self.label, state=describe(head.event),
                          job=head.event["job_id"], code=error.get("code"),
                          text=error.get("message"))
        self._forget(head)

    def drained(self) -> Deferred[None]:
        """Fires when the outbox is empty, or when the connection is lost."""
        if not self._queue:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drain_waiters.append(waiter)
        return waiter

    def wake(self) -> None:
        """Fire the :meth:`drained` waiters (the runner closed)."""
        self._fire_drain_waiters()

    def _fire_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)
