"""One JSON-WebSocket session for Autobahn protocols: a quiet logger, ``send``,
``close`` and ``violation``; :class:`BoundFactory`, one request's protocol factory.

A session copies its factory's protocol options itself (:meth:`JsonSession.connectionMade`):
Autobahn's own copy also pretty-prints all of them for a debug line on every
connection (``pformat``, about 0.1 ms each side of a link), which the quiet
logger then drops. For the same reason it takes each read and the end of the
connection (:meth:`JsonSession.dataReceived`, :meth:`JsonSession.connectionLost`)
without Autobahn's debug lines, whose arguments (``hltype``: the qualified name of
a method, coloured) were built for every read before being dropped.

Autobahn logs the opening handshake, ``Authorization: Bearer`` included, at
debug level: every Autobahn protocol class in Treadmill sets ``log`` to a
:class:`QuietLogger`, which drops debug and trace lines (a test walks the
modules to check). A close reason is cut to the 123 bytes of UTF-8 a close frame
may carry (:func:`close_reason`), never inside a character.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from autobahn.util import _is_tls_error, _maybe_tls_reason
from twisted.logger import Logger
from twisted.python.failure import Failure

from treadmill.common.messages import encode

__all__ = ["MAX_CLOSE_REASON", "BoundFactory", "JsonSession", "QuietLogger", "close_reason"]

MAX_CLOSE_REASON = 123  # bytes: a close frame's payload is at most 125, 2 of them the code


class QuietLogger(Logger):
    """Autobahn's protocol logger without debug and trace: those lines hold the
    handshake, bearer token included, and secrets never go to logs."""

    def debug(self, *args: Any, **kwargs: Any) -> None:
        pass

    def trace(self, *args: Any, **kwargs: Any) -> None:
        pass


def close_reason(reason: str) -> str:
    """``reason`` cut to at most :data:`MAX_CLOSE_REASON` bytes of UTF-8, between characters."""
    return reason.encode("utf-8")[:MAX_CLOSE_REASON].decode("utf-8", "ignore")


class BoundFactory:
    """What ``WebSocketResource`` needs of a factory for one verified request:
    ``buildProtocol`` builds ``factory``'s protocol and sets ``attributes`` on it
    (the job, tunnel or stream the request named)."""

    def __init__(self, factory: Any, **attributes: Any):
        self.factory = factory
        self.attributes = attributes

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self.factory.buildProtocol(addr)
        for name, value in self.attributes.items():
            setattr(protocol, name, value)
        return protocol


class JsonSession:
    """Mixin for an Autobahn protocol whose messages are JSON objects in text frames.

    Put it before the Autobahn class (``class P(JsonSession, WebSocketClientProtocol)``)
    and give ``log`` a :class:`QuietLogger` with the protocol's namespace. A subclass
    says how it reports a violation: :meth:`violation_message` (the protocol's
    ``protocol_error``) and :meth:`log_violation`. ``handling`` is whether received
    messages are still handled; :meth:`violation` ends it.
    """

    log: Logger = QuietLogger(namespace="treadmill.websocket")
    violation_code = 4000
    handling = False
    # From the Autobahn protocol it is mixed into: state, STATE_OPEN, sendMessage, sendClose.

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The logger bound to this session, made once: Autobahn reads ``self.log`` for
        # each of its many debug lines, and ``Logger.__get__`` makes one at each read.
        self.log = self.log

    CONFIG_ATTRS: tuple[str, ...] = ()
    """None for Autobahn to copy: :meth:`connectionMade` copies its options."""

    def connectionMade(self) -> None:
        """Take each Autobahn option not set on this protocol from the factory, as
        Autobahn would, then connect."""
        factory = self.factory  # type: ignore[attr-defined]
        for name in _autobahn_options(type(self)):
            if not hasattr(self, name):
                setattr(self, name, getattr(factory, name))
        super().connectionMade()  # type: ignore[misc]

    def dataReceived(self, data: bytes) -> None:
        """Autobahn's, without building the arguments of a debug line for each read."""
        self._dataReceived(data)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure) -> None:
        """Autobahn's (a TLS failure logged as an error), without its debug lines."""
        if _is_tls_error(reason.value):
            self.log.error(_maybe_tls_reason(reason.value))
        self._connectionLost(reason)  # type: ignore[attr-defined]

    def send(self, message: dict[str, Any]) -> bool:
        """Send ``message`` if the connection is open; whether it was sent."""
        if self.state != self.STATE_OPEN:  # type: ignore[attr-defined]
            return False
        self.sendMessage(encode(message), isBinary=False)  # type: ignore[attr-defined]
        return True

    def close(self, code: int, reason: str) -> None:
        """Close with ``code`` (a plain ``int`` for Autobahn) and ``reason`` (cut to fit)."""
        if self.state == self.STATE_OPEN:  # type: ignore[attr-defined]
            self.sendClose(int(code), close_reason(reason))  # type: ignore[attr-defined]

    def violation(self, text: str) -> None:
        """The peer broke the protocol: log it, say so and close with :attr:`violation_code`."""
        self.log_violation(text)
        self.send(self.violation_message(text))
        self.handling = False  # handle nothing more from this connection
        self.close(self.violation_code, "protocol violation")

    def receive(self, payload: bytes, is_binary: bool,
                parse: Callable[[bytes], dict[str, Any]],
                errors: type[Exception]) -> dict[str, Any] | None:
        """For ``onMessage``: the message ``parse`` reads from a received frame, or None
        when messages are no longer handled or after a :meth:`violation` (a binary frame,
        or ``parse`` raising one of ``errors``)."""
        if not self.handling:
            return None
        if is_binary:
            self.violation("binary frames are not part of the protocol")
            return None
        try:
            return parse(payload)
        except errors as e:
            self.violation(str(e))
            return None

    def violation_message(self, text: str) -> dict[str, Any]:
        """The protocol's ``protocol_error`` message about ``text``."""
        raise NotImplementedError

    def log_violation(self, text: str) -> None:
        """Report a violation by the peer (a subclass logs it where its role logs)."""
        self.log.warn("protocol violation by the peer: {text}", text=text)


@cache
def _autobahn_options(cls: type) -> tuple[str, ...]:
    """The options Autobahn's protocol class below :class:`JsonSession` in ``cls``'s MRO
    copies from its factory (its ``CONFIG_ATTRS``)."""
    for base in cls.__mro__[cls.__mro__.index(JsonSession) + 1:]:
        if "CONFIG_ATTRS" in vars(base):
            return tuple(vars(base)["CONFIG_ATTRS"])
    return ()
