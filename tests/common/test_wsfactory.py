"""``treadmill.common.wsfactory``: Autobahn factories whose connections' timers (auto-ping,
pong timeout, handshake timeouts) run on the factory's reactor, never early and at most
one resolution (50 ms) late, not on txaio's batched timer (which rounds every deadline
down to the whole second)."""

from __future__ import annotations

from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketClientProtocol, WebSocketServerProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.test.iosim import FakeTransport, IOPump, connect

from treadmill.common.wsfactory import PreciseClientFactory, PreciseServerFactory, PreciseTimer


def test_a_call_runs_at_its_delay_with_its_arguments() -> None:
    clock, calls = Clock(), []
    timer = PreciseTimer(clock)
    timer.call_later(0.3, lambda *a, **k: calls.append((clock.seconds(), a, k)), 1, x=2)
    timer.call_later(2.5, lambda: calls.append((clock.seconds(), (), {})))
    clock.advance(0.29)
    assert calls == []  # txaio's batched timer ran both at once (int(now + delay) == 0)
    until(clock, 0.3)
    assert calls == [(0.3, (1,), {"x": 2})]
    until(clock, 2.49)
    assert len(calls) == 1  # not at 2 s: the deadline is not rounded down
    until(clock, 2.5)
    assert calls[1] == (2.5, (), {})


def test_cancel_is_idempotent_before_and_after_the_call_ran() -> None:
    clock, calls = Clock(), []
    timer = PreciseTimer(clock)
    cancelled = timer.call_later(1.0, calls.append, "cancelled")
    cancelled.cancel()
    cancelled.cancel()
    ran = timer.call_later(1.0, calls.append, "ran")
    clock.advance(1.0)
    ran.cancel()  # Autobahn may cancel a timeout that already fired
    ran.cancel()
    assert calls == ["ran"] and clock.getDelayedCalls() == []


def test_a_deadline_is_rounded_up_to_the_resolution_never_down() -> None:
    clock, calls = Clock(), []
    timer = PreciseTimer(clock, resolution=0.05)
    timer.call_later(0.32, lambda: calls.append(clock.seconds()))
    until(clock, 0.349)
    assert calls == []  # never early
    until(clock, 0.35)
    assert calls == [0.35]  # at most one resolution late
    until(clock, 1.1)
    timer.call_later(0.2, lambda: calls.append(clock.seconds()))  # 1.1 + 0.2: 1.3, not 1.35
    until(clock, 1.3)
    assert calls == [0.35, 1.3]


def test_calls_due_in_one_step_share_a_delayed_call_and_run_in_order() -> None:
    clock, calls = Clock(), []
    timer = PreciseTimer(clock, resolution=0.05)
    for n in range(50):
        timer.call_later(0.301 + n / 1000, calls.append, n)
    timer.call_later(0.36, calls.append, "next step")
    assert len(clock.getDelayedCalls()) == 2
    until(clock, 0.35)
    assert calls == list(range(50))


def test_a_call_may_cancel_a_later_one_of_its_step_and_a_failure_stops_none() -> None:
    clock, calls = Clock(), []
    timer = PreciseTimer(clock)
    victim = None

    def first() -> None:
        assert victim is not None
        victim.cancel()
        raise RuntimeError("boom")

    timer.call_later(1.0, first)
    victim = timer.call_later(1.0, calls.append, "cancelled")
    timer.call_later(1.0, calls.append, "ran")
    with capturedLogs() as events:
        until(clock, 1.0)
    assert calls == ["ran"]
    assert [e["log_failure"].type for e in events if "log_failure" in e] == [RuntimeError]


@pytest.mark.parametrize("make", [lambda clock: PreciseClientFactory("ws://h/", reactor=clock),
                                  lambda clock: PreciseServerFactory(reactor=clock)])
def test_the_factories_time_on_the_reactor_passed_in(make: Any) -> None:
    clock = Clock()
    factory = make(clock)
    assert factory.reactor is clock
    assert isinstance(factory._batched_timer, PreciseTimer)
    assert factory._batched_timer.reactor is clock


def test_the_reactor_is_required() -> None:
    with pytest.raises(TypeError):
        PreciseServerFactory()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        PreciseClientFactory("ws://h/")  # type: ignore[call-arg]


class Counting:
    """Records when a protocol receives pings (``pings``) and closes (``closed``);
    answers pings unless ``silent``."""

    silent = False
    closed: float | None = None

    def onOpen(self) -> None:
        self.pings: list[float] = []

    def onPing(self, payload: bytes) -> None:
        self.pings.append(self.factory.reactor.seconds())  # type: ignore[attr-defined]
        if not self.silent:
            self.sendPong(payload)  # type: ignore[attr-defined]

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = self.factory.reactor.seconds()  # type: ignore[attr-defined]


class Server(Counting, WebSocketServerProtocol):
    pass


class Client(Counting, WebSocketClientProtocol):
    pass


def pair(clock: Clock, pinging: str, **options: Any) -> tuple[Any, Any, IOPump]:
    """Our server and client factories' protocols joined in memory on ``clock``, the
    ``pinging`` one ("server" or "client") with ``options``; open."""
    server_factory = PreciseServerFactory(reactor=clock)
    server_factory.protocol = Server
    client_factory = PreciseClientFactory("ws://127.0.0.1:9/", reactor=clock)
    client_factory.protocol = Client
    (server_factory if pinging == "server" else client_factory).setProtocolOptions(**options)
    address = IPv4Address("TCP", "127.0.0.1", 9)
    server = server_factory.buildProtocol(address)
    client = client_factory.buildProtocol(address)
    pump = connect(server, FakeTransport(server, isServer=True),
                   client, FakeTransport(client, isServer=False), greet=False, clock=clock)
    pump.flush()
    assert server.state == server.STATE_OPEN and client.state == client.STATE_OPEN
    return server, client, pump


def until(clock: Clock, when: float) -> None:
    """Move ``clock`` to ``when`` (an absolute time, so no sum of steps drifts)."""
    clock.advance(when - clock.seconds())


def run(clock: Clock, pump: IOPump, until_time: float) -> None:
    """Let time pass on ``clock`` up to ``until_time``, from one delayed call to the
    next (each at its own deadline), moving the bytes after each."""
    pump.flush()
    while True:
        due = [call.getTime() for call in clock.getDelayedCalls()]
        if not due or min(due) > until_time:
            until(clock, until_time)
            pump.flush()
            return
        until(clock, min(due))
        pump.flush()


@pytest.mark.parametrize("pinging", ["server", "client"])
def test_a_sub_second_ping_interval_pings_at_that_interval(pinging: str) -> None:
    """A 0.3 s auto-ping sends one ping every 0.3 s (each answered at once here): 10 in
    3.1 s, not one each time its pong comes back (txaio: thousands a second)."""
    clock = Clock()
    server, client, pump = pair(clock, pinging, autoPingInterval=0.3, autoPingTimeout=2.0)
    pinged = client if pinging == "server" else server
    run(clock, pump, 3.1)
    assert pinged.pings == pytest.approx([0.3 * n for n in range(1, 11)])


@pytest.mark.parametrize("pinging", ["server", "client"])
def test_a_pong_timeout_drops_a_silent_peer_at_its_deadline(pinging: str) -> None:
    """A 2.5 s pong timeout drops a peer that does not answer 2.5 s after the ping (txaio:
    at the whole second before, 3 s here)."""
    clock = Clock()
    server, client, pump = pair(clock, pinging, autoPingInterval=1.0, autoPingTimeout=2.5)
    pinger, pinged = (server, client) if pinging == "server" else (client, server)
    pinged.silent = True
    run(clock, pump, 3.49)
    assert pinged.pings == [1.0] and pinger.closed is None  # unanswered
    run(clock, pump, 4.0)
    assert pinger.closed == 3.5


@pytest.mark.parametrize("side", ["server", "client"])
def test_an_opening_handshake_timeout_comes_at_its_deadline(side: str) -> None:
    """A peer that never completes the opening handshake is dropped after
    ``openHandshakeTimeout`` (1.5 s), not at the whole second before it."""
    clock = Clock()
    factory: Any
    if side == "server":
        factory = PreciseServerFactory(reactor=clock)
        factory.protocol = Server
    else:
        factory = PreciseClientFactory("ws://127.0.0.1:9/", reactor=clock)
        factory.protocol = Client
    factory.setProtocolOptions(openHandshakeTimeout=1.5)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9))
    transport = FakeTransport(proto, isServer=side == "server")
    proto.makeConnection(transport)
    until(clock, 1.49)
    assert not transport.disconnecting
    until(clock, 1.5)
    assert transport.disconnecting
