"""Sending a stream to a reader: a byte range, or everything live until it closes.

A :class:`Pump` is a push producer between a stream and a sink (an HTTP
response or a WebSocket). It reads the file one chunk at a time in a reader
thread and writes each chunk to the sink; when the sink's transport buffer is
full the transport pauses the pump, which then stops reading until it is
resumed. A following pump that has caught up waits for the store to tell it
about new bytes (no polling): the bytes of an append that starts exactly where
the pump is are written straight from memory, so a follower sees them as soon
as they are durable. A pump that is paused or behind reads them from the file
later instead, so a slow reader costs no memory.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from zope.interface import implementer

from treadmill.common.wsfactory import PreciseServerFactory
from treadmill.common.wsjson import BoundFactory, QuietLogger, close_reason
from treadmill.logserver.streams import Stream, StreamStore
from treadmill.protocol.logs import FOLLOW_CLOSE_CODES, FOLLOW_SUBPROTOCOL

__all__ = ["CHUNK", "FollowFactory", "FollowProtocol", "Pump", "RequestSink"]

CHUNK = 64 * 1024


class Sink:
    """Where a pump sends bytes."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Every byte was sent (a range's end, or a closed stream's)."""
        raise NotImplementedError

    def abort(self, reason: str, message: str) -> None:
        """The stream ended early: ``reason`` is ``deleted`` (by retention), ``error``
        (it could not be read) or ``shutdown`` (the server stops)."""
        raise NotImplementedError


@implementer(IPushProducer)
@dataclass(eq=False)
class Pump:
    """Sends ``stream`` from ``offset`` to ``sink``: up to ``end``, or live if ``follow``."""

    log = Logger()

    store: StreamStore
    stream: Stream
    position: int
    sink: Sink
    _: KW_ONLY
    end: int | None = None
    follow: bool = False
    chunk: int = CHUNK
    sent: int = field(default=0, init=False)
    done: Deferred[None] = field(init=False)
    _paused: bool = field(default=False, init=False)
    _reading: bool = field(default=False, init=False)
    _stopped: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.done = Deferred(lambda _: self.stopProducing())

    def start(self) -> Deferred[None]:
        """Begin sending; ``done`` fires when the pump stopped, for whatever reason."""
        if self.follow:
            self.store.watch(self.stream, self)
        self._kick()
        return self.done

    # -- IPushProducer -------------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._kick()

    def stopProducing(self) -> None:
        """The reader went away: stop, quietly."""
        self._stop()

    # -- the store's notifications (Follower) ------------------------------------------

    def appended(self, stream: Stream, old_length: int, data: bytes) -> None:
        if self._stopped or self._paused or self._reading:
            return
        if self.position == old_length and (self.end is None or
                                            old_length + len(data) <= self.end):
            self.position += len(data)
            self._write(data)
        self._kick()

    def ended(self, stream: Stream) -> None:
        self._kick()

    def shutdown(self) -> None:
        """The server stops: end the response or the WebSocket now."""
        self._finish(("shutdown", "the log server is shutting down"))

    # -- the loop ----------------------------------------------------------------------

    def _limit(self) -> int:
        length = self.stream.length
        return length if self.end is None else min(self.end, length)

    def _kick(self) -> None:
        if self._stopped or self._paused or self._reading:
            return
        if self.stream.deleted:
            self._finish(("deleted", "the stream was deleted"))
            return
        limit = self._limit()
        if self.position < limit:
            self._reading = True
            size = min(self.chunk, limit - self.position)
            self.store.read(self.stream, self.position, size).addCallbacks(
                self._got, self._read_failed)
            return
        if not self.follow or (self.stream.closed and self.position >= self.stream.length):
            self._finish()

    def _got(self, data: bytes) -> None:
        self._reading = False
        if self._stopped:
            return
        if not data:
            self._finish(("error", "the stream could not be read"))
            return
        self.position += len(data)
        self._write(data)
        self._kick()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        if self._stopped:
            return
        if not self.stream.deleted:
            self.log.error("Cannot read {job}/{stream}: {error}", job=self.stream.job.id,
                           stream=self.stream.name, error=failure.getErrorMessage())
        self._finish(("deleted", "the stream was deleted") if self.stream.deleted
                     else ("error", "the stream could not be read"))

    def _write(self, data: bytes) -> None:
        self.sent += len(data)
        self.sink.write(data)

    def _finish(self, error: tuple[str, str] | None = None) -> None:
        if self._stopped:
            return
        self._stop()
        if error is None:
            self.sink.finish()
        else:
            self.sink.abort(*error)
        if not self.done.called:
            self.done.callback(None)

    def _stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.follow:
            self.store.unwatch(self.stream, self)


class RequestSink(Sink):
    """An HTTP response body: a range, or a chunked live stream (``?follow=1``)."""

    def __init__(self, request: IRequest):
        self.request = request
        self.lost = False

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.request.write(data)

    def finish(self) -> None:
        if not self.lost:
            self.request.unregisterProducer()

    def abort(self, reason: str, message: str) -> None:
        # The status line is gone; cutting the connection is the only way to say the
        # body is incomplete (a chunked response then lacks its last chunk). Abort,
        # not lose: losing would flush the final chunk written by finish().
        if not self.lost:
            self.request.unregisterProducer()
            self.lost = True
            transport = getattr(self.request, "transport", None)
            if transport is not None:
                transport.abortConnection()


def serve(request: IRequest, pump: Pump) -> Deferred[None]:
    """Stream ``pump`` into ``request``; the Deferred fires when the body is complete.

    Klein finishes the request when it fires, and cancels it (stopping the
    pump) when the client goes away.
    """
    sink = pump.sink
    assert isinstance(sink, RequestSink)
    request.registerProducer(pump, True)

    def lost(failure: Failure) -> None:
        sink.lost = True
        pump.stopProducing()

    request.notifyFinish().addErrback(lost)
    done = pump.start()

    def cancelled(failure: Failure) -> None:
        failure.trap(CancelledError)

    return done.addErrback(cancelled)


class FollowProtocol(WebSocketServerProtocol):
    """A WebSocket follower: binary messages of the stream's new bytes.

    The server closes with 1000 once the stream is closed and every byte was
    sent; otherwise with one of :data:`FOLLOW_CLOSE_CODES`. Messages from the client
    are ignored.
    """

    log = QuietLogger(namespace="treadmill.logserver.follow.ws")
    factory: FollowFactory
    target: tuple[StreamStore, str, str, int] | None = None
    pump: Pump | None = None

    def onConnect(self, request: ConnectionRequest) -> str | None:
        return FOLLOW_SUBPROTOCOL if FOLLOW_SUBPROTOCOL in request.protocols else None

    def onOpen(self) -> None:
        if self.target is None:
            self.sendClose(FOLLOW_CLOSE_CODES["error"], "no stream")
            return
        store, job_id, name, offset = self.target
        pump = Pump(store, store.stream(job_id, name), offset, _SocketSink(self), follow=True)
        self.pump = pump
        self.factory.followers += 1
        try:
            self.registerProducer(pump, True)
        except RuntimeError:
            # The HTTP channel this connection began with is still registered with the
            # transport (WebSocketResource took the transport over without telling it).
            self.transport.unregisterProducer()
            self.registerProducer(pump, True)
        pump.start()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        pass

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.pump is not None:
            self.pump.stopProducing()
            self.pump = None
            self.factory.followers -= 1


class _SocketSink(Sink):
    def __init__(self, protocol: FollowProtocol):
        self.protocol = protocol

    def write(self, data: bytes) -> None:
        # Autobahn's payload limit applies to what it sends too: one message per chunk.
        for start in range(0, len(data), CHUNK):
            self.protocol.sendMessage(data[start:start + CHUNK], isBinary=True)

    def finish(self) -> None:
        self.protocol.sendClose(1000, "end of stream")

    def abort(self, reason: str, message: str) -> None:
        code = FOLLOW_CLOSE_CODES.get(reason, FOLLOW_CLOSE_CODES["error"])
        self.protocol.sendClose(code, close_reason(message))


class FollowFactory(PreciseServerFactory):
    """Builds :class:`FollowProtocol`; :meth:`for_stream` binds one to a stream."""

    protocol = FollowProtocol

    def __init__(self, reactor: Any, ping_interval: float = 30.0, ping_timeout: float = 30.0):
        super().__init__(reactor=reactor)
        self.followers = 0
        # The closing handshake waits as long as a ping: Autobahn aborts the connection
        # when it times out (1 s by default), and an abort drops the bytes still in the
        # send buffer, which a slow follower has not read yet (the stream's tail).
        self.setProtocolOptions(autoPingInterval=ping_interval, autoPingTimeout=ping_timeout,
                                maxMessagePayloadSize=CHUNK, maxFramePayloadSize=CHUNK,
                                openHandshakeTimeout=10, closeHandshakeTimeout=ping_timeout)

    def for_stream(self, store: StreamStore, job_id: str, name: str, offset: int) -> Any:
        """A factory-like object whose protocol follows this stream."""
        return BoundFactory(self, target=(store, job_id, name, offset))
