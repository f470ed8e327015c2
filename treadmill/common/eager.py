"""Eager writes: bytes and half-closes put on a plain TCP socket at once.

A Twisted transport's ``write`` only buffers: the bytes go out when the reactor
next finds the socket writable, which costs a registration for writing, one more
turn of the event loop and an unregistration, for every write. A relay that
passes on a few bytes at a time (an interactive session, a connection's first
exchange) pays that on every hop. :func:`write_now` sends them from the caller
instead when the transport is plain TCP (not TLS: its bytes must be encrypted
first) and has nothing buffered, so that the order of bytes is kept; what the
socket does not take goes to the transport's buffer as before.
:func:`shut_write_now` does the same for ``loseWriteConnection`` (the half-close
of a relayed end of file): ``shutdown(SHUT_WR)`` at once when nothing is
buffered, then the protocol's ``writeConnectionLost``, as the transport would.

These read a few private attributes of ``twisted.internet.abstract.FileDescriptor``
(its two write buffers, its half-close state, whether its close shuts the socket
down first); ``tests/common/test_eager.py`` pins them on the installed Twisted.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["buffered", "plain", "shut_write_now", "write_now"]


def buffered(transport: Any) -> int:
    """Bytes a Twisted transport still has to write (its write buffers' internals)."""
    return (len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
            + getattr(transport, "_tempDataLen", 0))


def plain(transport: Any) -> bool:
    """Whether ``transport`` is a plain TCP (or UNIX) connection of the reactor's: its
    socket carries the bytes as they are (not TLS, even started on the connection)."""
    return isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False)


def _writable_now(transport: Any) -> bool:
    return (plain(transport) and transport.connected and not transport.disconnecting
            and not transport._writeDisconnecting and not transport._writeDisconnected
            and not buffered(transport))


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sending at once what the socket takes (module docstring)."""
    if data and _writable_now(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # full (EAGAIN), or broken: the transport finds out as it would
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def shut_write_now(transport: Any) -> None:
    """``transport.loseWriteConnection()``, shutting the socket's write side at once when
    nothing is buffered (module docstring)."""
    if not _writable_now(transport):
        transport.loseWriteConnection()
        return
    transport._writeDisconnecting = True
    transport._writeDisconnected = True
    transport.stopWriting()
    # The final close needs no shutdown(SHUT_RDWR) of its own any more: the write side
    # is shut here, and a read side is gone with the socket's close (one system call
    # less per leg).
    transport._shouldShutdown = False
    transport._closeWriteConnection()  # shutdown(SHUT_WR), then writeConnectionLost()
