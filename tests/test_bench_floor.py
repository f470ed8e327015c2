"""The bench's floor path (``tools/bench/floorrelay.py``) relays for real: its two hops as
their own processes in front of an echo service on loopback pass every byte both ways
with half-close, join clients through the pool, and serve a burst larger than the pool
(clients wait for the next pooled connection). Otherwise the floor it reports beside
HAProxy would not be a relay's."""

from __future__ import annotations

import hashlib
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.util.ports import free_port

pytestmark = pytest.mark.e2e
SCRIPT = Path(__file__).parents[1] / "tools" / "bench" / "floorrelay.py"


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)  # after the client's end of file


@pytest.fixture
def floor() -> Iterator[int]:
    """The floor's public port, in front of an echo service (a pool of 2)."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    public, data = free_port(), free_port()
    hops = []
    try:
        for argv in (["hop1", str(public), str(data)],
                     ["hop2", str(data), str(server.server_address[1]), "2"]):
            hop = subprocess.Popen([sys.executable, str(SCRIPT), *argv], stdout=subprocess.PIPE)
            hops.append(hop)
            assert hop.stdout is not None and hop.stdout.readline() == b"ready\n"
        yield public
    finally:
        for hop in hops:
            hop.kill()
            hop.wait()
        server.shutdown()
        server.server_close()


def echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def test_clients_one_after_another_through_the_pool(floor: int) -> None:
    for i in range(20):
        assert echo(floor, b"x%d" % i) == b"x%d" % i


def test_a_burst_larger_than_the_pool_waits_for_pooled_connections(floor: int) -> None:
    clients = [socket.create_connection(("127.0.0.1", floor), timeout=10) for _ in range(50)]
    try:
        for i, client in enumerate(clients):
            client.sendall(b"%03d" % i)
        for i, client in enumerate(clients):
            assert client.recv(3) == b"%03d" % i
    finally:
        for client in clients:
            client.close()


def test_bulk_bytes_cross_both_ways_intact_with_half_close(floor: int) -> None:
    block = hashlib.sha256(b"floor").digest() * (8 * 1024 * 1024 // 32)  # 8 MiB
    with socket.create_connection(("127.0.0.1", floor), timeout=20) as s:

        def send() -> None:
            s.sendall(block)
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        digest, size = hashlib.sha256(), 0
        while chunk := s.recv(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        sender.join()
    assert size == len(block)
    assert digest.digest() == hashlib.sha256(block).digest()
