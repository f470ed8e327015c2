"""The floor for a two-relay path in Python: ``tools/bench/proxy.py --paths …,floor``.

Two processes stand where the proxy and the supervisor do (client → hop 1 → a pooled
connection → hop 2 → service), written directly on ``select.epoll`` with no framework,
no tokens, no limits, no logging: what Python costs at least per connection on this
machine, to compare Treadmill's path and HAProxy's with. Hop 2 keeps ``POOL``
connections open to hop 1's data port (each sends a header line); hop 1 joins each
client to one (writing a join line on it; a client that finds none waits for the next),
and hop 2 then dials the service and relays. Bytes are relayed with ``recv``/``send``
(a direction stops reading while the other socket's buffer is full), end of file as a
half-close::

    python floorrelay.py hop1 PUBLIC_PORT DATA_PORT
    python floorrelay.py hop2 DATA_PORT SERVICE_PORT POOL
"""

from __future__ import annotations

import select
import socket
import sys
from collections import deque
from collections.abc import Callable

POOL_HEADER = b"POOL job token\n"
JOIN = b"JOIN service\n"
IN, OUT = select.EPOLLIN, select.EPOLLOUT
Handler = Callable[[int], None]


class Loop:
    """An epoll loop: a handler per file descriptor."""

    def __init__(self) -> None:
        self.poller = select.epoll()
        self.handlers: dict[int, Handler] = {}

    def watch(self, sock: socket.socket, events: int, handler: Handler) -> None:
        fd = sock.fileno()
        if fd in self.handlers:
            self.poller.modify(fd, events)
        else:
            self.poller.register(fd, events)
        self.handlers[fd] = handler

    def forget(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self.handlers.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def run(self) -> None:
        handlers = self.handlers
        while True:
            for fd, events in self.poller.poll(-1, 1024):
                handler = handlers.get(fd)
                if handler is not None:
                    handler(events)


class Pair:
    """Two connected sockets relayed both ways until both directions ended."""

    def __init__(self, loop: Loop, a: socket.socket, b: socket.socket, early: bytes = b""):
        self.loop = loop
        self.socks = (a, b)
        self.pending = [b"", early]  # bytes waiting to be written to socks[i]
        self.eof = [False, False]  # socks[i] has ended (read an end of file)
        self.events = [-1, -1]  # what the loop watches socks[i] for
        self.closed = False
        for i in (0, 1):
            self._update(i)

    def _update(self, i: int) -> None:
        if self.closed:
            return
        other = 1 - i
        events = 0
        if not self.eof[i] and not self.pending[other]:
            events |= IN
        if self.pending[i]:
            events |= OUT
        if events == self.events[i]:
            return
        self.events[i] = events
        sock = self.socks[i]
        if events:
            self.loop.watch(sock, events, lambda ev, i=i: self._ready(i, ev))
        else:
            self.loop.forget(sock)

    def _ready(self, i: int, events: int) -> None:
        if events & OUT:
            self._flush(i)
        if events & (IN | select.EPOLLHUP | select.EPOLLERR) and not self.closed:
            self._read(i)

    def _read(self, i: int) -> None:
        other = 1 - i
        try:
            data = self.socks[i].recv(262144)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not data:
            self.eof[i] = True
            try:
                self.socks[other].shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if all(self.eof):
                self.close()
                return
            self._update(i)
            return
        self.pending[other] = data
        self._flush(other)
        self._update(i)

    def _flush(self, i: int) -> None:
        data = self.pending[i]
        if data:
            try:
                sent = self.socks[i].send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return
            self.pending[i] = data[sent:]
        self._update(i)
        self._update(1 - i)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for sock in self.socks:
                self.loop.forget(sock)
                sock.close()


def listener(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def accepted(sock: socket.socket) -> list[socket.socket]:
    """Every connection waiting on a listener (many per wake-up)."""
    out = []
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return out
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out.append(conn)


def hop1(public_port: int, data_port: int) -> None:
    loop = Loop()
    idle: list[socket.socket] = []
    waiting: deque[socket.socket] = deque()
    public, data = listener(public_port), listener(data_port)

    def join(client: socket.socket, pooled: socket.socket) -> None:
        loop.forget(pooled)
        pooled.send(JOIN)
        Pair(loop, client, pooled)

    def on_public(_: int) -> None:
        for client in accepted(public):
            if idle:
                join(client, idle.pop())
            else:
                waiting.append(client)

    def on_data(_: int) -> None:
        for conn in accepted(data):
            loop.watch(conn, IN, lambda ev, conn=conn: on_header(conn))

    def on_header(conn: socket.socket) -> None:
        try:
            header = conn.recv(256)
        except BlockingIOError:
            return
        if conn in idle:  # an idle pooled connection ended (or spoke): drop it
            idle.remove(conn)
            header = b""
        if header != POOL_HEADER:
            loop.forget(conn)
            conn.close()
            return
        if waiting:
            join(waiting.popleft(), conn)
        else:
            idle.append(conn)

    loop.watch(public, IN, on_public)
    loop.watch(data, IN, on_data)
    print("ready", flush=True)
    loop.run()


def hop2(data_port: int, service_port: int, size: int) -> None:
    loop = Loop()
    opened = [0]  # pooled connections open or opening, not yet joined

    def fill() -> None:
        while opened[0] < size:
            open_pooled()

    def open_pooled() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect_ex(("127.0.0.1", data_port))
        opened[0] += 1
        loop.watch(sock, OUT, lambda ev: connected(sock))

    def connected(sock: socket.socket) -> None:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            lost(sock)
            return
        sock.send(POOL_HEADER)
        loop.watch(sock, IN, lambda ev: joined(sock))

    def lost(sock: socket.socket) -> None:
        loop.forget(sock)
        sock.close()
        opened[0] -= 1
        fill()

    def joined(sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        if not data.startswith(JOIN):
            lost(sock)
            return
        loop.forget(sock)
        opened[0] -= 1
        local = socket.socket()
        local.setblocking(False)
        local.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local.connect_ex(("127.0.0.1", service_port))

        def local_up(_: int) -> None:
            loop.forget(local)
            if local.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                local.close()
                sock.close()
            else:
                Pair(loop, sock, local, data[len(JOIN):])
            fill()

        loop.watch(local, OUT, local_up)

    fill()
    print("ready", flush=True)
    loop.run()


if __name__ == "__main__":
    if sys.argv[1] == "hop1":
        hop1(int(sys.argv[2]), int(sys.argv[3]))
    else:
        hop2(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
