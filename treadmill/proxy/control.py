"""The control WebSocket: one per job, opened by its supervisor (``docs/proxy.md``).

The HTTP route (``api.py``) has verified the capability token before the
upgrade; a :class:`ControlProtocol` is bound to the job the token grants
``publish`` on. It validates every received frame against the schema; a
violation is answered with ``protocol_error`` and closes this connection with
4000 (the job's tunnels then wait out the grace period, like after any other
loss, and no other job is affected).
"""

from __future__ import annotations

import functools
from typing import Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.logger import Logger

from treadmill.common.wsfactory import PreciseServerFactory
from treadmill.common.wsjson import BoundFactory, JsonSession, QuietLogger
from treadmill.protocol import proxy as messages
from treadmill.protocol.proxy import CloseCode
from treadmill.proxy.tunnels import JobSession, TunnelTable

__all__ = ["ControlFactory", "ControlProtocol"]


_parse = functools.partial(messages.parse, expect=messages.TO_PROXY)


class ControlProtocol(JsonSession, WebSocketServerProtocol):
    """A job's control connection (a :class:`tunnels.Control`)."""

    log = QuietLogger(namespace="treadmill.proxy.control.ws")
    factory: ControlFactory
    job: str = ""
    subject: str = ""
    token: str = ""
    minor = 0
    """The control protocol minor the supervisor announced (``messages.negotiate_minor``)."""

    def __init__(self) -> None:
        super().__init__()
        self.session: JobSession | None = None
        self.handling = False

    # -- tunnels.Control (send: JsonSession's) -------------------------------------------

    def close(self, code: int, reason: str) -> None:
        self.handling = False
        super().close(code, reason)

    # -- Autobahn --------------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> tuple[str, dict[str, str]]:
        if messages.SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(400, f"subprotocol {messages.SUBPROTOCOL} is required")
        self.minor = messages.negotiate_minor(request.headers.get(messages.MINOR_HEADER))
        return messages.SUBPROTOCOL, {messages.MINOR_HEADER: str(self.minor)}

    def onOpen(self) -> None:
        self.handling = True
        self.session = self.factory.registry.attach(self, self.subject, self.token)
        self.token = ""  # the registry keeps its digest

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is None:
            return
        message = self.receive(payload, isBinary, _parse, messages.ProtocolError)
        if message is not None:
            self.factory.registry.handle(self.session, self, message)

    # -- JsonSession: the supervisor broke the protocol ---------------------------------

    violation_code = CloseCode.PROTOCOL_VIOLATION

    def violation_message(self, text: str) -> dict[str, Any]:
        return messages.protocol_error(text)

    def log_violation(self, text: str) -> None:
        self.factory.registry.counts["control_violation"] += 1
        self.factory.log.warn("Job {job}: protocol violation on the control connection: {text}",
                              job=self.job, text=text)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.session is None:
            return  # never opened
        self.handling = False
        # 1000 from the supervisor means "the job ended"; anything else is a loss.
        final = not self.closedByMe and self.remoteCloseCode == CloseCode.NORMAL
        self.factory.registry.detach(self, final=final)


class ControlFactory(PreciseServerFactory):
    """Builds :class:`ControlProtocol`; :meth:`for_job` binds one to a verified job."""

    protocol = ControlProtocol
    log = Logger()

    def __init__(self, registry: TunnelTable, ping_interval: float = 10.0):
        super().__init__(reactor=registry.reactor)
        self.registry = registry
        self.setProtocolOptions(autoPingInterval=ping_interval, autoPingTimeout=ping_interval,
                                openHandshakeTimeout=10, closeHandshakeTimeout=5,
                                maxMessagePayloadSize=messages.MAX_MESSAGE_BYTES,
                                maxFramePayloadSize=messages.MAX_MESSAGE_BYTES)

    def for_job(self, job: str, subject: str, token: str) -> Any:
        return BoundFactory(self, job=job, subject=subject, token=token)
