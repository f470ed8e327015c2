"""Two plain TCP legs joined by ``splice.join`` are relayed in the kernel (``splice(2)``):
bytes arrive intact both ways with half-closes, a slow reader stops the writer, and
anything asked of a leg from Python gives both back to their transports without losing
a byte. Real sockets on loopback, one relay in this process."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory

from tests.proxy.support import (
    EchoClient,
    Transfer,
    TransferService,
    expected_digest,
    tcp_transfer,
)
from tests.proxy.support import echo as echo  # the fixture
from tests.util.waiting import eventually, sleep
from treadmill.common import zerocopy
from treadmill.common.splice import ZEROCOPY_AFTER, Splice, StreamEnd, join
from treadmill.common.zerocopy import AVAILABLE, KernelRelay

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="no os.splice on this system")
MiB = 1024 * 1024
BULK = ZEROCOPY_AFTER + 4096


@dataclass
class Relay:
    """A port whose connections are joined to connections to ``target``."""

    port: int
    listener: Any
    splices: list[Splice] = field(default_factory=list)


async def _relay(target: int) -> Relay:
    relay = Relay(0, None)

    class Accepted(StreamEnd):
        def connectionMade(self) -> None:
            super().connectionMade()
            outgoing = StreamEnd()
            d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", target), outgoing)
            d.addCallback(lambda _: relay.splices.append(join(self, outgoing)))

    factory = Factory.forProtocol(Accepted)
    factory.noisy = False
    relay.listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
    relay.port = relay.listener.getHost().port
    return relay


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("pause_every", [0, 4 * MiB])
async def test_bytes_cross_in_the_kernel_intact_both_ways(pause_every: int) -> None:
    size = 48 * MiB
    service = TransferService(lambda: Transfer(size, seed=6, pause_every=pause_every,
                                               pause_for=0.2))
    relay = await _relay(service.listen())
    started, moved = KernelRelay.started, KernelRelay.moved
    try:
        client = await tcp_transfer(relay.port, Transfer(size, seed=5, pause_every=pause_every,
                                                         pause_for=0.2))
        served = await service.outcomes[0]
        assert client.received == served.sent == expected_digest(size, 6)
        assert served.received == client.sent == expected_digest(size, 5)
        assert client.received_bytes == served.received_bytes == size
        # In the kernel: the relay started, moved (nearly) every byte, counted them.
        assert KernelRelay.started == started + 1
        assert KernelRelay.moved - moved >= 2 * size - 2 * MiB
        splice = relay.splices[0]
        assert splice.transferred == 2 * size
        await eventually(lambda: splice.a.lost and splice.b.lost)
    finally:
        relay.listener.stopListening()
        await service.stop()


@pytest_twisted.ensureDeferred
async def test_a_reader_that_stops_stops_the_writer() -> None:
    """The client reads nothing: the service's writes back up through the relay (a
    direction reads only while its pipe is empty), far short of what it has to send."""
    size = 512 * MiB
    service = TransferService(lambda: Transfer(size, seed=8))
    relay = await _relay(service.listen())
    reader = Transfer(0, seed=7, half_close=False)
    try:
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port), reader)
        reader.transport.pauseProducing()
        await eventually(lambda: relay.splices and relay.splices[0].a.relay is not None)
        await sleep(1.0)
        splice = relay.splices[0]
        held = splice.b.received
        await sleep(0.5)
        # Stalled: only the kernel's socket buffers and one pipe hold what was sent.
        assert splice.b.received == held < 64 * MiB
        reader.transport.resumeProducing()
        await eventually(lambda: reader.count >= 2 * held, timeout=20)
    finally:
        for splice in relay.splices:
            splice.abort()
        relay.listener.stopListening()
        await service.stop()


@pytest_twisted.ensureDeferred
async def test_python_gets_the_legs_back_without_losing_a_byte(echo: int) -> None:
    relay = await _relay(echo)
    client = EchoClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port), client)
    try:
        await eventually(lambda: relay.splices)
        splice = relay.splices[0]
        # A few bytes (an interactive session) stay in the process; a bulk transfer
        # moves to the kernel.
        client.transport.write(b"x" * 1000)
        assert await client.wait_for(1000, timeout=10) == b"x" * 1000
        assert splice.a.relay is None
        client.transport.write(b"x" * (BULK - 1000))
        assert await client.wait_for(BULK, timeout=10) == b"x" * BULK
        kernel = splice.a.relay
        assert kernel is not None and splice.b.relay is kernel
        # A write from Python goes straight to the socket; the relay stays.
        splice.a.send(b"from python")
        assert (await client.wait_for(BULK + 11, timeout=5))[BULK:] == b"from python"
        assert splice.a.relay is kernel
        # Handing back (what any other call on a leg does first): the transports relay
        # from then on.
        kernel.hand_back()
        assert splice.a.relay is None and splice.b.relay is None and not kernel.active
        client.transport.write(b"after")
        assert (await client.wait_for(BULK + 16, timeout=5))[BULK + 11:] == b"after"
    finally:
        client.transport.loseConnection()
        await client.lost
        await eventually(lambda: splice.a.lost and splice.b.lost)
        relay.listener.stopListening()


@pytest_twisted.ensureDeferred
async def test_closing_a_relayed_splice_closes_both_legs(echo: int) -> None:
    relay = await _relay(echo)
    client = EchoClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port), client)
    await eventually(lambda: relay.splices)
    splice = relay.splices[0]
    client.transport.write(b"p" * BULK)
    await client.wait_for(BULK, timeout=10)
    assert splice.a.relay is not None
    splice.close()  # what the proxy's idle timeout and a closed tunnel do
    await client.lost
    await eventually(lambda: splice.a.lost and splice.b.lost)
    relay.listener.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_last_bytes_of_a_burst_are_not_left_in_a_pipe(echo: int,
                                                                monkeypatch: Any) -> None:
    """A readiness event moves a few chunks, then lets other connections have a turn;
    what it read last still goes out, though the source says nothing more (an upload
    whose sender now waits for an answer)."""
    monkeypatch.setattr(zerocopy, "ROUNDS", 1)
    relay = await _relay(echo)
    client = EchoClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port), client)
    try:
        total = 0
        for size in (BULK, 1, 70_000, 3):
            client.transport.write(b"z" * size)
            total += size
            assert len(await client.wait_for(total, timeout=5)) == total
        assert relay.splices[0].a.relay is not None
    finally:
        client.transport.loseConnection()
        await client.lost
        relay.listener.stopListening()


@pytest_twisted.ensureDeferred
async def test_many_transfers_through_two_relays_in_a_row_arrive_whole() -> None:
    """Two relays in a row (the proxy and the supervisor), many connections at once of
    mixed sizes around the kernel's threshold, some with slow readers: every byte
    arrives, both ways, and every leg closes."""
    rng = random.Random(15)
    sizes = [rng.choice((0, 1, ZEROCOPY_AFTER - 1, ZEROCOPY_AFTER + 1, 3 * MiB))
             + rng.randrange(0, 70_000) for _ in range(24)]
    made = iter(range(len(sizes)))

    def served() -> Transfer:
        i = next(made)
        return Transfer(sizes[-1 - i], seed=1000 + i, pause_every=MiB if i % 3 == 0 else 0,
                        pause_for=0.05)

    service = TransferService(served)
    inner = await _relay(service.listen())
    outer = await _relay(inner.port)
    started = KernelRelay.started
    try:
        clients = []
        for i, size in enumerate(sizes):
            clients.append(tcp_transfer(outer.port, Transfer(
                size, seed=i, pause_every=MiB if i % 4 == 0 else 0, pause_for=0.05)))
        outcomes = await gatherResults([Deferred.fromCoroutine(c) for c in clients])
        sent = {o.sent: o for o in await gatherResults(service.outcomes)}
        for i, client in enumerate(outcomes):
            assert client.sent == expected_digest(sizes[i], i)
            assert client.sent in {o.received for o in sent.values()}
            assert client.received in sent, i  # what some service connection sent
        bulk = sum(1 for size in sizes if size > ZEROCOPY_AFTER)
        assert KernelRelay.started - started >= bulk  # in the kernel, in both relays
        splices = inner.splices + outer.splices
        await eventually(lambda: all(s.a.lost and s.b.lost for s in splices))
    finally:
        inner.listener.stopListening()
        outer.listener.stopListening()
        await service.stop()
