"""The supervisor's WebSocket link to the switchboard (``docs/protocol.md``).

:class:`SupervisorLink` is a service that keeps one connection to
``ws(s)://SWITCHBOARD/api/v1/supervisor`` up with a ``ClientService``:
capped exponential backoff with jitter between attempts. Each connection is a
:class:`SupervisorProtocol` (Autobahn) that authenticates with the host token,
asks for subprotocol ``treadmill.supervisor.v1`` with our minor version in
``X-Treadmill-Protocol-Minor``, pings every ``heartbeat_interval`` seconds and
drops the connection when no pong comes within ``heartbeat_timeout``.

Every received frame is validated (``protocol.parse``); a violation is
answered with ``protocol_error`` and close code 4000. Valid messages go to
the handler (the :class:`~treadmill.supervisor.runner.JobRunner`).

Backoff: a connection attempt that fails, a handshake the switchboard refuses
(HTTP 401 for a bad token, 400 for another major version) and a session it
closes with a 4xxx code (superseded, host removed, protocol violation) each
count as a failure, and the delay grows with consecutive failures up to
``reconnect_max``; a version mismatch goes straight to ``reconnect_max``. A
session that ends otherwise (a switchboard restart or failover, a dead
network) resets the count, and the first attempt after it comes after a
random delay in [0, ``reconnect_initial``) ("full jitter"): a fleet whose
instance died still spreads its return over ``reconnect_initial`` without
first waiting that long; if that attempt fails, the delays grow as above.

An upgrade refused with HTTP 503 (the switchboard has as many link handshakes
under way as it admits, or its database is away) is a normal retry: it counts
as a failure, and the next attempt waits at least its ``Retry-After``, the
delay doubling with each refusal in a row up to ``BUSY_BACKOFF_MAX`` (8 s; or
half of ``reconnect_max`` if less), plus a random share of up to that much
again, so a refused fleet spreads out instead of coming back at once, and a
supervisor refused many times is not left waiting a minute while the
switchboard has room again (a failover's tail).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientProtocol
from autobahn.websocket.types import ConnectingRequest
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import wrapClientTLS
from twisted.logger import Logger

from treadmill.common.splice import client_endpoint
from treadmill.common.tls import client_options
from treadmill.common.wsfactory import PreciseClientFactory
from treadmill.common.wsjson import JsonSession, QuietLogger
from treadmill.protocol import supervisor as protocol
from treadmill.protocol.supervisor import CloseCode

__all__ = ["CloseInfo", "LinkHandler", "SupervisorLink", "SupervisorProtocol", "parse_url"]

MINOR_HEADER = "X-Treadmill-Protocol-Minor"
_GIVE_UP_FAST = 64  # a failure count that means "wait reconnect_max"
BUSY_BACKOFF_MAX = 8.0
"""The longest delay before jitter after 503s in a row (unless Retry-After says more)."""


class LinkHandler(Protocol):
    """What the link calls (the runner)."""

    def link_opened(self, session: SupervisorProtocol) -> None: ...

    def link_closed(self, session: SupervisorProtocol) -> None: ...

    def message_received(self, session: SupervisorProtocol, message: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class CloseInfo:
    """How the last connection ended."""

    opened: bool
    code: int | None
    reason: str | None
    http_status: int | None = None
    local: bool = False  # the supervisor closed it (with ``code``)
    retry_after: float | None = None  # seconds, from a refused upgrade's Retry-After


def parse_url(url: str) -> tuple[bool, str, int, str]:
    """``(secure, host, port, ws_url)`` from a ``ws://`` or ``wss://`` base URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"expected a base URL without query, fragment or user, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid port in {url!r}") from None
    secure = parts.scheme == "wss"
    port = port or (443 if secure else 80)
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    path = parts.path.rstrip("/") + protocol.PATH
    return secure, host, port, f"{parts.scheme}://{shown}:{port}{path}"


_parse = functools.partial(protocol.parse, expect=protocol.TO_SUPERVISOR)


class _ProtocolLogger(QuietLogger):
    """Autobahn's warning for each upgrade a busy switchboard refused (503) is
    dropped: that is a normal retry, which :class:`SupervisorLink` logs at info (a
    fleet connecting at once would write thousands of warnings)."""

    def warn(self, format: str | None = None, **kwargs: Any) -> None:
        if "upgrade failed [503]" not in str(kwargs.get("reason", "")):
            super().warn(format, **kwargs)


class SupervisorProtocol(JsonSession, WebSocketClientProtocol):
    """One connection to the switchboard: a runner :class:`~runner.Session`."""

    log = _ProtocolLogger(namespace="treadmill.supervisor.link.ws")
    # Autobahn reads this before it copies the factory's options: without it,
    # Nagle's algorithm holds each small message ~40 ms behind the last ack.
    tcpNoDelay = True

    def __init__(self) -> None:
        super().__init__()
        self.minor: int | None = None
        self.was_open = False  # the session opened (versions agreed)
        self.handling = False  # messages are handled (until a violation)
        self._version_error: str | None = None
        self._request_id = 0
        self.closed: Deferred[None] = Deferred()

    # -- Session ---------------------------------------------------------------------

    def next_request_id(self) -> int:
        self._request_id += 1
        return self._request_id

    # -- Autobahn --------------------------------------------------------------------

    def startHandshake(self) -> None:
        """Send the upgrade request, as Autobahn does without ``onConnecting``, but
        without pretty-printing the transport for a debug line first (``pformat``: about
        7 % of a fleet's CPU in a failover, for a line the quiet logger drops)."""
        factory = self.factory
        self._actuallyStartHandshake(ConnectingRequest(
            host=factory.host, port=factory.port, resource=factory.resource,
            headers=factory.headers, useragent=factory.useragent, origin=factory.origin,
            protocols=factory.protocols))

    def onConnect(self, response: Any) -> None:
        if response.protocol != protocol.SUBPROTOCOL:
            self._version_error = (f"the switchboard did not accept subprotocol "
                                   f"{protocol.SUBPROTOCOL} (chose {response.protocol!r})")
            return
        try:
            self.minor = protocol.negotiate_minor(response.headers.get(protocol.MINOR_HEADER))
        except protocol.ProtocolError as e:
            self._version_error = str(e)

    def onOpen(self) -> None:
        if self._version_error is not None:
            self.link.log.error("{link}: version mismatch: {error}", link=self.link.name,
                                error=self._version_error)
            self.link.failures = _GIVE_UP_FAST
            self.close(CloseCode.VERSION_MISMATCH, "version mismatch")
            return
        self.was_open = True
        self.handling = True
        self.link._opened(self)

    @property
    def link(self) -> SupervisorLink:
        return self.factory.link  # type: ignore[no-any-return]

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = self.receive(payload, isBinary, _parse, protocol.ProtocolError)
        if message is None:
            return
        if message["type"] == "protocol_error":
            self.link.log.error("{link}: the switchboard reports a protocol error: {code}: "
                                "{text}", link=self.link.name, code=message["code"],
                                text=message["message"])
            return
        self.link.handler.message_received(self, message)

    # -- JsonSession: the switchboard broke the protocol ------------------------------

    violation_code = CloseCode.PROTOCOL_VIOLATION

    def violation_message(self, text: str) -> dict[str, Any]:
        return protocol.protocol_error("violation", text)

    def log_violation(self, text: str) -> None:
        self.link.log.error("{link}: protocol violation by the switchboard: {text}",
                            link=self.link.name, text=text)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        status = retry_after = None
        status_line = getattr(self, "http_status_line", None)
        if status_line:
            parts = status_line.split()
            if len(parts) >= 2 and parts[1].isdigit() and parts[1] != "101":
                status = int(parts[1])
                retry_after = _seconds(getattr(self, "http_headers", {}).get("retry-after"))
        local = bool(self.closedByMe and self.localCloseCode is not None)
        if local:
            code, reason = self.localCloseCode, self.localCloseReason  # we closed, say why
        elif self.remoteCloseCode is not None:
            code, reason = self.remoteCloseCode, self.remoteCloseReason
        info = CloseInfo(opened=self.was_open, code=code, reason=reason, http_status=status,
                         local=local, retry_after=retry_after)
        try:
            self.link._closed(self, info)
        finally:
            if not self.closed.called:
                self.closed.callback(None)


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the HTTP-date form and nonsense give ``None``)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


class SupervisorLink(Service):
    """Keeps the connection to the switchboard up; see the module docstring."""

    log = Logger()

    def __init__(self, reactor: Any, url: str, token: str, handler: LinkHandler, *,
                 ca_file: str | None = None, reconnect_initial: float = 1.0,
                 reconnect_max: float = 60.0, heartbeat_interval: float = 5.0,
                 heartbeat_timeout: float = 10.0, name: str = "supervisor",
                 jitter: Callable[[], float] = random.random):
        self.reactor = reactor
        self.handler = handler
        self.name = name
        secure, host, port, self.url = parse_url(url)
        self.factory = PreciseClientFactory(
            self.url, protocols=[protocol.SUBPROTOCOL], reactor=reactor,
            headers={"Authorization": f"Bearer {token}", MINOR_HEADER: str(protocol.MINOR)})
        self.factory.protocol = SupervisorProtocol
        self.factory.link = self
        self.factory.noisy = False  # no "Starting factory" and "Stopping factory" per attempt
        self.factory.setProtocolOptions(
            autoPingInterval=heartbeat_interval, autoPingTimeout=heartbeat_timeout,
            openHandshakeTimeout=heartbeat_timeout,
            maxMessagePayloadSize=protocol.MAX_MESSAGE_BYTES,
            maxFramePayloadSize=protocol.MAX_MESSAGE_BYTES)
        # An address skips the resolver thread (and HostnameEndpoint's per-attempt
        # classes) on every reconnect; a name is resolved each time.
        endpoint: Any = client_endpoint(reactor, host, port, heartbeat_timeout)
        if secure:
            endpoint = wrapClientTLS(client_options(host, ca_file), endpoint)
        # Jitter in proportion to the initial delay (random.random for the default 1 s).
        self._backoff = backoffPolicy(reconnect_initial, reconnect_max, factor=2,
                                      jitter=lambda: jitter() * reconnect_initial)
        self._jitter = jitter
        self._reconnect_initial = reconnect_initial
        self._reconnect_max = reconnect_max
        self._refused_after: float | None = None  # the last attempt's 503: its Retry-After
        self._session_lost = False  # the last connection was a session that ended normally
        self.client = ClientService(endpoint, self.factory, retryPolicy=self._retry_delay,
                                    clock=reactor)
        self.session: SupervisorProtocol | None = None
        self.failures = 0
        self.last_close: CloseInfo | None = None
        self.connections = 0  # sessions opened so far
        self._open_waiters: list[Deferred[SupervisorProtocol]] = []
        self._stopping = False

    # -- service ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.client.startService()

    def stopService(self) -> Deferred[None]:
        """Close the session with 4005 (going away), then stop reconnecting."""
        super().stopService()
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self.close(CloseCode.GOING_AWAY, "supervisor shutting down")
        await self.client.stopService()

    def _retry_delay(self, attempt: int) -> float:
        # ``attempt`` counts failed TCP connects in a row (1 after a lost session);
        # ``failures`` counts refused handshakes and sessions closed with 4xxx.
        if attempt <= 1:  # (no failed connects since the last connection)
            if self._refused_after is not None:
                return self._busy_delay(self._refused_after)
            if self._session_lost:  # full jitter: anywhere in [0, reconnect_initial)
                return self._jitter() * self._reconnect_initial
        return self._backoff(max(0, attempt - 1) + self.failures)

    def _busy_delay(self, retry_after: float) -> float:
        """After a 503: at least ``retry_after``, doubling with refusals in a row, up to
        ``BUSY_BACKOFF_MAX`` (and ``reconnect_max / 2``), then times one plus a jitter in
        [0, 1)."""
        doubled = self._reconnect_initial * 2.0 ** min(max(self.failures - 1, 0), 30)
        base = min(self._reconnect_max / 2,
                   max(retry_after, min(doubled, BUSY_BACKOFF_MAX)))
        return base * (1.0 + self._jitter())

    # -- waiting ---------------------------------------------------------------------

    def when_open(self) -> Deferred[SupervisorProtocol]:
        """The open session, or the next one."""
        if self.session is not None:
            return succeed(self.session)
        waiter: Deferred[SupervisorProtocol] = Deferred()
        self._open_waiters.append(waiter)
        return waiter

    async def close(self, code: int = CloseCode.GOING_AWAY,
                    reason: str = "supervisor shutting down", timeout: float = 3.0) -> None:
        """Close the open session (if any) with ``code`` and wait, at most ``timeout``."""
        session = self.session
        if session is None:
            return
        session.close(code, reason)
        closed = session.closed
        timer = self.reactor.callLater(timeout, lambda: closed.called or closed.callback(None))
        await closed
        if timer.active():
            timer.cancel()

    # -- from the protocol -----------------------------------------------------------

    def _opened(self, session: SupervisorProtocol) -> None:
        self.session = session
        self.connections += 1
        self.log.info("{link}: connected to {url} (protocol {major}.{minor})", link=self.name,
                      url=self.url, major=protocol.MAJOR, minor=session.minor)
        self.handler.link_opened(session)
        waiters, self._open_waiters = self._open_waiters, []
        for waiter in waiters:
            waiter.callback(session)

    def _closed(self, session: SupervisorProtocol, info: CloseInfo) -> None:
        was_session = session is self.session
        if was_session:
            self.session = None
            self.handler.link_closed(session)
        self.last_close = info
        self._classify(info, was_session)
        self._session_lost = was_session and self.failures == 0

    def _classify(self, info: CloseInfo, was_session: bool) -> None:
        """Log how the connection ended and adjust the backoff."""
        log, name, code = self.log, self.name, info.code
        self._refused_after = None
        if info.local:
            # Our own close: a violation or mismatch was logged when found.
            if code == CloseCode.VERSION_MISMATCH:
                self.failures = _GIVE_UP_FAST
            elif code == CloseCode.PROTOCOL_VIOLATION:
                self.failures += 1
            elif not self._stopping:
                log.info("{link}: closed the connection (code {code})", link=name, code=code)
            return
        if not was_session:
            status = info.http_status
            if status == 401:
                log.error("{link}: the switchboard refused the host token (HTTP 401); check "
                          "switchboard.token; retrying with backoff", link=name)
                self.failures += 1
            elif status == 400:
                log.error("{link}: the switchboard refused the connection (HTTP 400): it may "
                          "not speak {sub}; retrying slowly", link=name, sub=protocol.SUBPROTOCOL)
                self.failures = _GIVE_UP_FAST
            elif status == 503:
                # Busy (handshakes under way beyond its limit) or the database is away.
                self.failures += 1
                self._refused_after = info.retry_after or 0.0
                log.info("{link}: the switchboard is busy or its database unavailable "
                         "(HTTP 503); retrying with backoff ({count} in a row)", link=name,
                         count=self.failures)
            elif status is not None:
                log.warn("{link}: WebSocket upgrade refused (HTTP {status})", link=name,
                         status=status)
                self.failures += 1
            else:
                if not self._stopping:
                    log.warn("{link}: connection ended before the WebSocket opened: {reason}",
                             link=name, reason=info.reason)
                self.failures += 1
            return
        if code == CloseCode.SUPERSEDED:
            log.warn("{link}: superseded by a newer connection of this host (code 4002); is "
                     "another supervisor using the same token?", link=name)
            self.failures += 1
        elif code == CloseCode.HOST_REMOVED:
            log.error("{link}: the switchboard removed this host or replaced its token "
                      "(code 4004)", link=name)
            self.failures += 1
        elif code == CloseCode.VERSION_MISMATCH:
            log.error("{link}: the switchboard closed for a protocol version mismatch "
                      "(code 4001); retrying slowly", link=name)
            self.failures = _GIVE_UP_FAST
        elif code == CloseCode.PROTOCOL_VIOLATION:
            log.error("{link}: closed for a protocol violation (code 4000): {reason}",
                      link=name, reason=info.reason)
            self.failures += 1
        elif code == CloseCode.GOING_AWAY:
            log.info("{link}: the switchboard is shutting down (code 4005); reconnecting",
                     link=name)
            self.failures = 0
        elif code == CloseCode.INTERNAL_ERROR:
            log.warn("{link}: the switchboard closed with an internal error (code 4003)",
                     link=name)
            self.failures += 1
        else:
            if not self._stopping:
                log.info("{link}: disconnected (code {code}: {reason})", link=name, code=code,
                         reason=info.reason)
            self.failures = 0
