"""Relaying between two plain TCP legs inside the kernel, with ``splice(2)``.

:class:`treadmill.common.splice.StreamEnd` hands two joined plain TCP (or
UNIX) legs to a :class:`KernelRelay` once one of them has carried
``ZEROCOPY_AFTER`` bytes, when it can: the relay takes both sockets off their
Twisted transports and moves each direction's bytes socket → pipe → socket
with ``os.splice``, so they never enter this process (what HAProxy does). A
direction reads only while its pipe is empty, so a slow reader stops the
writer as the transports' producers would, and at most one pipe (64 KiB, 512
KiB once the direction has moved 1 MiB) per direction is in flight. Pipes are
made when a direction first has bytes.

An end of file is passed on as a half-close (``shutdown(SHUT_WR)`` of the
other socket), and the other direction goes on. Everything else goes back to
the transports (:meth:`KernelRelay.hand_back`): both directions ended, an
error on either socket, or any call on a leg from Python (``send_eof``,
``peer_lost``, ``abort``, ``register``, ``resume``; ``send`` writes to the
socket directly when it can). Bytes still in a pipe are then read out and
written to their transport, reading resumes, and the legs carry on as any
other; an end of file or an error is seen again by the transport, which
passes it on or closes.

The legs need: an ``os.splice`` (Linux), transports that are
``twisted.internet.tcp.Connection`` without TLS (``eager.plain``: TLS bytes must be
decrypted, also on a connection that started TLS itself, a ``ssl:`` listener's),
connected, with nothing buffered that cannot be written at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import Any

from twisted.logger import Logger

from treadmill.common.eager import buffered, plain

__all__ = ["AVAILABLE", "KernelRelay", "eligible"]

AVAILABLE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")
CHUNK = 64 * 1024  # a new pipe's capacity, what one splice(2) moves at first
BULK = 1024 * 1024  # a direction that has moved this much gets a pipe of BULK_PIPE
BULK_PIPE = 512 * 1024  # (fewer system calls per byte; refused over the user's pipe quota)
ROUNDS = 8  # chunks one readiness event moves before other connections get a turn
_FLAGS = (os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE) if AVAILABLE else 0
_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, errno.ESHUTDOWN,
         errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH)


def eligible(end: Any) -> bool:
    """Whether a leg (a ``splice.StreamEnd``) can be relayed in the kernel."""
    t = getattr(end, "transport", None)
    return (AVAILABLE and plain(t) and t.connected
            and not t.disconnecting and not getattr(t, "_writeDisconnecting", False)
            and not end.lost and end.relay is None
            and not getattr(end, "_early", None) and not getattr(end, "_read_closed", False)
            and not getattr(end, "_write_closed", False))


class _Direction:
    """Bytes from ``src`` to ``dst`` through a pipe."""

    __slots__ = ("blocked", "chunk", "dst", "eof", "moved", "pending", "read_fd", "src",
                 "write_fd")

    def __init__(self, src: Any, dst: Any):
        self.src = src  # the End read
        self.dst = dst  # the End written
        self.read_fd = -1
        self.write_fd = -1
        self.pending = 0  # bytes in the pipe
        self.blocked = False  # waiting for the destination to drain
        self.chunk = CHUNK  # the pipe's capacity
        self.moved = 0  # bytes so far
        self.eof = False  # the source ended; the destination's write side is shut

    def grow(self) -> None:
        """A bulk transfer: a larger pipe, if the system grants it."""
        try:
            self.chunk = fcntl.fcntl(self.write_fd, _SETPIPE_SZ, BULK_PIPE)
        except OSError:
            self.chunk = BULK_PIPE + 1  # refused: stay as it is, and do not ask again

    def close_pipe(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                os.close(fd)
        self.read_fd = self.write_fd = -1


class _Socket:
    """One leg's socket as the reactor sees it while the relay holds it."""

    __slots__ = ("end", "fd", "incoming", "outgoing", "relay")

    def __init__(self, relay: KernelRelay, end: Any):
        self.relay = relay
        self.end = end
        self.fd = end.transport.fileno()
        self.outgoing: _Direction | None = None  # read from this socket
        self.incoming: _Direction | None = None  # written to this socket

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "KernelRelay"

    def doRead(self) -> None:
        assert self.outgoing is not None
        self.relay.pump(self.outgoing)

    def doWrite(self) -> None:
        assert self.incoming is not None
        self.relay.pump(self.incoming)

    def connectionLost(self, reason: Any) -> None:
        self.relay.lost(self, reason)


class KernelRelay:
    """Both directions of two legs, relayed with ``splice(2)`` (module docstring)."""

    log = Logger()
    started = 0  # relays started in this process (tests, the manhole)
    moved = 0  # bytes they moved

    def __init__(self, a: Any, b: Any):
        self.reactor = a.transport.reactor
        self.ends = (a, b)
        self.sockets = (_Socket(self, a), _Socket(self, b))
        sa, sb = self.sockets
        ab, ba = _Direction(a, b), _Direction(b, a)
        sa.outgoing = sb.incoming = ab
        sb.outgoing = sa.incoming = ba
        self.directions = (ab, ba)
        self._by_end = {id(a): sa, id(b): sb}
        self.active = False

    @classmethod
    def start(cls, a: Any, b: Any) -> KernelRelay | None:
        """Take two joined legs over; None (nothing changed) if they cannot be. Called
        from a leg's ``dataReceived``, after it has passed its bytes on."""
        if not (eligible(a) and eligible(b)):
            return None
        for end in (a, b):
            if buffered(end.transport):
                # What the other leg has just passed on (or a header written before the
                # join): written now, or the legs stay as they are for now.
                if end.transport.doWrite() or buffered(end.transport):
                    return None
        relay = cls(a, b)
        for end in (a, b):
            end.transport.stopReading()
            end.transport.stopWriting()
            end.relay = relay
        relay.active = True
        cls.started += 1
        for sock in relay.sockets:
            relay.reactor.addReader(sock)
        return relay

    # -- moving bytes ---------------------------------------------------------------------

    def _socket_of(self, end: Any) -> _Socket:
        return self._by_end[id(end)]

    def pump(self, d: _Direction) -> None:
        """Move what ``d``'s source has, as far as its destination takes it."""
        if not self.active:
            return
        src, dst = self._socket_of(d.src), self._socket_of(d.dst)
        for _ in range(ROUNDS):
            if d.pending and not self._drain(d, src, dst):
                return  # the destination is full (or gone)
            if d.read_fd < 0:
                d.read_fd, d.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            elif d.chunk < BULK_PIPE and d.moved >= BULK:
                d.grow()
            try:
                moved = os.splice(src.fd, d.write_fd, d.chunk, flags=_FLAGS)
            except BlockingIOError:
                return  # nothing more to read now
            except OSError as e:
                self._failed(e)
                return
            if moved == 0:
                self._end_of_file(d, src)
                return
            d.pending = moved
            d.moved += moved
            KernelRelay.moved += moved
            d.src.received += moved
        # Out of turns: pass on what was read last (the source may have nothing more to
        # say, and no readiness event would come for it).
        if d.pending:
            self._drain(d, src, dst)

    def _drain(self, d: _Direction, src: _Socket, dst: _Socket) -> bool:
        """Write ``d``'s pipe to its destination; whether it is empty now."""
        try:
            d.pending -= os.splice(d.read_fd, dst.fd, d.pending, flags=_FLAGS)
        except BlockingIOError:
            pass
        except OSError as e:
            self._failed(e)
            return False
        if d.pending:
            self._wait_for_writable(src, dst)
            return False
        if d.blocked:
            d.blocked = False
            self.reactor.removeWriter(dst)
            self.reactor.addReader(src)
        return True

    def _end_of_file(self, d: _Direction, src: _Socket) -> None:
        """``d``'s source ended: pass it on as a half-close; once both directions have
        ended, the transports close the legs (they read the end of file again)."""
        d.eof = True
        self.reactor.removeReader(src)
        d.close_pipe()
        try:
            d.dst.transport.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if all(x.eof for x in self.directions):
            self.hand_back()

    def _wait_for_writable(self, src: _Socket, dst: _Socket) -> None:
        """The destination is full: stop reading the source until it drains."""
        d = src.outgoing
        assert d is not None
        if not d.blocked:
            d.blocked = True
            self.reactor.removeReader(src)
            self.reactor.addWriter(dst)

    def _failed(self, error: OSError) -> None:
        if error.errno not in _GONE:
            self.log.warn("splice failed: {error}; relaying in the process", error=error)
        self.hand_back()

    # -- giving the legs back ---------------------------------------------------------------

    def _release(self) -> list[tuple[Any, bytes]]:
        """Stop relaying; what each pipe still held, with the leg it is for."""
        self.active = False
        for sock in self.sockets:
            self.reactor.removeReader(sock)
            self.reactor.removeWriter(sock)
        left = []
        for d in self.directions:
            chunks = []
            while d.pending > 0:
                try:
                    data = os.read(d.read_fd, d.pending)
                except OSError:
                    break
                if not data:
                    break
                chunks.append(data)
                d.pending -= len(data)
            d.pending = 0
            d.close_pipe()
            if chunks:
                left.append((d.dst, b"".join(chunks)))
        for end in self.ends:
            end.relay = None
        return left

    def hand_back(self) -> None:
        """Give both legs back to their transports, reading again (module docstring)."""
        if not self.active:
            return
        left = self._release()
        for end in self.ends:
            t = end.transport
            if not end.lost and t.connected and not t.disconnecting:
                t.startReading()
        self._write_left(left)  # after: a full buffer pauses the other leg's reading

    @staticmethod
    def _write_left(left: list[tuple[Any, bytes]]) -> None:
        for end, data in left:
            if not end.lost and end.transport.connected:
                end.transport.write(data)

    def lost(self, sock: _Socket, reason: Any) -> None:
        """The reactor found ``sock``'s connection lost (a hang-up, or the reactor is
        stopping): its transport is lost as Twisted would have it; the other leg flushes
        what it was sent, then closes (``StreamEnd.connectionLost``)."""
        if self.active:
            self._write_left(self._release())
        t = sock.end.transport
        if t.connected:
            t.connectionLost(reason)

    def send(self, end: Any, data: bytes) -> None:
        """Write ``data`` to ``end``: straight to its socket if nothing of the relay waits
        for it and the socket takes it all at once, else through its transport once the
        legs are handed back."""
        sock = self._socket_of(end)
        d = sock.incoming
        if self.active and d is not None and d.pending == 0:
            try:
                sent = os.write(sock.fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.hand_back()
        end.transport.write(data)
