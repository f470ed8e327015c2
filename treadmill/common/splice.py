"""Splicing two connections together, with backpressure on both legs.

The model is ``twisted.protocols.portforward``: each leg's transport registers
the other leg's transport as its (streaming) producer, so when one side's
write buffer fills up the other side stops reading, and the kernel's socket
buffers push back on the sender. Nothing is queued in this process beyond a
transport's write buffer (about 64 KiB per direction), however fast one side
writes and however slowly the other reads.

Two kinds of legs share one small interface (:class:`End`):

- :class:`StreamEnd`, a TCP or TLS connection. End of file is passed on as a
  half-close (``shutdown(SHUT_WR)`` on the other leg) when both are plain TCP,
  so ``nc``-style "send everything, then read the answer" works; over TLS an
  end of file closes the other leg once it has flushed.
- :class:`WebSocketEnd`, a mixin for an Autobahn protocol whose binary
  messages carry the bytes. Its "producer" is the transport under the
  WebSocket, so a full data leg stops the proxy reading frames, and a full
  WebSocket transport pauses the data leg. Closing the WebSocket closes the
  other leg (after it has flushed). With the ``treadmill.tunnel.v1``
  subprotocol an end of file travels as a text message ``eof`` (a
  half-close); without it, the other leg's end of file closes the WebSocket
  with 1000.

Two plain TCP legs that have carried :data:`ZEROCOPY_AFTER` bytes one way (a
bulk transfer, not an interactive session, where it would only add system
calls) are relayed inside the kernel from then on (``splice(2)``,
:mod:`treadmill.common.zerocopy`): their bytes no longer enter the process.
Any call on such a leg from Python hands both back to their transports first.

A plain TCP leg writes what the other leg read, and passes an end of file on, at once
(:mod:`treadmill.common.eager`) when it has nothing buffered, instead of a turn of the
reactor later: a relay's first exchange costs fewer wake-ups on every hop.

Differences from ``portforward``: a leg's producer is unregistered before the
leg is closed (a paused producer would otherwise keep a closing transport
open forever), and legs are paused until :func:`join` so that bytes that
arrive early stay in the kernel.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IStreamClientEndpoint,
    IWriteDescriptor,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from treadmill.common.eager import shut_write_now, write_now
from treadmill.common.zerocopy import KernelRelay

__all__ = ["EOF", "MAX_FRAME", "TUNNEL_SUBPROTOCOL", "UNSUPPORTED_DATA", "ZEROCOPY_AFTER",
           "DirectTCPEndpoint", "End", "Splice", "StreamEnd", "WebSocketEnd", "client_endpoint",
           "direct_endpoint", "join", "keep_alive", "no_delay"]

MAX_FRAME = 64 * 1024  # the largest binary message a WebSocket leg sends
ZEROCOPY_AFTER = 256 * 1024
"""Bytes a plain TCP leg reads before both legs are relayed in the kernel (and again
between tries when they could not be: the other leg's buffer did not drain at once)."""
TUNNEL_SUBPROTOCOL = "treadmill.tunnel.v1"
EOF = b"eof"  # a text message: its sender will send no more bytes (half-close)
UNSUPPORTED_DATA = 4003
"""The close code for a text message other than ``eof``, or bytes after ``eof`` (1003
shifted into the private range: Autobahn lets an application send only 1000 and
3000-4999)."""


class End:
    """What a splice needs of a leg. Both kinds below implement it."""

    other: End | None = None
    splice: Splice | None = None
    received = 0  # bytes read from this leg
    lost = False

    def send(self, data: bytes) -> None:
        """Write bytes that the other leg read."""
        raise NotImplementedError

    def send_eof(self) -> None:
        """The other leg will send nothing more."""
        raise NotImplementedError

    def peer_lost(self) -> None:
        """The other leg is gone: flush what is buffered, then close."""
        raise NotImplementedError

    def abort(self) -> None:
        """Close now, dropping what is buffered."""
        raise NotImplementedError

    def producer(self) -> Any:
        """What to pause when the other leg cannot keep up (this leg's reading)."""
        raise NotImplementedError

    def register(self, producer: Any) -> None:
        """Pause ``producer`` while this leg's write buffer is full."""
        raise NotImplementedError

    def resume(self) -> None:
        """Start (or continue) reading this leg."""
        raise NotImplementedError

    def _leg_closed(self, gone: Callable[[], None] | None = None) -> None:
        """This leg's connection is closed (once): tell the other leg, call ``gone``,
        then tell the splice."""
        if self.lost:
            return
        self.lost = True
        other, self.other = self.other, None
        if other is not None:
            other.peer_lost()
        if gone is not None:
            gone()
        if self.splice is not None:
            self.splice._end_lost()


class Splice:
    """Two joined legs. ``on_closed(splice)`` is called once both are gone."""

    __slots__ = ("a", "b", "info", "on_closed", "quiet_since", "snapshot")

    def __init__(self, a: End, b: End, on_closed: Callable[[Splice], None] | None = None,
                 info: Any = None):
        self.a = a
        self.b = b
        self.on_closed = on_closed
        self.info = info
        self.snapshot = -1
        self.quiet_since = 0.0

    @property
    def transferred(self) -> int:
        """Bytes read from both legs so far."""
        return self.a.received + self.b.received

    def close(self) -> None:
        """Close both legs, flushing what each has buffered."""
        for end in (self.a, self.b):
            if not end.lost:
                end.peer_lost()

    def abort(self) -> None:
        """Close both legs now."""
        for end in (self.a, self.b):
            if not end.lost:
                end.abort()

    def _end_lost(self) -> None:
        if self.a.lost and self.b.lost and self.on_closed is not None:
            on_closed, self.on_closed = self.on_closed, None
            on_closed(self)


def join(a: End, b: End, on_closed: Callable[[Splice], None] | None = None,
         info: Any = None) -> Splice:
    """Splice two connected legs; returns the :class:`Splice`.

    If one of them is already gone, the other is closed (after flushing).
    """
    splice = Splice(a, b, on_closed, info)
    a.splice = b.splice = splice
    if a.lost or b.lost:
        for end in (a, b):
            if not end.lost:
                end.peer_lost()
        splice._end_lost()
        return splice
    a.other, b.other = b, a
    a.register(b.producer())
    b.register(a.producer())
    a.resume()
    b.resume()
    return splice


@implementer(IHalfCloseableProtocol)
class StreamEnd(Protocol, End):
    """A TCP or TLS leg. It reads nothing until it is joined.

    Subclasses may override :meth:`connectionMade` (call this one) and use
    :meth:`gone` for what to do once the connection is lost.
    """

    log = Logger()

    def __init__(self) -> None:
        self.other: End | None = None
        self.splice: Splice | None = None
        self.received = 0
        self.lost = False
        self._read_closed = False
        self._write_closed = False
        self._early: list[bytes] = []
        self.relay: KernelRelay | None = None  # relaying in the kernel (zerocopy.py)
        self._kernel_after = ZEROCOPY_AFTER  # received bytes before trying that

    def connectionMade(self) -> None:
        self.transport.pauseProducing()

    def _take_back(self) -> None:
        """Relaying in the kernel: give both legs back to their transports."""
        if self.relay is not None:
            self.relay.hand_back()

    # -- reading ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        other = self.other
        if other is not None:
            other.send(data)
            if self.received >= self._kernel_after and self.relay is None:
                self._kernel_after = self.received + ZEROCOPY_AFTER
                if isinstance(other, StreamEnd):
                    KernelRelay.start(self, other)
        elif self.splice is None:
            # Read before the join (TLS may deliver a record it already had): keep it.
            self._early.append(data)

    def readConnectionLost(self) -> None:
        self._read_closed = True
        if self.other is not None:
            self.other.send_eof()
        elif self.splice is None:
            self.transport.loseConnection()  # not joined (yet): nothing to relay it to
            return
        self._maybe_close()

    def writeConnectionLost(self) -> None:
        self._write_closed = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._read_closed and self._write_closed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self._leg_closed(lambda: self.gone(reason))

    def gone(self, reason: Any) -> None:
        """The connection is closed (joined or not)."""

    # -- End -------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.send(self, data)
            return
        write_now(self.transport, data)

    def send_eof(self) -> None:
        if self.lost:
            return
        self._take_back()
        self.transport.unregisterProducer()  # the other leg reads no more
        if IHalfCloseableDescriptor.providedBy(self.transport):
            shut_write_now(self.transport)
        else:
            self.transport.loseConnection()  # TLS: no half-close; the other leg follows

    def peer_lost(self) -> None:
        self.other = None
        if not self.lost:
            self._take_back()
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def abort(self) -> None:
        self.other = None
        if not self.lost:
            self._take_back()
            self.transport.unregisterProducer()
            self.transport.abortConnection()

    def producer(self) -> Any:
        return self.transport

    def register(self, producer: Any) -> None:
        self._take_back()
        self.transport.registerProducer(producer, True)

    def resume(self) -> None:
        self._take_back()
        early, self._early = self._early, []
        for data in early:
            if self.other is not None:
                self.other.send(data)
        self.transport.resumeProducing()


class WebSocketEnd(End):
    """Mixin for an Autobahn protocol (server or client) that is one leg of a splice.

    Call :meth:`end_opened` from ``onOpen`` and :meth:`end_closed` from
    ``onClose``. Binary messages carry the bytes. When both sides speak the
    ``treadmill.tunnel.v1`` subprotocol (set :attr:`half_close`), a text
    message ``eof`` says that its sender will send no more bytes, and the
    WebSocket closes with 1000 once both sides said so; without it an end of
    file closes the WebSocket. Other text messages are refused (close
    :data:`UNSUPPORTED_DATA`, 4003) unless the protocol takes them before this mixin
    (a console's token renewals, ``proxy.legs.TunnelSocket``).
    The protocol's ``maxMessagePayloadSize`` bounds what one message may hold.
    """

    other: End | None = None
    splice: Splice | None = None
    received = 0
    lost = False
    half_close = False
    _eof_sent = False
    _eof_received = False
    # Autobahn turns Nagle off in connectionMade, but reads this before it copies the
    # factory's options: without it a client leg kept Nagle on, and ssh's short writes
    # through ``tml job ssh --proxy-command`` waited for delayed acks (10x slower scp).
    tcpNoDelay = True
    # From the Autobahn protocol it is mixed into: transport, state, STATE_OPEN,
    # sendMessage, sendClose (not declared here: they must not shadow Autobahn's).

    def end_opened(self) -> None:
        """The WebSocket is open: hold its bytes until joined."""
        self._early: list[bytes | None] = []  # None: an end of file
        self.transport.pauseProducing()

    def end_message(self, payload: bytes, is_binary: bool) -> None:
        if not is_binary:
            if self.half_close and payload == EOF and not self._eof_received:
                self._eof_received = True
                if self.other is not None:
                    self.other.send_eof()
                elif self.splice is None:
                    self._early.append(None)
                self._maybe_close()
                return
            self.sendClose(UNSUPPORTED_DATA, "binary messages only")
            return
        if self._eof_received:
            self.sendClose(UNSUPPORTED_DATA, "data after eof")
            return
        self.received += len(payload)
        other = self.other
        if other is not None:
            other.send(payload)
        elif self.splice is None:
            self._early.append(payload)  # frames read with the handshake, before the join

    def end_closed(self) -> None:
        self._leg_closed()

    def send(self, data: bytes) -> None:
        if self.state != self.STATE_OPEN or self._eof_sent:
            return
        if len(data) <= MAX_FRAME:
            self.sendMessage(data, isBinary=True)
            return
        view = memoryview(data)
        for start in range(0, len(data), MAX_FRAME):
            self.sendMessage(bytes(view[start:start + MAX_FRAME]), isBinary=True)

    def send_eof(self) -> None:
        if self.lost or self._eof_sent:
            return
        if not self.half_close:
            # No half-close: close the WebSocket; the other leg follows when it is closed.
            self._unregister()
            self._eof_sent = True
            if self.state == self.STATE_OPEN:
                self.sendClose(1000)
            return
        if self.lost or self._eof_sent:
            return
        self._unregister()  # the other leg reads no more
        self._eof_sent = True
        if self.state == self.STATE_OPEN:
            self.sendMessage(EOF, isBinary=False)
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._eof_sent and self._eof_received and self.state == self.STATE_OPEN:
            self.sendClose(1000)

    def peer_lost(self) -> None:
        self.other = None
        if not self.lost:
            self._unregister()
            if self.state == self.STATE_OPEN:
                self.sendClose(1000)
            elif self.transport is not None:
                self.transport.loseConnection()

    def abort(self) -> None:
        self.other = None
        if not self.lost:
            self._unregister()
            if self.transport is not None:
                self.transport.abortConnection()

    def producer(self) -> Any:
        return self.transport

    def register(self, producer: Any) -> None:
        try:
            self.transport.registerProducer(producer, True)
        except RuntimeError:
            # A server WebSocket: the HTTP channel it began as is still registered with
            # the transport (WebSocketResource took the transport over without telling it).
            self.transport.unregisterProducer()
            self.transport.registerProducer(producer, True)

    def _unregister(self) -> None:
        if self.transport is not None:
            self.transport.unregisterProducer()

    def resume(self) -> None:
        early, self._early = getattr(self, "_early", []), []
        for data in early:
            if self.other is None:
                break
            if data is None:
                self.other.send_eof()
            else:
                self.other.send(data)
        self.transport.resumeProducing()


def client_endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """A client endpoint; IP literals skip name resolution (it costs a thread hop)."""
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


_UNDER_WAY = (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK)
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)  # Linux


@implementer(IStreamClientEndpoint)
class DirectTCPEndpoint:
    """A TCP client endpoint to an IP literal that skips the reactor's turn when it can.

    Twisted's connector starts a non-blocking ``connect``, registers the socket for
    reading and writing, and finishes on the reactor's next turn; to a loopback
    address (a job's local service, a proxy on the same host) the handshake is done
    inside that ``connect`` already. This endpoint asks at once (a second ``connect``
    says 0 when it is) and hands the connected socket to the reactor
    (``adoptStreamConnection``): the protocol is connected before :meth:`connect`
    returns. Otherwise it waits for the socket to be writable, as the connector
    would, for at most ``timeout`` seconds. The transport is the reactor's own TCP
    connection (``tcp.Server``, as for an adopted socket).
    """

    def __init__(self, reactor: Any, host: str, port: int, timeout: float):
        self.reactor = reactor
        self.family = socket.AF_INET6 if isIPv6Address(host) else socket.AF_INET
        self.address = (host, port)
        self.timeout = timeout

    def connect(self, factory: Factory) -> Deferred[Any]:
        # Non-blocking from its creation (no ioctl of its own).
        sock = socket.socket(self.family, socket.SOCK_STREAM | _NONBLOCK)
        if not _NONBLOCK:
            sock.setblocking(False)
        code = sock.connect_ex(self.address)
        if code in _UNDER_WAY:
            code = sock.connect_ex(self.address)  # 0 once connected, else still under way
        if code == 0:
            return self._adopt(sock, factory)
        if code in _UNDER_WAY:
            return _Connecting(self, sock, factory).deferred
        sock.close()
        return fail(error.getConnectError((code, os.strerror(code))))

    def _adopt(self, sock: socket.socket, factory: Factory) -> Deferred[Any]:
        try:
            transport = self.reactor.adoptStreamConnection(sock.fileno(), self.family, factory)
        except Exception:
            return fail()
        finally:
            sock.close()  # the reactor holds its own descriptor of the socket
        if transport is None:
            return fail(error.NoProtocol())
        return succeed(transport.protocol)


@implementer(IWriteDescriptor)
class _Connecting:
    """A ``connect`` still under way: the socket waits to be writable (or the timeout)."""

    def __init__(self, endpoint: DirectTCPEndpoint, sock: socket.socket, factory: Factory):
        self.endpoint = endpoint
        self.sock: socket.socket | None = sock
        self.factory = factory
        self.deferred: Deferred[Any] = Deferred(lambda _: self._end(error.ConnectingCancelledError(
            endpoint.address)))
        endpoint.reactor.addWriter(self)
        self.timer = endpoint.reactor.callLater(endpoint.timeout, self._end,
                                                error.TimeoutError())

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def logPrefix(self) -> str:
        return "DirectTCPEndpoint"

    def doWrite(self) -> None:
        sock = self.sock
        if sock is None:
            return
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._end(error.getConnectError((code, os.strerror(code))))
            return
        self._stop()
        self.sock = None
        self.endpoint._adopt(sock, self.factory).chainDeferred(self.deferred)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped the socket (an error, or its shutdown)."""
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if self.sock else 0
        self._end(error.getConnectError((code, os.strerror(code))) if code
                  else error.ConnectionLost())

    def _stop(self) -> None:
        if self.sock is not None:
            self.endpoint.reactor.removeWriter(self)
        if self.timer.active():
            self.timer.cancel()

    def _end(self, reason: Exception) -> None:
        """Give up: close the socket and fail."""
        sock = self.sock
        if sock is None:
            return
        self._stop()
        self.sock = None
        sock.close()
        if not self.deferred.called:
            self.deferred.errback(Failure(reason))


def direct_endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """A :class:`DirectTCPEndpoint` for an IP literal on a reactor of real sockets (not a
    test's ``MemoryReactor``), else :func:`client_endpoint`'s."""
    if (isIPAddress(host) or isIPv6Address(host)) and isinstance(reactor, PosixReactorBase):
        return DirectTCPEndpoint(reactor, host, port, timeout)
    return client_endpoint(reactor, host, port, timeout)


def keep_alive(transport: Any, idle: int = 60, interval: int = 10, count: int = 3) -> None:
    """TCP keepalive on ``transport`` (if it is a TCP one): a probe after ``idle`` seconds
    of silence, then every ``interval``, the connection dropped after ``count`` unanswered.
    For connections that wait long in silence (pooled data connections): the probes keep
    NAT and firewall state alive and find a dead peer before a client is joined to it."""
    handle = getattr(transport, "getHandle", None)
    sock = handle() if handle is not None else None
    if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                              ("TCP_KEEPCNT", count)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except OSError:
        pass


def no_delay(transport: Any) -> None:
    """Turn Nagle's algorithm off on ``transport`` if it is a TCP one (small writes of an
    interactive session go out at once)."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass
