"""The proxy's live state: jobs, their tunnels, clients waiting for a data connection.

    TunnelTable
    └── JobSession (one per job with a control connection, or within its grace period)
        └── Tunnel (one per published service: a public TCP port and/or a WebSocket path)
            ├── Pending  a client waiting for the supervisor's data connection
            └── Splice   a client joined to its data connection

The rules (``docs/proxy.md``):

- A job has at most one control connection; a new one supersedes the old
  (closed with 4002) and takes over its tunnels.
- When the control connection is lost, the job's tunnels stay (ports, paths
  and live connections) for ``grace`` seconds; a control connection of the
  same job within that time finds them again, and ``publish`` answers with
  the same port and path. After the grace period, or at once when the
  supervisor closes with 1000 (the job ended), every tunnel closes.
- A client arriving on a tunnel gets a random one-time ``conn_id``, sent to
  the job's control connection as ``connect`` (or when it comes back, if
  it is away). Only a data connection that presents that ``conn_id`` and a
  token granting ``publish`` on the same job is joined to the client, within
  ``connect_timeout`` seconds; otherwise the client is closed.
- A service that does not authenticate its users itself (``publish`` without
  ``authenticates``: a console, an echo service) has no public TCP port, and
  a client of its WebSocket path must present a console token for the job
  first (``legs.TunnelSocket``): ``read`` watches (its bytes are dropped),
  ``manage`` types.
- ``max_connections_per_tunnel`` bounds clients (waiting and joined) per
  tunnel; connections with no traffic for ``idle_timeout`` seconds close.
- The dial-back pool (control minor 2, ``pool.DataPool``): a supervisor that
  announced minor 2 keeps up to ``pool_per_job`` authenticated, idle data
  connections open for its job (``pool_max`` for the whole proxy). A client
  takes one at once (the proxy writes the service on it and joins them), else
  it waits for a ``connect`` as above. A job's idle pooled connections close
  with its control connection and with its tunnels.

Nothing here is durable: a proxy restart drops every tunnel and the
supervisors publish again when they reconnect.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from treadmill.common.captoken import CapabilityError
from treadmill.common.splice import End, Splice, join
from treadmill.protocol import proxy as messages
from treadmill.proxy.pool import DataPool
from treadmill.proxy.ports import PortAllocator, PortsExhausted, PortUnavailable

__all__ = ["Control", "JobSession", "Pending", "Tunnel", "TunnelConfig", "TunnelTable"]

CONSOLE_BACKLOG = 64
"""Console notices a job keeps while it has no control connection (its grace period)."""


@dataclass
class TunnelConfig:
    """The tunnel table's share of the proxy's config (``ProxyConfig.tunnels``)."""

    public_host: str = "localhost"
    public_url: str | None = None  # ws(s):// base URL clients use for tunnel paths
    interface: str = "0.0.0.0"  # where public ports listen
    ports: tuple[int, int] | None = (40000, 40999)
    static: dict[str, int] = field(default_factory=dict)
    idle_timeout: float = 3600.0  # 0: never
    max_connections_per_tunnel: int = 256
    max_tunnels_per_job: int = 16
    grace: float = 30.0
    connect_timeout: float = 10.0
    console_grace: float = 30.0  # a console outlives its token's exp this long unrenewed
    backlog: int = 1024
    pool_per_job: int = 2  # idle pooled data connections one job may hold (minor 2); 0: none
    pool_max: int = 4096  # idle pooled data connections of all jobs together


class Pooled(Protocol):
    """What the registry needs of a pooled data connection (``legs.DataEnd``)."""

    lost: bool

    def assign(self, service: str) -> None: ...

    def abort(self) -> None: ...


class Control(Protocol):
    """What the registry needs of a control connection (``control.ControlProtocol``)."""

    job: str
    minor: int  # the control protocol minor it speaks

    def send(self, message: dict[str, Any]) -> bool: ...

    def close(self, code: int, reason: str) -> None: ...


class PublishError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii", "replace")).digest()


class Pending:
    """A client waiting for its data connection."""

    __slots__ = ("client", "conn_id", "created", "timer", "tunnel")

    def __init__(self, conn_id: str, tunnel: Tunnel, client: End, created: float):
        self.conn_id = conn_id
        self.tunnel = tunnel
        self.client = client
        self.created = created
        self.timer: Any = None


class Tunnel:
    """One published service of a job."""

    def __init__(self, session: JobSession, service: str, authenticates: bool = False):
        self.session = session
        self.service = service
        self.authenticates = authenticates
        """The service authenticates its users (SSH); else clients need a console token."""
        self.tcp_port: int | None = None
        self.listener: IListeningPort | None = None
        self.ws_id: str | None = None
        self.pending: dict[str, Pending] = {}
        self.splices: set[Splice] = set()
        self.closed = False
        self.accepted = 0  # clients joined so far
        self.unauthenticated = 0  # console clients whose token message is awaited

    @property
    def connections(self) -> int:
        """Clients waiting or joined."""
        return len(self.pending) + len(self.splices)

    @property
    def auth(self) -> str:
        """``service`` (it authenticates its users) or ``token`` (a console token)."""
        return "service" if self.authenticates else "token"

    @property
    def ws_path(self) -> str | None:
        return messages.TUNNEL_PREFIX + self.ws_id if self.ws_id is not None else None

    def info(self) -> dict[str, Any]:
        return {"service": self.service, "auth": self.auth, "tcp_port": self.tcp_port,
                "ws_path": self.ws_path,
                "pending": len(self.pending), "active": len(self.splices),
                "accepted": self.accepted}


class JobSession:
    """A job's control connection (if any) and tunnels."""

    def __init__(self, job: str, subject: str, token: str):
        self.job = job
        self.subject = subject
        self.token_digest = _digest(token)
        self.control: Control | None = None
        self.tunnels: dict[str, Tunnel] = {}
        self.grace_timer: Any = None
        self.connections = 0  # control connections so far
        self.console_backlog: list[dict[str, Any]] = []  # console notices while away

    def info(self) -> dict[str, Any]:
        return {"job": self.job, "subject": self.subject, "connected": self.control is not None,
                "tunnels": [t.info() for t in self.tunnels.values()]}


class TunnelTable:
    """Every job's tunnels; see the module docstring.

    ``verifier`` verifies capability tokens (``keys.LiveVerifier``);
    ``public_factory(tunnel)`` builds the protocol factory of a tunnel's
    public port; ``data_port()`` and ``data_tls`` say where supervisors dial
    back (sent in ``welcome``).
    """

    log = Logger()

    def __init__(self, reactor: Any, settings: TunnelConfig, verifier: Any, *,
                 public_factory: Callable[[Tunnel], Any],
                 data_port: Callable[[], int], data_tls: bool = False):
        self.reactor = reactor
        self.settings = settings
        self.verifier = verifier
        self.public_factory = public_factory
        self.data_port = data_port
        self.data_tls = data_tls
        self.ports = PortAllocator(settings.ports, settings.static)
        self.sessions: dict[str, JobSession] = {}
        self.by_ws: dict[str, Tunnel] = {}
        self.pending: dict[str, Pending] = {}
        self.splices: set[Splice] = set()
        self.counts: Counter[str] = Counter()  # events, for metrics and the manhole
        self.pool: DataPool[Any] = DataPool(settings.pool_per_job, settings.pool_max)
        self.bytes_closed = 0  # bytes of splices that have ended
        self._sweeper: LoopingCall | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        idle = self.settings.idle_timeout
        if idle > 0:
            self._sweeper = LoopingCall(self.sweep)
            self._sweeper.clock = self.reactor
            self._sweeper.start(min(max(idle / 4, 0.05), 30.0), now=False)

    def stop(self) -> None:
        """Close everything (the proxy shuts down); supervisors reconnect elsewhere or later."""
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        for session in list(self.sessions.values()):
            if session.control is not None:
                session.control.close(messages.CloseCode.GOING_AWAY, "proxy shutting down")
            self.close_session(session, "the proxy is shutting down")

    @property
    def tunnels(self) -> list[Tunnel]:
        return [t for s in self.sessions.values() for t in s.tunnels.values()]

    def summary(self) -> dict[str, Any]:
        return {"jobs": len(self.sessions),
                "connected": sum(1 for s in self.sessions.values() if s.control is not None),
                "tunnels": len(self.tunnels), "pending": len(self.pending),
                "active": len(self.splices), "ports_in_use": len(self.ports.in_use),
                "pooled": self.pool.size,
                "counts": dict(self.counts)}

    # -- control connections ---------------------------------------------------------

    def attach(self, control: Control, subject: str, token: str) -> JobSession:
        """A control connection of ``control.job`` opened: it (now) holds the job."""
        job = control.job
        session = self.sessions.get(job)
        if session is None:
            session = self.sessions[job] = JobSession(job, subject, token)
        else:
            session.token_digest = _digest(token)
            session.subject = subject
        if session.grace_timer is not None:
            if session.grace_timer.active():
                session.grace_timer.cancel()
            session.grace_timer = None
        old, session.control = session.control, control
        session.connections += 1
        if old is not None and old is not control:
            self.counts["superseded"] += 1
            self.log.info("Job {job}: a new control connection supersedes the old one", job=job)
            old.close(messages.CloseCode.SUPERSEDED, "superseded by a newer connection")
            self._close_pool(job)  # the old connection's supervisor opened them
        pool = self.settings.pool_per_job if control.minor >= messages.POOL_MINOR else None
        control.send(messages.welcome(job, self.data_port(), self.data_tls,
                                      self.settings.public_host, self.settings.grace,
                                      sorted(session.tunnels), pool))
        # Console notices from while the job had no control connection.
        backlog, session.console_backlog = session.console_backlog, []
        if control.minor >= messages.CONSOLE_MINOR:
            for notice in backlog:
                control.send(notice)
        # Clients that arrived while the job had no control connection.
        for tunnel in session.tunnels.values():
            for pending in tunnel.pending.values():
                control.send(messages.connect(pending.conn_id, tunnel.service))
        return session

    def detach(self, control: Control, *, final: bool) -> None:
        """A control connection closed. ``final``: the supervisor closed it with 1000
        (the job ended): close the tunnels now; otherwise keep them for the grace period."""
        session = self.sessions.get(control.job)
        if session is None or session.control is not control:
            return  # superseded, or the session is already gone
        session.control = None
        self._close_pool(session.job)  # its supervisor opens new ones after the next welcome
        if final or not session.tunnels:
            self.close_session(session, "the job's supervisor closed the control connection"
                               if final else "no tunnels")
            return
        grace = self.settings.grace
        self.log.info("Job {job}: control connection lost; keeping {count} tunnels for "
                      "{grace:g} s", job=session.job, count=len(session.tunnels), grace=grace)
        session.grace_timer = self.reactor.callLater(grace, self._grace_over, session)

    def _grace_over(self, session: JobSession) -> None:
        session.grace_timer = None
        if session.control is None and self.sessions.get(session.job) is session:
            self.counts["grace_expired"] += 1
            self.close_session(session, f"no control connection for {self.settings.grace:g} s")

    def close_session(self, session: JobSession, why: str) -> None:
        if self.sessions.get(session.job) is session:
            del self.sessions[session.job]
        if session.grace_timer is not None and session.grace_timer.active():
            session.grace_timer.cancel()
        session.grace_timer = None
        if session.tunnels:
            self.log.info("Job {job}: closing {count} tunnels: {why}", job=session.job,
                          count=len(session.tunnels), why=why)
        for tunnel in list(session.tunnels.values()):
            self.close_tunnel(tunnel)
        self._close_pool(session.job)

    def handle(self, session: JobSession, control: Control, message: dict[str, Any]) -> None:
        """One validated message of ``messages.TO_PROXY`` from the job's control connection."""
        if session.control is not control:
            return  # superseded meanwhile
        kind = message["type"]
        if kind == "publish":
            rid = message["request_id"]
            try:
                reply = self.publish(session, rid, message["service"], tcp=message["tcp"],
                                     websocket=message["websocket"],
                                     authenticates=message.get("authenticates", False))
            except PublishError as e:
                self.counts[f"publish_{e.code}"] += 1
                self.log.warn("Job {job}: cannot publish {service}: {message}", job=session.job,
                              service=message["service"], message=e.message)
                reply = messages.error(rid, e.code, e.message, message["service"])
            control.send(reply)
        elif kind == "unpublish":
            tunnel = session.tunnels.get(message["service"])
            if tunnel is None:
                control.send(messages.error(message["request_id"], "not_published",
                                            f"{message['service']} is not published",
                                            message["service"]))
                return
            self.close_tunnel(tunnel)
            control.send(messages.unpublished(message["request_id"], message["service"]))
        elif kind == "connect_failed":
            pending = self.pending.get(message["conn_id"])
            if pending is not None and pending.tunnel.session is session:
                self.counts["connect_failed"] += 1
                self.log.info("Job {job}: {service} refused a client: {why}", job=session.job,
                              service=pending.tunnel.service, why=message.get("message", ""))
                self._drop_pending(pending)
                pending.client.abort()
        elif kind == "protocol_error":
            self.log.error("Job {job}: the supervisor reports a protocol error: {text}",
                           job=session.job, text=message["message"])

    # -- console clients (for the audit log) ---------------------------------------------

    def console_event(self, tunnel: Tunnel, event: str, conn_id: str, subject: str,
                      access: str, peer: str, jti: str | None) -> None:
        """A console client of ``tunnel`` opened or closed: tell the job's supervisor
        (``console``, control minor 1), which forwards it to the switchboard's audit log.
        While the job has no control connection up to ``CONSOLE_BACKLOG`` notices wait."""
        session = tunnel.session
        notice = messages.console(event, conn_id, tunnel.service, subject, access, peer,
                                  self.reactor.seconds(), jti)
        control = session.control
        if control is None:
            if len(session.console_backlog) < CONSOLE_BACKLOG:
                session.console_backlog.append(notice)
            else:
                self.counts["console_notice_dropped"] += 1
            return
        if control.minor < messages.CONSOLE_MINOR:
            self.counts["console_notice_unsupported"] += 1
            return
        control.send(notice)

    # -- tunnels ---------------------------------------------------------------------

    def publish(self, session: JobSession, request_id: int, service: str, *, tcp: bool,
                websocket: bool, authenticates: bool = False) -> dict[str, Any]:
        """Publish (or update) a tunnel; the ``published`` reply. Idempotent.

        A service that does not authenticate its users itself gets no public TCP
        port: only its WebSocket path, behind a console token."""
        if not tcp and not websocket:
            raise PublishError("bad_request", "publish tcp, websocket or both")
        if not authenticates:
            tcp, websocket = False, True
        tunnel = session.tunnels.get(service)
        new = tunnel is None
        if tunnel is None:
            if len(session.tunnels) >= self.settings.max_tunnels_per_job:
                raise PublishError("too_many_tunnels", f"a job may publish at most "
                                   f"{self.settings.max_tunnels_per_job} services")
            tunnel = Tunnel(session, service, authenticates)
        elif tunnel.authenticates and not authenticates:
            # Now behind a token: clients that came in without one go.
            tunnel.authenticates = False
            self._drop_clients(tunnel)
        else:
            tunnel.authenticates = authenticates
        if tcp and tunnel.listener is None:
            try:
                self._listen(tunnel)
            except PublishError:
                if new:
                    self.close_tunnel(tunnel)
                raise
        elif not tcp and tunnel.listener is not None:
            self._stop_listening(tunnel)
        if websocket and tunnel.ws_id is None:
            tunnel.ws_id = secrets.token_urlsafe(24)
            self.by_ws[tunnel.ws_id] = tunnel
        elif not websocket and tunnel.ws_id is not None:
            self.by_ws.pop(tunnel.ws_id, None)
            tunnel.ws_id = None
        if new:
            session.tunnels[service] = tunnel
            self.counts["published"] += 1
            self.log.info("Job {job}: published {service} (port {port}, path {path})",
                          job=session.job, service=service, port=tunnel.tcp_port,
                          path=tunnel.ws_path)
        ws_url = None
        if tunnel.ws_path is not None and self.settings.public_url:
            ws_url = self.settings.public_url.rstrip("/") + tunnel.ws_path
        return messages.published(request_id, service, self.settings.public_host,
                                  tcp_port=tunnel.tcp_port, ws_path=tunnel.ws_path,
                                  ws_url=ws_url, auth=tunnel.auth)

    def _listen(self, tunnel: Tunnel) -> None:
        session = tunnel.session
        factory = self.public_factory(tunnel)

        def listen(port: int) -> Any:
            return self.reactor.listenTCP(port, factory, backlog=self.settings.backlog,
                                          interface=self.settings.interface)

        static = self.ports.static_port(session.job, session.subject, tunnel.service)
        try:
            if static is not None:
                tunnel.listener = self.ports.bind_static(static, listen)
                tunnel.tcp_port = static
            else:
                tunnel.tcp_port, tunnel.listener = self.ports.allocate(listen)
        except PortsExhausted as e:
            raise PublishError("ports_exhausted", f"no public port left: {e}") from None
        except PortUnavailable as e:
            raise PublishError("port_unavailable", str(e)) from None

    def _stop_listening(self, tunnel: Tunnel) -> None:
        listener, tunnel.listener = tunnel.listener, None
        if listener is not None:
            listener.stopListening()
        if tunnel.tcp_port is not None:
            self.ports.release(tunnel.tcp_port)
            tunnel.tcp_port = None

    def close_tunnel(self, tunnel: Tunnel) -> None:
        """Stop listening, forget the path, close its clients."""
        if tunnel.closed:
            return
        tunnel.closed = True
        session = tunnel.session
        if session.tunnels.get(tunnel.service) is tunnel:
            del session.tunnels[tunnel.service]
        self._stop_listening(tunnel)
        if tunnel.ws_id is not None:
            self.by_ws.pop(tunnel.ws_id, None)
        self._drop_clients(tunnel)

    def _drop_clients(self, tunnel: Tunnel) -> None:
        for pending in list(tunnel.pending.values()):
            self._drop_pending(pending)
            pending.client.abort()
        for splice in list(tunnel.splices):
            splice.close()

    # -- clients and data connections ------------------------------------------------

    def client_arrived(self, tunnel: Tunnel, client: End) -> Pending | None:
        """A client connected to a tunnel's port or path; ask the supervisor to dial back."""
        if tunnel.closed:
            client.abort()
            return None
        if tunnel.connections >= self.settings.max_connections_per_tunnel:
            self.counts["refused_limit"] += 1
            if self.counts["refused_limit"] % 100 == 1:
                self.log.warn("Job {job}: {service} has {count} connections, the limit; "
                              "refusing more", job=tunnel.session.job, service=tunnel.service,
                              count=tunnel.connections)
            client.abort()
            return None
        control = tunnel.session.control
        if control is not None:
            pooled = self.pool.take(tunnel.session.job)
            while pooled is not None and pooled.lost:
                pooled = self.pool.take(tunnel.session.job)
            if pooled is not None:
                # The dial-back pool: the service on the waiting data connection, joined now.
                self.counts["pool_joined"] += 1
                pooled.assign(tunnel.service)
                self._join(tunnel, client, pooled)
                return None
        conn_id = secrets.token_urlsafe(18)
        pending = Pending(conn_id, tunnel, client, self.reactor.seconds())
        pending.timer = self.reactor.callLater(self.settings.connect_timeout, self._expired,
                                               pending)
        tunnel.pending[conn_id] = pending
        self.pending[conn_id] = pending
        if control is not None:
            if control.minor >= messages.POOL_MINOR:
                self.counts["pool_empty"] += 1
            control.send(messages.connect(conn_id, tunnel.service))
        return pending

    def client_gone(self, pending: Pending) -> None:
        """A waiting client hung up."""
        if self.pending.get(pending.conn_id) is pending:
            self.counts["client_gave_up"] += 1
            self._drop_pending(pending)

    def _expired(self, pending: Pending) -> None:
        pending.timer = None
        if self.pending.get(pending.conn_id) is pending:
            self.counts["connect_timeout"] += 1
            self.log.info("Job {job}: no data connection for a client of {service} within "
                          "{timeout:g} s; closing it", job=pending.tunnel.session.job,
                          service=pending.tunnel.service,
                          timeout=self.settings.connect_timeout)
            self._drop_pending(pending)
            pending.client.abort()

    def _drop_pending(self, pending: Pending) -> None:
        self.pending.pop(pending.conn_id, None)
        pending.tunnel.pending.pop(pending.conn_id, None)
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None

    def data_arrived(self, conn_id: str, token: str, data: End) -> Splice | None:
        """A data connection presented ``conn_id`` and ``token``: join it to its client.

        Refused (None) unless ``conn_id`` is waiting and ``token`` grants
        ``publish`` on the job it was issued to.
        """
        pending = self.pending.get(conn_id)
        if pending is None:
            self.counts["data_unknown"] += 1
            self.log.info("Refused a data connection: unknown or expired conn_id")
            return None
        session = pending.tunnel.session
        if not self._grants(session, token):
            return None
        self._drop_pending(pending)
        return self._join(pending.tunnel, pending.client, data)

    def _grants(self, session: JobSession, token: str) -> bool:
        """Whether ``token`` grants ``publish`` on the session's job (the control
        connection's token is recognised by its digest, without verifying it again)."""
        if hmac.compare_digest(_digest(token), session.token_digest):
            return True
        try:
            self.verifier.verify(token, "tunnel", session.job, "publish")
        except CapabilityError as e:
            self.counts["data_refused"] += 1
            self.log.warn("Refused a data connection for job {job}: {reason}",
                          job=session.job, reason=e.reason)
            return False
        return True

    def _join(self, tunnel: Tunnel, client: End, data: End) -> Splice:
        tunnel.accepted += 1
        self.counts["spliced"] += 1
        splice = join(client, data, self._splice_closed, tunnel)
        splice.snapshot = splice.transferred
        splice.quiet_since = self.reactor.seconds()
        if not (client.lost or data.lost):
            tunnel.splices.add(splice)
            self.splices.add(splice)
        return splice

    # -- the dial-back pool (control minor 2) --------------------------------------------

    def pool_arrived(self, job: str, token: str, data: Pooled) -> bool:
        """A pooled data connection presented ``job`` and ``token``: keep it idle for the
        job's next client. Refused (False: the caller closes it without a word) unless
        the job has a control connection of minor 2, ``token`` is the one that control
        connection presented (recognised by its digest: no signature is verified for
        a pooled connection, so that anyone who reaches the data port cannot make the
        proxy verify one per connection), and neither the job's nor the proxy's bound
        is reached."""
        session = self.sessions.get(job)
        if session is None or session.control is None \
                or session.control.minor < messages.POOL_MINOR:
            self.counts["pool_unknown"] += 1
            return False
        if not hmac.compare_digest(_digest(token), session.token_digest):
            self.counts["data_refused"] += 1
            self.log.info("Refused a pooled data connection for job {job}: not the control "
                          "connection's token", job=job)
            return False
        if not self.pool.add(job, data):
            self.counts["pool_full"] += 1
            if self.counts["pool_full"] % 100 == 1:
                self.log.warn("Job {job}: refused a pooled data connection: {held} held by "
                              "the job, {total} in all (pool.per_job {per_job}, pool.max "
                              "{max})", job=job, held=self.pool.waiting(job),
                              total=self.pool.size, per_job=self.settings.pool_per_job,
                              max=self.settings.pool_max)
            return False
        return True

    def pool_lost(self, job: str, data: Pooled) -> None:
        """A pooled data connection closed (or broke the rules) while idle."""
        self.pool.discard(job, data)

    def _close_pool(self, job: str) -> None:
        for data in self.pool.close_job(job):
            data.abort()

    def _splice_closed(self, splice: Splice) -> None:
        self.bytes_closed += splice.transferred
        self.splices.discard(splice)
        tunnel: Tunnel = splice.info
        tunnel.splices.discard(splice)

    def sweep(self) -> None:
        """Close joined connections without traffic for ``idle_timeout`` seconds."""
        now = self.reactor.seconds()
        idle = self.settings.idle_timeout
        for splice in list(self.splices):
            moved = splice.transferred
            if moved != splice.snapshot:
                splice.snapshot = moved
                splice.quiet_since = now
            elif now - splice.quiet_since >= idle:
                self.counts["idle_timeout"] += 1
                splice.close()
