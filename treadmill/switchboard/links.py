"""The switchboard's side of the supervisor link (``docs/protocol.md``).

:class:`SupervisorSession` is one supervisor's WebSocket; :class:`SupervisorLinks`
is this instance's registry of them and reacts to database notifications:
a job assigned to (or stopping on) a host whose link it holds is sent to that
host; a host whose session changed elsewhere is closed as superseded.
Everything durable is in the database: which instance and session hold a
host's link, what each host should run.

At most ``max_handshakes`` handshakes (upgrade to first reconciliation) are under way
at once (:mod:`treadmill.switchboard.admission`); beyond them
:class:`SupervisorResource` holds the upgrade in a FIFO queue, without any
database work, until a slot frees, and answers ``503`` with ``Retry-After``
only when ``handshake_queue`` upgrades wait already or one waited
``handshake_wait`` seconds.
"""

from __future__ import annotations

import itertools
import random
import uuid
from typing import Any

from autobahn.exception import Disconnected
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET

from treadmill.common import sshkeys
from treadmill.common.captoken import CapabilitySigner, bearer_token
from treadmill.common.http import ApiError, respond_error
from treadmill.common.settingsfile import config_class
from treadmill.common.timers import every
from treadmill.common.wsfactory import PreciseServerFactory
from treadmill.common.wsjson import JsonSession, QuietLogger
from treadmill.protocol import supervisor as protocol
from treadmill.protocol.supervisor import CloseCode, ProtocolError
from treadmill.switchboard import credentials
from treadmill.switchboard.admission import HandshakeGate, QueueTimeout, ReactorLag, Slot
from treadmill.switchboard.audit import ConsoleAudit
from treadmill.switchboard.batching import Batcher
from treadmill.switchboard.database import unavailable
from treadmill.switchboard.holds import HostHold
from treadmill.switchboard.jobstart import job_start
from treadmill.switchboard.jobstate import InvalidTransition, Reason, Stage, State, Status
from treadmill.switchboard.notifications import EXTENDED, HostNote, JobNote, SnapshotNote
from treadmill.switchboard.reconcile import (
    Action,
    Advance,
    End,
    Expected,
    Reported,
    Start,
    Stop,
    decide,
)
from treadmill.switchboard.registrar import LinkRegistrar
from treadmill.switchboard.renewal import outdated, renew_tokens
from treadmill.switchboard.settings import SETTINGS
from treadmill.switchboard.store import Store
from treadmill.switchboard.store.base import INSTANCE_DEAD_AFTER
from treadmill.switchboard.store.errors import NotFound, NotYourJob

REQUEST_TIMEOUT = 30.0
PING_SLACK = 1.25
"""A link is pinged once silent this many ``ping_interval``s: a supervisor pinging at the
same interval (its next ping ``interval`` after each pong, up to 50 ms later: an interval,
a round trip and that apart) is heard in time despite its reactor's and the network's
delays."""
_IMAGE_ERRORS = {"image_not_found", "image_invalid"}


class SupervisorSession(JsonSession, WebSocketServerProtocol):
    """One supervisor's connection."""

    log = QuietLogger(namespace="treadmill.switchboard.links.ws")
    violation_code = CloseCode.PROTOCOL_VIOLATION
    factory: SupervisorSessionFactory

    host_id: int | None = None
    host_name: str = "?"
    session: str | None = None
    token_digest: bytes = b""
    minor = 0
    registered = False
    lost = False  # the connection ended (maybe in the middle of the handshake)
    _slot: Slot | None = None  # this handshake's admission (admission.py) until it ends
    _heard = 0.0  # when the supervisor last sent a frame: a message, or its own ping

    def __init__(self) -> None:
        super().__init__()
        self._request_ids = itertools.count(1)
        self._pending: dict[int, Deferred[dict[str, Any]]] = {}
        self._inbox: Deferred[None] = Deferred()
        self._inbox.callback(None)
        self._retry: Any = None  # the pending retry of a failed reconciliation
        self._reconciling = 0  # reconciliations under way
        self._again = False  # retry once those are over
        self.hold = HostHold(self)  # an ended job's held host (holds.py)

    @property
    def links(self) -> SupervisorLinks:
        return self.factory.links

    # -- handshake -------------------------------------------------------------

    def connectionMade(self) -> None:
        self._slot = self.factory.take_slot()  # from SupervisorResource, which admitted us
        super().connectionMade()

    def onConnect(self, request: ConnectionRequest) -> Deferred[tuple[str, dict[str, str]]]:
        if self._slot is None:  # Not through SupervisorResource: the backstop.
            self._slot = self.links.gate.acquire()
            if self._slot is None:
                raise ConnectionDeny(503, BUSY)
        handshake = Deferred.fromCoroutine(self._authenticate(request))
        return handshake.addBoth(self._handshake_over)

    def _handshake_over(self, result: Any) -> Any:
        """Free the admission slot if the handshake failed; a registered link keeps it
        until its first reconciliation ends (:meth:`onOpen`), so that the gate bounds
        all the work of a new link, not only its registration."""
        if isinstance(result, Failure) and self._slot is not None:
            self._slot.release()
        return result

    def _settled(self, result: Any) -> Any:
        """The first reconciliation ended (or the link closed): free the slot."""
        if self._slot is not None:
            self._slot.release()
        return result

    async def _authenticate(self, request: ConnectionRequest) -> tuple[str, dict[str, str]]:
        if protocol.SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST,
                                 f"this switchboard speaks {protocol.SUBPROTOCOL}")
        token = bearer_token(request.headers.get("authorization"))
        if token is None or not credentials.looks_like_token(token,
                                                             credentials.HOST_TOKEN_PREFIX):
            raise ConnectionDeny(401, "a host token is required")
        try:
            self.minor = protocol.negotiate_minor(request.headers.get(protocol.MINOR_HEADER))
        except ProtocolError as e:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, str(e)) from None
        digest = credentials.token_hash(token)
        self.session = str(uuid.uuid4())
        try:
            # Finds the host by its token and records the link, with others (registrar.py).
            host = await self.links.registrar.register(digest, self.session)
            if host is None:
                raise ConnectionDeny(401, "unknown host token")
            self.host_id, self.host_name, self.token_digest = host["id"], host["name"], digest
            self.links.adopt(self)
            if self.lost:  # Closed (or timed out) while it registered: undo.
                if self.links.by_host.get(self.host_id) is self:
                    del self.links.by_host[self.host_id]
                self.links.spawn(self.links.store.link_disconnected(self.host_id,
                                                                    self.session))
                raise ConnectionDeny(ConnectionDeny.REQUEST_TIMEOUT,
                                     "the connection ended during the handshake")
        except Exception as e:
            if not unavailable(e):
                raise
            self.log.warn("Supervisor connection refused: the database is unavailable "
                          "({error})", error=_brief(e))
            raise ConnectionDeny(503, "the database is unavailable; try again later") from None
        self.registered = True
        return protocol.SUBPROTOCOL, {protocol.MINOR_HEADER: str(self.minor)}

    def onOpen(self) -> None:
        self._heard = self.links.reactor.seconds()
        try:
            self.transport.setTcpNoDelay(True)  # Small messages; no Nagle delay.
        except Exception:
            pass
        self.log.info("Supervisor of {host} connected (minor {minor})", host=self.host_name,
                      minor=self.minor)
        self.links.spawn(self.reconcile()).addBoth(self._settled)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.lost = True
        self.hold.cancel()
        if self._slot is not None:
            self._slot.release()  # closed mid-handshake, timed out, or before its first
            # reconciliation ended
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        pending_all, self._pending = self._pending, {}  # (an errback pops its entry)
        for pending in pending_all.values():
            if not pending.called:
                pending.errback(ConnectionError("the supervisor link closed"))
        if self.registered:
            self.registered = False
            self.log.info("Supervisor of {host} disconnected ({code} {reason})",
                          host=self.host_name, code=code, reason=reason or "")
            self.links.unregister(self)

    # -- keepalive -----------------------------------------------------------------

    def onPing(self, payload: bytes) -> None:
        """The supervisor's own keepalive: proof of life, answered."""
        self._heard = self.links.reactor.seconds()
        if self.state == self.STATE_OPEN:
            self.sendPong(payload)

    def onPong(self, payload: bytes) -> None:
        self._heard = self.links.reactor.seconds()

    def _sendAutoPing(self) -> None:
        """Autobahn's keepalive ping, sent only on a link silent for ``PING_SLACK`` ping
        intervals: a supervisor that pings (every one does, ``heartbeat.interval``) or
        talks is alive by its own frames, and pinging it too would double the keepalive
        traffic on both ends. A link silent that long gets a ping and ``ping_timeout``
        seconds to answer it.

        The next look is on the factory's timer, as Autobahn's own
        (:mod:`treadmill.common.wsfactory`: never early, the links' looks due together
        sharing one delayed call)."""
        wait = self.autoPingInterval * PING_SLACK - (self.links.reactor.seconds()
                                                     - self._heard)
        if wait > 0:
            self.autoPingPendingCall = self.factory.timer.call_later(wait, self._sendAutoPing)
            return
        super()._sendAutoPing()

    # -- messages ------------------------------------------------------------------

    def violation_message(self, text: str) -> dict[str, Any]:
        return protocol.protocol_error("violation", text)

    def log_violation(self, text: str) -> None:
        self.log.warn("Protocol violation by {host}: {text}", host=self.host_name, text=text)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._heard = self.links.reactor.seconds()
        if isBinary:
            self.violation("binary frames are not part of the protocol")
            return
        try:
            message = protocol.parse(payload, expect=protocol.TO_SWITCHBOARD)
        except ProtocolError as e:
            self.violation(str(e))
            return
        kind = message["type"]
        if kind in ("status", "ack"):
            pending = self._pending.pop(message["request_id"], None)
            if pending is None:
                self.violation(f"{kind} for unknown request {message['request_id']}")
            elif not pending.called:
                pending.callback(message)
        elif kind == "console_event" and self.minor < protocol.CONSOLE_MINOR:
            self.violation(f"console_event needs protocol minor {protocol.CONSOLE_MINOR}")
        elif kind in ("job_event", "job_endpoints", "snapshot_result", "console_event"):
            # Reports apply in the order they arrived, each after the one before.
            handler = {"job_event": self._event, "job_endpoints": self._endpoints,
                       "snapshot_result": self._snapshot_result,
                       "console_event": self._console_event}[kind]
            self._inbox.addCallback(
                lambda _: Deferred.fromCoroutine(self._report(handler, message)))
            self._inbox.addErrback(lambda f: self.log.failure("Report handling failed", f))
        elif kind == "protocol_error":
            self.log.warn("Supervisor of {host} reports a protocol error: {code} {message}",
                          host=self.host_name, code=message["code"],
                          message=message["message"])
            self.close(CloseCode.PROTOCOL_VIOLATION, "peer reported a protocol error")

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a request (its id is set here) and wait for the answer."""
        request_id = next(self._request_ids)
        message["request_id"] = request_id
        answer: Deferred[dict[str, Any]] = Deferred()
        self._pending[request_id] = answer
        answer.addTimeout(self.links.request_timeout, self.links.reactor)
        try:
            self.send(message)
            return await answer
        except Disconnected:  # Closing already (a failover, a rebalance).
            raise ConnectionError("the supervisor link closed") from None
        finally:
            self._pending.pop(request_id, None)

    async def _report(self, handler: Any, message: dict[str, Any]) -> None:
        """Store one report; acknowledge it only once stored (the handler acks)."""
        try:
            await handler(message)
        except Exception as e:
            if unavailable(e):
                self.log.warn("{host}: {kind} not stored, the database is unavailable "
                              "({error})", host=self.host_name, kind=message["type"],
                              error=_brief(e))
            else:
                self.log.failure("{host}: {kind} handling failed", host=self.host_name,
                                 kind=message["type"])
            self._not_stored(message["request_id"])
            return
        self.links.unstored.discard(self)

    def _not_stored(self, request_id: int) -> None:
        """Tell the supervisor to send report ``request_id`` again (docs/protocol.md)."""
        if self.state != self.STATE_OPEN:
            return
        if self.minor >= protocol.UNAVAILABLE_MINOR:
            self.send(protocol.unavailable(request_id))
            self.links.report_not_stored(self)
        else:
            # It would drop an event acked ok: false; after a reconnect it resends.
            self.close(CloseCode.INTERNAL_ERROR, "a report could not be stored; send it again")
        self.retry_reconcile()

    async def _event(self, message: dict[str, Any]) -> None:
        request_id = message["request_id"]
        try:
            status = Status(State(message["state"]),
                            Stage(message["stage"]) if "stage" in message else None,
                            Reason(message["reason"]) if "reason" in message else None)
        except InvalidTransition as e:
            self.send(protocol.ack(request_id, ("bad_event", str(e))))
            return
        assert self.host_id is not None
        try:
            held = (bool(message.get("held")) and status.state is State.TERMINATED
                    and self.minor >= protocol.HOLD_MINOR)
            changed = await self.links.store.apply_host_event(
                self.host_id, message["job_id"], status,
                exit_status=message.get("exit_status"), message=message.get("message"),
                held=held)
        except (NotYourJob, NotFound):
            self.send(protocol.ack(request_id, ("not_your_job",
                                                "that job is not on this host")))
            return
        except InvalidTransition as e:
            self.log.info("Stale event from {host} for {job} ignored: {why}",
                          host=self.host_name, job=message["job_id"], why=str(e))
            changed = False
        if self.state == self.STATE_OPEN:
            self.send(protocol.ack(request_id))
        if changed:
            self.log.debug("{host}: job {job} is {state}", host=self.host_name,
                           job=message["job_id"], state=status.state.value)
            if held:
                self.hold.started(message["job_id"])

    async def _endpoints(self, message: dict[str, Any]) -> None:
        assert self.host_id is not None
        try:
            await self.links.store.set_endpoints(self.host_id, message["job_id"],
                                                 message["endpoints"])
            if "ssh_host_keys" in message:
                await self.links.store.set_ssh_host_keys(
                    self.host_id, message["job_id"], self._host_keys(message["ssh_host_keys"]))
        except (NotYourJob, NotFound):
            self.send(protocol.ack(message["request_id"], ("not_your_job",
                                                           "that job is not on this host")))
            return
        if self.state == self.STATE_OPEN:
            self.send(protocol.ack(message["request_id"]))

    def _host_keys(self, reported: list[str]) -> list[str]:
        """The valid keys among those a guest reported, canonical (``TYPE BASE64``)."""
        keys = []
        for text in reported:
            try:
                keys.append(sshkeys.parse(text, comment_allowed=False).line)
            except sshkeys.BadKey as e:
                self.log.warn("{host}: an SSH host key was ignored: {why}", host=self.host_name,
                              why=str(e))
        return list(dict.fromkeys(keys))

    async def _snapshot_result(self, message: dict[str, Any]) -> None:
        assert self.host_id is not None
        error = message.get("error")
        try:
            changed = await self.links.store.finish_snapshot(
                self.host_id, message["snapshot_id"], digest=message.get("digest"),
                error=(error["code"], error["message"]) if error else None)
        except (NotYourJob, NotFound):
            self.send(protocol.ack(message["request_id"], ("not_your_job",
                                                           "that snapshot is not this host's")))
            return
        if changed:
            self.log.info("{host}: snapshot {snapshot} of job {job}: {outcome}",
                          host=self.host_name, snapshot=message["snapshot_id"],
                          job=message["job_id"],
                          outcome=message.get("digest") or error)
        if self.state == self.STATE_OPEN:
            self.send(protocol.ack(message["request_id"]))

    async def _console_event(self, message: dict[str, Any]) -> None:
        assert self.host_id is not None
        error = await self.links.console_audit.record(self.host_id, self.host_name, message)
        if self.state == self.STATE_OPEN:
            self.send(protocol.ack(message["request_id"], error))

    async def send_snapshots(self) -> None:
        """Ask the supervisor for the host's pending snapshots (each command is idempotent)."""
        if self.minor < 3 or self.host_id is None:
            return
        for row in await self.links.store.pending_snapshots(self.host_id):
            try:
                answer = await self.request(protocol.snapshot_job(
                    0, str(row["id"]), str(row["job_id"]), row["repository"], row["store"]))
            except (TimeoutError, ConnectionError):
                return
            if not answer["ok"]:
                error = answer.get("error") or {}
                await self.links.store.finish_snapshot(
                    self.host_id, str(row["id"]),
                    error=(error.get("code", "failed"), error.get("message", "")))

    # -- reconciliation ------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Ask what the supervisor runs and bring it in line with the database.

        A reconciliation that fails (no status in time, the database unavailable)
        is tried again after ``reconcile_retry`` seconds.
        """
        self._reconciling += 1
        try:
            await self._reconcile()
        except ConnectionError:
            return  # The link is gone.
        except TimeoutError:
            self.log.info("{host}: no status in time; reconciling again soon",
                          host=self.host_name)
            self.retry_reconcile()
        except Exception as e:
            if not unavailable(e):
                raise
            self.log.debug("{host}: reconciliation failed, the database is unavailable "
                           "({error})", host=self.host_name, error=_brief(e))
            self.retry_reconcile()
        finally:
            self._reconciling -= 1
            if self._again and not self._reconciling:
                self._again = False
                self.retry_reconcile()

    def retry_reconcile(self) -> None:
        """Reconcile again after ``reconcile_retry`` seconds (once, however often asked,
        and not while a reconciliation is under way: its status request may be held by
        a supervisor that is resending reports)."""
        if self._reconciling:
            self._again = True
            return
        if self._retry is not None and self._retry.active():
            return
        if self.state != self.STATE_OPEN or self.links.stopping:
            return
        delay = self.links.policy.reconcile_retry * random.uniform(0.75, 1.25)
        self._retry = self.links.reactor.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if (self.state == self.STATE_OPEN and self.host_id is not None
                and self.links.by_host.get(self.host_id) is self):
            self.links.spawn(self.reconcile())

    async def _reconcile(self) -> None:
        assert self.host_id is not None
        answer = await self.request(protocol.status_request(0))
        await self._inbox  # Events sent before the status are applied first.
        assert self.session is not None
        state = await self.links.states.submit(  # one statement, shared with others
            (self.host_id, answer.get("kinds"), self.session))
        row = state["active"]
        expected = None
        if row is not None:
            expected = Expected(row["id"], State(row["state"]),
                                Stage(row["stage"]) if row["stage"] else None,
                                Reason(row["termination_reason"])
                                if row["termination_reason"] else None)
        job = answer["job"]
        if outdated(row, job):  # extended while the link was down: before a stop ends it
            await renew_tokens(self, job["id"])
        reported = None
        if job is not None:
            reported = Reported(job["id"], State(job["state"]),
                                Stage(job["stage"]) if job["stage"] else None)
        for action in decide(expected, reported):
            await self.execute(action)
        if self.minor >= protocol.HOLD_MINOR:
            await self.hold.reconcile(answer, state["held"])
        if state["snapshots"]:
            await self.send_snapshots()

    async def execute(self, action: Action) -> None:
        store = self.links.store
        try:
            if isinstance(action, Start):
                await self._start(action.job_id)
            elif isinstance(action, Stop):
                answer = await self.request(protocol.stop_job(0, action.job_id,
                                                              action.reason.value))
                if not answer["ok"]:
                    self.log.warn("{host} refused to stop {job}: {error}", host=self.host_name,
                                  job=action.job_id, error=answer.get("error"))
            elif isinstance(action, End):
                await store.transition(action.job_id, Status(State.TERMINATED,
                                                             reason=action.reason),
                                       message=action.message)
            elif isinstance(action, Advance):
                await store.transition(action.job_id, Status(action.state, action.stage))
        except TimeoutError:
            self.retry_reconcile()
        except ConnectionError:
            pass  # The next link reconciles.
        except (InvalidTransition, NotFound) as e:
            self.log.info("{host}: {action} no longer applies: {why}", host=self.host_name,
                          action=action, why=str(e))

    async def _start(self, job_id: str) -> None:
        store = self.links.store
        row = await store.job_start(job_id)  # One statement: its keys come with it.
        if row is None or row["host_id"] != self.host_id or row["state"] != "assigned":
            return
        ssh_keys = list(row["ssh_keys"]) if self.minor >= protocol.SSH_KEYS_MINOR else None
        start = job_start(row, minor=self.minor, host_name=self.host_name,
                          signer=self.links.signer, log_service=self.links.log_service,
                          proxies=self.links.proxies, proxy_service=self.links.proxy_service,
                          ssh_keys=ssh_keys)
        answer = await self.request(protocol.start_job(0, start))
        if answer["ok"]:
            return
        code, text = answer["error"]["code"], answer["error"]["message"]
        if code == "already_running":
            # Its other job ends first (a reconciliation stops it if the database has it
            # ended): reconcile again in reconcile_retry seconds, not at the next
            # periodic pass (reconcile_interval, 30 s, away).
            self.retry_reconcile()
            return
        reason = Reason.IMAGE_ERROR if code in _IMAGE_ERRORS else Reason.HOST_START_FAILURE
        await self.links.store.transition(job_id, Status(State.TERMINATED, reason=reason),
                                          message=f"{code}: {text}")


def _brief(error: BaseException) -> str:
    """One line about ``error``, for a warning without a traceback."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


SNAPSHOT_TIMEOUT = 3 * 3600.0
"""Seconds a host has to upload a snapshot before it is marked failed."""

BUSY = "too many supervisor links are being set up here; try again later"


class SupervisorResource(WebSocketResource):
    """The WebSocket resource behind ``gate``: an upgrade gets a handshake slot at once,
    or waits for one (the request held open, nothing else done), or is answered ``503``
    with ``Retry-After`` when the queue is full or its wait ran out. The slot goes to
    the protocol the upgrade builds (:meth:`SupervisorSessionFactory.take_slot`)."""

    def __init__(self, factory: SupervisorSessionFactory, gate: HandshakeGate):
        super().__init__(factory)
        self.factory = factory
        self.gate = gate

    def render(self, request: IRequest) -> Any:
        waiting = self.gate.enter()
        if waiting is None:
            return self._refuse(request)
        admitted: list[Slot] = []
        waiting.addCallback(lambda slot: admitted.append(slot) or slot)
        if admitted:
            return self._upgrade(request, admitted[0])
        request.notifyFinish().addErrback(lambda _: waiting.cancel())  # it closed: leave
        waiting.addCallbacks(lambda slot: self._upgrade_later(request, slot),
                             lambda failure: self._refuse_later(request, failure))
        return NOT_DONE_YET

    def _refuse(self, request: IRequest) -> bytes:
        return respond_error(request, ApiError(
            503, BUSY, headers={"Retry-After": str(self.gate.retry_after())}))

    def _upgrade(self, request: IRequest, slot: Slot) -> Any:
        self.factory.admitted = slot
        try:
            return super().render(request)
        finally:
            if self.factory.take_slot() is not None:
                slot.release()  # no protocol took it: nothing was upgraded

    def _upgrade_later(self, request: IRequest, slot: Slot) -> None:
        if getattr(request, "_disconnected", False) or request.channel is None:
            slot.release()  # gone while its slot was being handed over
            return
        body = self._upgrade(request, slot)
        if body is not NOT_DONE_YET:  # not upgraded after all (Autobahn answered)
            _answer(request, body)

    def _refuse_later(self, request: IRequest, failure: Failure) -> None:
        if failure.check(CancelledError):
            return  # the client went while it waited
        failure.trap(QueueTimeout)
        if not getattr(request, "_disconnected", False):
            _answer(request, self._refuse(request))


def _answer(request: IRequest, body: bytes) -> None:
    """Finish a held request with ``body`` (a length, not chunks, as if rendered at once)."""
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


class SupervisorSessionFactory(PreciseServerFactory):
    protocol = SupervisorSession
    admitted: Slot | None = None
    """The slot of the upgrade being handed to a new protocol (SupervisorResource)."""

    def __init__(self, links: SupervisorLinks):
        super().__init__(reactor=links.reactor)
        self.links = links
        self.setProtocolOptions(
            autoPingInterval=links.policy.ping_interval,
            autoPingTimeout=links.policy.ping_timeout,
            maxMessagePayloadSize=protocol.MAX_MESSAGE_BYTES,
            maxFramePayloadSize=protocol.MAX_MESSAGE_BYTES,
            openHandshakeTimeout=links.handshake_timeout)

    def take_slot(self) -> Slot | None:
        """The admitted upgrade's slot, once (a protocol built outside
        :class:`SupervisorResource` gets ``None``)."""
        slot, self.admitted = self.admitted, None
        return slot


@config_class(SETTINGS, "links", frozen=True)
class LinkPolicy:
    """The ``supervisors.*`` settings: how links are kept alive, admitted and reconciled,
    and how long a host with an active job may stay disconnected (fields, types and
    defaults: ``settings.toml``)."""

    @property
    def touch_interval(self) -> float:
        """Seconds between refreshes of this instance's link rows (and checks for
        unreachable hosts): a quarter of ``unreachable_after``, at most 5 s."""
        return min(5.0, self.unreachable_after / 4)


class SupervisorLinks(MultiService):
    """This instance's supervisor links, and what keeps them in step with the database."""

    log = Logger()

    def __init__(self, reactor: Any, store: Store, instance: str,
                 policy: LinkPolicy = LinkPolicy(), *, handshake_timeout: float = 10.0,
                 request_timeout: float = REQUEST_TIMEOUT,
                 signer: CapabilitySigner | None = None,
                 log_service: str = "treadmill-logserver",
                 proxies: tuple[str, ...] = (), proxy_service: str = "treadmill-proxy"):
        super().__init__()
        self.reactor = reactor
        self.store = store
        self.instance = instance
        self.policy = policy
        self.request_timeout = request_timeout
        self.unstored: set[SupervisorSession] = set()  # links with a report refused unavailable
        self._probe: Any = None
        self._touched_since: float | None = None  # since when touch() keeps succeeding
        self.signer = signer
        self.log_service = log_service
        self.proxies = proxies
        self.proxy_service = proxy_service
        self.by_host: dict[int, SupervisorSession] = {}
        self.console_audit = ConsoleAudit(reactor, store)
        self.instance_id: str | None = None
        """This process's id in ``instances`` (:mod:`treadmill.switchboard.instances`)."""
        self.rebalanced = 0
        self._next_rebalance = 0.0
        self.rebalance_quiet = INSTANCE_DEAD_AFTER
        """Seconds without a new link before this instance sheds links (see rebalance)."""
        self._last_link_at = float("-inf")
        self.reactor_lag = ReactorLag(reactor)
        """How late the reactor runs; the handshake queue drains only while it keeps up."""
        self.gate = HandshakeGate(policy.max_handshakes, queue=policy.handshake_queue,
                                  wait=policy.handshake_wait, clock=reactor,
                                  lag=self.reactor_lag.lag)
        """Handshakes in progress at most (``supervisors.max_handshakes``), and upgrades
        waiting for one (``supervisors.handshake_queue``, ``handshake_wait``)."""
        self.handshake_timeout = handshake_timeout
        self.registrar = LinkRegistrar(reactor, store, instance, lambda: self.instance_id)
        """Records links in batches (one statement for the links arriving together, and
        one for those ending together)."""
        self.states: Batcher[tuple[int, Any, str], dict] = Batcher(
            reactor, store.link_states)
        """Reconciliations' statements (``link_state``), those arriving together as one."""
        self.factory = SupervisorSessionFactory(self)
        self.resource = SupervisorResource(self.factory, self.gate)
        self._tasks: set[Deferred[Any]] = set()
        self.stopping = False
        touch, reconcile = policy.touch_interval, policy.reconcile_interval
        for name, interval, work in (
                ("touch", touch, self.touch),
                # Spread over most of the interval: 1,000 hosts at once is a spike.
                ("reconcile", reconcile, lambda: self.reconcile_all(spread=0.8 * reconcile)),
                ("unreachable", touch, self.end_unreachable),
                ("holds", touch, self.end_holds),
                ("snapshots", 30.0, self.expire_snapshots)):
            every(interval, lambda work=work: self.spawn(work()), reactor, parent=self,
                  name=name)
        every(self.reactor_lag.interval, self.reactor_lag.tick, reactor, parent=self,
              name="reactor-lag")

    def spawn(self, work: Any) -> Deferred[Any]:
        """Run a coroutine in the background, logging its failure (none once stopping)."""
        if self.stopping:
            work.close()
            return succeed(None)  # A timer waiting on it must not hang the stop.
        d = Deferred.fromCoroutine(work)
        self._tasks.add(d)

        def done(result: Any) -> None:
            self._tasks.discard(d)
            if hasattr(result, "check") and unavailable(result):
                self.log.warn("Background work failed, the database is unavailable ({error})",
                              error=_brief(result.value))
            elif hasattr(result, "check") and not result.check(CancelledError):
                self.log.failure("Background work failed", result)

        d.addBoth(done)
        return d

    def adopt(self, link: SupervisorSession) -> None:
        """``link``'s registration is recorded (:attr:`registrar`): this instance holds
        its host's link, and closes a link it held for the host before."""
        assert link.host_id is not None and link.session is not None
        old = self.by_host.get(link.host_id)
        self.by_host[link.host_id] = link
        self._last_link_at = self.reactor.seconds()
        if old is not None and old is not link:
            self._drop(old, CloseCode.SUPERSEDED, "superseded by a newer connection")
            self.by_host[link.host_id] = link

    def unregister(self, link: SupervisorSession) -> None:
        assert link.host_id is not None and link.session is not None
        if self.by_host.get(link.host_id) is link:
            del self.by_host[link.host_id]
        self.spawn(self.registrar.ended(link.host_id, link.session))

    # -- notifications ------------------------------------------------------------------

    def job_changed(self, payload: str) -> None:
        """``treadmill_jobs``: send assigned and stopping jobs to hosts we hold."""
        note = JobNote.parse(payload)
        if note is None or note.host_id is None:
            return
        link = self.by_host.get(note.host_id)
        if link is None or link.state != link.STATE_OPEN:
            return
        if note.state == EXTENDED:
            self.spawn(renew_tokens(link, note.job_id))
            if link.hold.concerns(note.job_id):
                self.spawn(link.hold.check())  # its timer moves to the new end
            return
        if note.state == "terminated" and link.hold.concerns(note.job_id):
            self.spawn(link.hold.check())  # released by tml job cancel, maybe
            return
        if note.state not in ("assigned", "terminating"):
            return
        job_id = note.job_id

        async def stop() -> None:
            row = await self.store.active_job(link.host_id)  # type: ignore[arg-type]
            if row is not None and row["id"] == job_id and row["state"] == "terminating":
                reason = Reason(row["termination_reason"] or "user_terminated")
                await link.execute(Stop(job_id, reason))

        # A start reads the job once (and sends nothing unless it is still assigned
        # to this host): one statement between the assignment and start_job.
        self.spawn(link.execute(Start(job_id)) if note.state == "assigned" else stop())

    async def expire_snapshots(self) -> None:
        """Fail snapshots a host has not finished within ``SNAPSHOT_TIMEOUT``."""
        expired = await self.store.expire_snapshots(SNAPSHOT_TIMEOUT)
        if expired:
            self.log.warn("{count} snapshots timed out", count=expired)

    def snapshot_requested(self, payload: str) -> None:
        """``treadmill_snapshots``: a snapshot for a host we may hold."""
        note = SnapshotNote.parse(payload)
        if note is None or note.host_id is None:
            return
        link = self.by_host.get(note.host_id)
        if link is not None and link.state == link.STATE_OPEN:
            self.spawn(link.send_snapshots())

    def host_changed(self, payload: str) -> None:
        """``treadmill_hosts``: close links superseded elsewhere, or whose host is gone.

        A note naming the link's own session (its registration, its kinds, a new tag)
        needs no check: a superseding link names another session, and a deleted host
        or a new token (``update_host`` ends the link) names none. Two statements
        fewer per accepted link.
        """
        note = HostNote.parse(payload)
        if note is None:
            return
        link = self.by_host.get(note.host_id)
        if link is None or (note.session is not None and note.session == link.session):
            return

        async def check() -> None:
            row = await self.store.host_link_state(link.host_id)  # type: ignore[arg-type]
            if self.by_host.get(link.host_id) is not link or not link.registered:
                return  # Gone, or its own registration is not committed yet.
            if row is None or bytes(row["token_hash"]) != link.token_digest:
                self._drop(link, CloseCode.HOST_REMOVED, "the host was removed or its token "
                           "replaced")
            elif row["session"] is not None and row["session"] != link.session:
                self._drop(link, CloseCode.SUPERSEDED, "superseded by a newer connection")

        self.spawn(check())

    def _drop(self, link: SupervisorSession, code: CloseCode, reason: str) -> None:
        if self.by_host.get(link.host_id) is link:  # type: ignore[arg-type]
            del self.by_host[link.host_id]  # type: ignore[arg-type]
        link.registered = False
        self.log.info("Closing the link of {host}: {reason}", host=link.host_name,
                      reason=reason)
        if link.state == link.STATE_OPEN:
            link.close(code, reason)
        else:
            link.dropConnection(abort=True)

    def report_not_stored(self, link: SupervisorSession) -> None:
        """``link``'s supervisor holds a report it will send again after a backoff that
        may have grown long; once the database answers, make it send that report now."""
        self.unstored.add(link)
        if self._probe is None or not self._probe.active():
            self._probe = self.reactor.callLater(self.policy.reconcile_retry, self._probe_database)

    def _probe_database(self) -> None:
        self._probe = None
        if self.stopping or not self.unstored:
            return

        async def probe() -> None:
            try:
                await self.store.ping()
            except Exception as e:
                if not unavailable(e):
                    raise
                self._probe = self.reactor.callLater(self.policy.reconcile_retry,
                                                     self._probe_database)
                return
            # Back: a supervisor resends its unacknowledged reports at once after a
            # reconnect (its resend backoff may have grown to a minute).
            links, self.unstored = self.unstored, set()
            for link in links:
                if link.state == link.STATE_OPEN and self.by_host.get(link.host_id) is link:  # type: ignore[arg-type]
                    self._drop(link, CloseCode.GOING_AWAY,
                               "the database is back: reconnect and send your reports again")

        self.spawn(probe())

    def rebalance(self, live: int, total: int, interval: float, step: int = 2,
                  slack: int = 1) -> int:
        """Close a few links if this instance holds more than its fair share.

        ``live`` instances hold ``total`` links between them; an instance with
        more than ``ceil(total / live) + slack`` closes a quarter of the excess
        (at least ``step``) every ``interval`` seconds, with ``GOING_AWAY``: their
        supervisors
        reconnect through the load balancer, which sends them to a less loaded
        instance. So links come back to an instance that joins or recovers,
        gently. Returns how many links it closed.

        Not while links still arrive (one came within ``max(interval,
        rebalance_quiet)`` seconds): the balancers are still placing them. After
        a kill -9 of an instance, the survivors take its links while it still
        counts as live (until its heartbeat is ``INSTANCE_DEAD_AFTER`` old): over
        a share counted for one more instance, they would close links that had
        just moved, and their supervisors would reconnect once more.
        """
        now = self.reactor.seconds()
        if live < 2 or self.stopping or now < self._next_rebalance:
            return 0
        if now - self._last_link_at < max(interval, self.rebalance_quiet):
            return 0
        excess = len(self.by_host) - (-(-total // live) + slack)
        if excess <= 0:
            return 0
        self._next_rebalance = now + interval
        open_links = [link for link in self.by_host.values() if link.state == link.STATE_OPEN]
        count = min(max(step, excess // 4), excess, len(open_links))
        chosen = random.sample(open_links, count)
        for link in chosen:
            self._drop(link, CloseCode.GOING_AWAY, "rebalancing between switchboard "
                       "instances: reconnect")
            self.spawn(self.registrar.ended(link.host_id,  # type: ignore[arg-type]
                                            link.session))  # type: ignore[arg-type]
        self.rebalanced += len(chosen)
        return len(chosen)

    def database_reconnected(self) -> None:
        """Notifications may have been lost: reconcile every link."""
        self._touched_since = None  # liveness records went stale meanwhile
        self.spawn(self.reconcile_all())

    # -- periodic work ----------------------------------------------------------------------

    async def touch(self) -> None:
        try:
            await self.store.touch_links([link.session for link in self.by_host.values()
                                          if link.session])
        except Exception:
            self._touched_since = None
            raise
        if self._touched_since is None:
            self._touched_since = self.reactor.seconds()

    async def reconcile_all(self, spread: float | None = None) -> None:
        """Reconcile every open link, spread over ``spread`` seconds (default: at once)."""
        for link in list(self.by_host.values()):
            if link.state != link.STATE_OPEN:
                continue
            if spread:
                self.reactor.callLater(random.uniform(0, spread), self._reconcile_later, link)
            else:
                self.spawn(link.reconcile())

    def _reconcile_later(self, link: SupervisorSession) -> None:
        if link.state == link.STATE_OPEN and self.by_host.get(link.host_id) is link:  # type: ignore
            self.spawn(link.reconcile())

    async def end_holds(self) -> None:
        """End the expired holds of the hosts whose links this instance holds (the backstop
        of each hold's own timer, :mod:`treadmill.switchboard.holds`)."""
        held = {link.host_id: link for link in self.by_host.values()
                if link.hold.job_id is not None and link.state == link.STATE_OPEN}
        for row in await self.store.due_holds(list(held)):  # type: ignore[arg-type]
            self.spawn(held[row["host_id"]].hold.check())

    async def end_unreachable(self) -> None:
        """R9: end active jobs whose supervisor stayed away too long.

        Only once this instance has recorded its links' liveness for two touch
        intervals: after a database outage every instance's record is stale, and
        connected hosts must not look unreachable.
        """
        since = self._touched_since
        if since is None or self.reactor.seconds() - since < 2 * self.policy.touch_interval:
            return
        for job_id in await self.store.unreachable_jobs(self.policy.unreachable_after):
            try:
                await self.store.transition(
                    job_id, Status(State.TERMINATED, reason=Reason.HOST_UNREACHABLE),
                    message=f"the host's supervisor was unreachable for over "
                            f"{self.policy.unreachable_after:g} s")
            except (InvalidTransition, NotFound):
                pass

    async def _stop(self) -> None:
        self.stopping = True
        links = list(self.by_host.values())
        self.by_host.clear()
        for link in links:
            link.registered = False
            if link.state == link.STATE_OPEN:
                link.close(CloseCode.GOING_AWAY, "the switchboard is shutting down")
        try:
            await self.store.links_ended([link.session for link in links if link.session])
        except Exception:
            self.log.failure("Could not record the end of the supervisor links")
        await super().stopService()
        # Give the closing handshakes and the work in flight a moment (work is
        # not cancelled: cancelling a query breaks its database connection).
        deadline = self.reactor.seconds() + 2.0
        while self._tasks or any(link.state != link.STATE_CLOSED for link in links):
            if self.reactor.seconds() > deadline:
                for link in links:
                    if link.state != link.STATE_CLOSED and link.transport is not None:
                        link.transport.abortConnection()
                break
            await deferLater(self.reactor, 0.02, lambda: None)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())
