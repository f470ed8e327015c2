"""The proxy's connections that carry bytes: clients (TCP or WebSocket) and data connections.

- :class:`PublicEnd`: a client on a tunnel's public TCP port. It reads
  nothing until its data connection is joined (at once when a pooled one waits).
- :class:`TunnelSocket`: a client on a tunnel's WebSocket path
  (``/v1/tunnels/<id>``); binary messages carry the bytes. On the path of a
  service that does not authenticate its users itself (a console) the client
  presents a console token first: ``Authorization: Bearer``, ``?token=`` or a
  first text message; ``read`` watches (what it sends is dropped), ``manage``
  types. Refusals close with 4401 (no or bad token) or 4403 (not this job). A console
  stays open only while it holds a valid token: at the token's ``exp`` plus
  ``console_grace`` it is closed with 4401, unless the client renewed it (a later text
  message, other than a half-close ``eof``, holding a new console token of the same user
  for the same job; it may lower the access, never raise it).
- :class:`DataEnd`: a supervisor's data connection on ``data_listen``. Its
  first line is ``TREADMILL-DATA/1 <conn_id> <token>``
  (``messages.data_header``), or ``TREADMILL-POOL/1 <job> <token>``
  (``messages.pool_header``, control minor 2): then it waits in the job's
  dial-back pool, reading (a byte or an end of file from the supervisor takes
  it out and closes it), until a client takes it (:meth:`DataEnd.assign`).
  Anything else, or nothing within the connect timeout, closes it without a
  word.
"""

from __future__ import annotations

import secrets
from typing import Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from treadmill.common.captoken import CapabilityError, Claims, bearer_token
from treadmill.common.eager import write_now
from treadmill.common.splice import (
    EOF,
    TUNNEL_SUBPROTOCOL,
    StreamEnd,
    WebSocketEnd,
    keep_alive,
    no_delay,
)
from treadmill.common.wsfactory import PreciseServerFactory
from treadmill.common.wsjson import BoundFactory, QuietLogger, close_reason
from treadmill.protocol import proxy as messages
from treadmill.protocol.proxy import ConsoleCloseCode
from treadmill.proxy.tunnels import Pending, Tunnel, TunnelTable

__all__ = ["DataEnd", "DataFactory", "PublicEnd", "PublicFactory", "TunnelFactory",
           "TunnelSocket"]

MAX_MESSAGE = 1024 * 1024  # what one client WebSocket message may hold (we send 64 KiB)
NO_TUNNEL = 4011
"""The close code of a tunnel WebSocket bound to no tunnel (1011, internal error, shifted
into the private range: Autobahn lets an application send only 1000 and 3000-4999)."""


def peer_address(peer: str) -> str:
    """The client's address of an Autobahn peer string (``tcp4:10.0.0.1:5000`` →
    ``10.0.0.1``, ``tcp6:::1:5000`` → ``::1``); anything else as it is."""
    kind, _, rest = peer.partition(":")
    if kind in ("tcp4", "tcp6") and ":" in rest:
        return rest.rsplit(":", 1)[0]
    return peer


class PublicEnd(StreamEnd):
    """A client on a public TCP port."""

    def __init__(self, registry: TunnelTable, tunnel: Tunnel):
        super().__init__()
        self.registry = registry
        self.tunnel = tunnel
        self.pending: Pending | None = None

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.pending = self.registry.client_arrived(self.tunnel, self)
        if self.splice is None:
            # Not joined at once (no pooled connection was waiting): read nothing until
            # its data connection is joined. A client joined at once just goes on reading.
            self.transport.pauseProducing()

    def gone(self, reason: Any) -> None:
        if self.pending is not None and self.splice is None:
            self.registry.client_gone(self.pending)
        self.pending = None


class PublicFactory(ServerFactory):
    """The factory of one tunnel's public port."""

    noisy = False

    def __init__(self, registry: TunnelTable, tunnel: Tunnel):
        self.registry = registry
        self.tunnel = tunnel

    def buildProtocol(self, addr: Any) -> PublicEnd:
        return PublicEnd(self.registry, self.tunnel)


class DataEnd(StreamEnd):
    """A supervisor's data connection: a header line, then the client's bytes."""

    log = Logger()

    def __init__(self, registry: TunnelTable, timeout: float):
        super().__init__()
        self.registry = registry
        self.timeout = timeout
        self._header = b""
        self._timer: Any = None
        self.pooled: str | None = None  # the job whose pool holds it (idle)

    def connectionMade(self) -> None:
        # Read the header now; the join pauses nothing (both legs are ready then).
        no_delay(self.transport)
        self._timer = self.registry.reactor.callLater(self.timeout, self._no_header)

    def _no_header(self) -> None:
        self._timer = None
        self.registry.counts["data_no_header"] += 1
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.splice is not None:
            super().dataReceived(data)
            return
        if self.pooled is not None:
            # Idle in the pool: nothing may come before a client is joined.
            self.registry.pool_lost(self.pooled, self)
            self.pooled = None
            self._refuse("bytes on an idle pooled data connection")
            return
        self._header += data
        end = self._header.find(b"\n")
        if end < 0:
            if len(self._header) > messages.MAX_HEADER_BYTES:
                self._refuse("data header too long")
            return
        line, rest = self._header[:end], self._header[end + 1:]
        self._header = b""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if line.startswith(messages.POOL_MAGIC + b" "):
            self._pool(line, rest)
            return
        try:
            conn_id, token = messages.parse_data_header(line)
        except messages.ProtocolError as e:
            self._refuse(str(e))
            return
        self.transport.pauseProducing()  # join() resumes it
        if self.registry.data_arrived(conn_id, token, self) is None:
            self.transport.abortConnection()
            return
        if rest:
            super().dataReceived(rest)

    def _pool(self, line: bytes, rest: bytes) -> None:
        try:
            job, token = messages.parse_pool_header(line)
        except messages.ProtocolError as e:
            self._refuse(str(e))
            return
        if rest:
            self._refuse("bytes after the pool header")
            return
        if not self.registry.pool_arrived(job, token, self):
            self.transport.abortConnection()
            return
        self.pooled = job  # keeps reading: an end of file takes it out of the pool
        keep_alive(self.transport)  # a dead one is found before a client is joined to it

    def assign(self, service: str) -> None:
        """A client takes this pooled connection: tell the supervisor which service (the
        registry joins the two next)."""
        self.pooled = None
        write_now(self.transport, messages.join_line(service))

    def _refuse(self, why: str) -> None:
        self.registry.counts["data_malformed"] += 1
        self.log.info("Refused a data connection: {why}", why=why)
        self.transport.abortConnection()

    def gone(self, reason: Any) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.pooled is not None:
            self.registry.pool_lost(self.pooled, self)
            self.pooled = None


class DataFactory(ServerFactory):
    """The factory of the ``data_listen`` listeners."""

    noisy = False

    def __init__(self, registry: TunnelTable, timeout: float):
        self.registry = registry
        self.timeout = timeout

    def buildProtocol(self, addr: Any) -> DataEnd:
        return DataEnd(self.registry, self.timeout)


CONSOLE_LOG = Logger(namespace="treadmill.proxy.consoles")
"""Console connections' records (docs/proxy.md, "Records"). A module's logger, not a class
attribute: ``Logger.__get__`` would name it after the class it is read through."""


class TunnelSocket(WebSocketServerProtocol, WebSocketEnd):
    """A client on a tunnel's WebSocket path (see the module docstring for consoles)."""

    # Autobahn's (quiet: its debug lines would show the handshake's token).
    log = QuietLogger(namespace="treadmill.proxy.legs.ws")
    factory: TunnelFactory
    tunnel: Tunnel | None = None
    pending: Pending | None = None
    access: str | None = None  # a console client's: "read" or "manage"
    _offered: str | None = None
    _auth_timer: Any = None
    _peer = ""
    _console: tuple[str, str, str | None] | None = None  # (conn_id, subject, jti) once opened
    _expiry: Any = None  # closes a console whose token expired (and was not renewed)

    def onConnect(self, request: ConnectionRequest) -> str | None:
        # The subprotocol adds half-close (a text message "eof"); plain binary without it.
        self.half_close = TUNNEL_SUBPROTOCOL in request.protocols
        self._peer = request.peer
        self._offered = bearer_token(request.headers.get("authorization"))
        tokens = request.params.get("token")
        if self._offered is None and tokens:
            self._offered = tokens[-1]
        return TUNNEL_SUBPROTOCOL if self.half_close else None

    def onOpen(self) -> None:
        if self.tunnel is None:
            self.sendClose(NO_TUNNEL, "no tunnel")
            return
        if self.tunnel.authenticates:
            self._arrive()
        elif self._offered is not None:
            self._authenticate(self._offered)
        else:  # the token comes in the first text message
            registry = self.factory.registry
            tunnel = self.tunnel
            if tunnel.connections + tunnel.unauthenticated >= \
                    registry.settings.max_connections_per_tunnel:
                registry.counts["refused_limit"] += 1
                self.sendClose(int(ConsoleCloseCode.BUSY), "too many connections; try again later")
                return
            tunnel.unauthenticated += 1
            self._auth_timer = registry.reactor.callLater(
                registry.settings.connect_timeout, self._refuse,
                ConsoleCloseCode.UNAUTHORIZED, "no console token in time", "timeout")

    def _arrive(self) -> None:
        self.end_opened()
        assert self.tunnel is not None
        self.pending = self.factory.registry.client_arrived(self.tunnel, self)

    def _authenticate(self, token: str) -> None:
        self._offered = None
        tunnel = self.tunnel
        assert tunnel is not None
        registry = self.factory.registry
        job = tunnel.session.job
        try:
            claims: Claims = registry.verifier.verify_any(token)
        except CapabilityError as e:
            self._refuse(ConsoleCloseCode.UNAUTHORIZED,
                         f"console token refused ({e.reason})", e.reason)
            return
        if claims.allows("tunnel", job, "manage"):
            self.access = "manage"
        elif claims.allows("tunnel", job, "read"):
            self.access = "read"
        else:
            self._refuse(ConsoleCloseCode.FORBIDDEN,
                         f"the token grants neither read nor manage on job {job}",
                         "insufficient_scope", claims.subject)
            return
        registry.counts[f"console_{self.access}"] += 1
        # A stable event name in the proxy's log, and a notice for the switchboard's audit
        # log through the job's supervisor (docs/proxy.md, "Consoles").
        jti = claims.raw.get("jti")
        jti = jti if isinstance(jti, str) else None
        self._console = (secrets.token_urlsafe(16), claims.subject, jti)
        CONSOLE_LOG.info(
            "console_opened: {subject} opened {service} of job {job} to {access} (token "
            "{jti}, from {peer})", audit_event="console_opened", subject=claims.subject,
            job=job, service=tunnel.service, access=self.access, jti=jti, peer=self._peer)
        registry.console_event(tunnel, "opened", self._console[0], claims.subject, self.access,
                               peer_address(self._peer), jti)
        self._expire_at(claims.expires_at)
        self._arrive()

    def _expire_at(self, expires_at: float) -> None:
        """Close this console ``console_grace`` seconds after ``expires_at`` (a token's
        ``exp``) unless a renewal comes first."""
        registry = self.factory.registry
        delay = max(0.0, expires_at + registry.settings.console_grace - registry.reactor.seconds())
        if self._expiry is not None and self._expiry.active():
            self._expiry.reset(delay)
        else:
            self._expiry = registry.reactor.callLater(delay, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        registry = self.factory.registry
        registry.counts["console_expired"] += 1
        tunnel, opened = self.tunnel, self._console
        CONSOLE_LOG.info(
            "console_expired: {subject}'s console of {service} of job {job} closed: its token "
            "expired and was not renewed (from {peer})", audit_event="console_expired",
            subject=opened[1] if opened else None, service=tunnel.service if tunnel else None,
            job=tunnel.session.job if tunnel else None, access=self.access, peer=self._peer)
        if self.state == self.STATE_OPEN:
            self.sendClose(int(ConsoleCloseCode.UNAUTHORIZED), "console token expired")

    def _renew(self, payload: bytes) -> None:
        """A text message on an open console: a new console token (docs/proxy.md,
        "Renewing"). Verified as the first one; the same user and job; the access it
        grants may lower the console's (manage to read: typing stops now), never raise
        it. A renewal that fails closes the console as a first token would be refused."""
        tunnel, opened = self.tunnel, self._console
        assert tunnel is not None and opened is not None
        registry = self.factory.registry
        job = tunnel.session.job
        try:
            claims: Claims = registry.verifier.verify_any(payload.decode("ascii").strip())
        except (CapabilityError, UnicodeDecodeError) as e:
            why = e.reason if isinstance(e, CapabilityError) else "malformed"
            self._refuse(ConsoleCloseCode.UNAUTHORIZED, f"renewal refused ({why})",
                         f"renewal_{why}", opened[1])
            return
        if claims.subject != opened[1]:
            self._refuse(ConsoleCloseCode.FORBIDDEN, "the renewal is another user's",
                         "renewal_subject", claims.subject)
            return
        if claims.allows("tunnel", job, "manage"):
            granted = "manage"
        elif claims.allows("tunnel", job, "read"):
            granted = "read"
        else:
            self._refuse(ConsoleCloseCode.FORBIDDEN,
                         f"the renewal grants neither read nor manage on job {job}",
                         "renewal_insufficient_scope", claims.subject)
            return
        if granted == "read":
            self.access = "read"  # lowered, or read already; manage is never granted here
        registry.counts["console_renewed"] += 1
        jti = claims.raw.get("jti")
        CONSOLE_LOG.info(
            "console_renewed: {subject} renewed {service} of job {job} to {access} (token "
            "{jti}, from {peer})", audit_event="console_renewed", subject=claims.subject,
            job=job, service=tunnel.service, access=self.access,
            jti=jti if isinstance(jti, str) else None, peer=self._peer)
        self._expire_at(claims.expires_at)

    def _refuse(self, code: int, text: str, reason: str, subject: str | None = None) -> None:
        self._stop_waiting()
        registry = self.factory.registry
        registry.counts["console_refused"] += 1
        tunnel = self.tunnel
        CONSOLE_LOG.info(
            "console_refused: a client of {service} of job {job} ({reason}; subject "
            "{subject}, from {peer})", audit_event="console_refused",
            service=tunnel.service if tunnel else None,
            job=tunnel.session.job if tunnel else None, reason=reason, subject=subject,
            peer=self._peer)
        if self.state == self.STATE_OPEN:
            self.sendClose(int(code), close_reason(text))

    def _stop_waiting(self) -> None:
        """No longer waiting for the token's message."""
        timer, self._auth_timer = self._auth_timer, None
        if timer is not None:
            if timer.active():
                timer.cancel()
            if self.tunnel is not None:
                self.tunnel.unauthenticated -= 1

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._auth_timer is not None:
            self._stop_waiting()
            if isBinary:
                self._refuse(ConsoleCloseCode.UNAUTHORIZED,
                             "send the console token first (a text message)", "no_token")
                return
            try:
                token = payload.decode("ascii").strip()
            except UnicodeDecodeError:
                token = ""
            self._authenticate(token)
            return
        if self._console is not None and not isBinary and payload != EOF:
            self._renew(payload)  # "eof" is a half-close (or, without it, as before)
            return
        if self.access == "read":
            # A read token watches: nothing it sends reaches the service (not even eof).
            if isBinary:
                self.factory.registry.counts["console_input_dropped"] += 1
            return
        if self.access is None and self.tunnel is not None and not self.tunnel.authenticates:
            return  # refused, closing
        self.end_message(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._stop_waiting()
        expiry, self._expiry = self._expiry, None
        if expiry is not None and expiry.active():
            expiry.cancel()
        opened, self._console = self._console, None
        if opened is not None and self.tunnel is not None and self.access is not None:
            self.factory.registry.console_event(self.tunnel, "closed", opened[0], opened[1],
                                                self.access, peer_address(self._peer),
                                                opened[2])
        if self.pending is not None and self.splice is None:
            self.factory.registry.client_gone(self.pending)
        self.pending = None
        self.end_closed()


class TunnelFactory(PreciseServerFactory):
    """Builds :class:`TunnelSocket`; :meth:`for_tunnel` binds one to a tunnel."""

    protocol = TunnelSocket

    def __init__(self, registry: TunnelTable):
        super().__init__(reactor=registry.reactor)
        self.registry = registry
        # No auto-ping: a client the proxy has paused (backpressure) could not answer in
        # time; the idle timeout closes dead connections.
        self.setProtocolOptions(maxMessagePayloadSize=MAX_MESSAGE,
                                maxFramePayloadSize=MAX_MESSAGE, openHandshakeTimeout=10,
                                closeHandshakeTimeout=5)

    def for_tunnel(self, tunnel: Tunnel) -> Any:
        return BoundFactory(self, tunnel=tunnel)
