"""The supervisor's dial-back pool (``treadmill.supervisor.dialpool``) on a ``Clock``, its
connections on ``StringTransport``: it keeps ``size`` open, refills what is used or lost,
backs off when the proxy closes them idle, and reads the proxy's join line."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from treadmill.common.splice import StreamEnd, join
from treadmill.protocol import proxy as messages
from treadmill.supervisor.dialpool import REFILL_WAIT, DialPool, PooledEnd

HEADER = messages.pool_header("job-1", "tok")


class Proxy:
    """The other end of every dial: connects each :class:`PooledEnd` over a
    ``StringTransport`` (or refuses while ``refuse`` is set)."""

    def __init__(self) -> None:
        self.ends: list[PooledEnd] = []
        self.refuse = False
        self.joined: list[tuple[PooledEnd, str]] = []

    def dial(self, end: PooledEnd) -> Deferred[Any]:
        if self.refuse:
            return fail(Failure(ConnectionRefusedError()))
        end.makeConnection(StringTransport())
        self.ends.append(end)
        return succeed(end)

    def on_join(self, end: PooledEnd, service: str) -> None:
        self.joined.append((end, service))

    def close(self, end: PooledEnd) -> None:
        """The proxy closes ``end`` (refused, or its pool closed)."""
        end.connectionLost(Failure(ConnectionRefusedError()))


def make(size: int = 3) -> tuple[DialPool, Proxy, Clock]:
    clock = Clock()
    proxy = Proxy()
    pool = DialPool(clock, proxy.dial, lambda: HEADER, proxy.on_join,
                    backoff=backoffPolicy(0.5, 4.0, factor=2, jitter=lambda: 0.0))
    pool.resize(size)
    return pool, proxy, clock


def test_it_opens_size_connections_each_sending_the_pool_header() -> None:
    pool, proxy, _ = make(3)
    assert len(pool.idle) == 3 and pool.opening == 0
    for end in proxy.ends:
        assert end.transport.value() == HEADER
        assert end.transport.producerState == "producing"  # it reads: the join line


def test_a_join_hands_the_client_over_and_refills() -> None:
    pool, proxy, _ = make(2)
    first = proxy.ends[0]
    first.dataReceived(messages.join_line("ssh") + b"SSH-2.0-client\r\n")
    assert proxy.joined == [(first, "ssh")]
    assert first not in pool.idle and len(pool.idle) == 2 and len(proxy.ends) == 3
    assert first.transport.producerState == "paused"  # until join() resumes it
    assert first._early == [b"SSH-2.0-client\r\n"]  # the client's first bytes, kept
    assert pool.counts["joined"] == 1
    first.dataReceived(b"more")  # after the join line: the client's bytes
    assert first._early[-1] == b"more"


def joined(outcome: str = "connected", first: bytes = b"") -> tuple[
        DialPool, Proxy, Clock, PooledEnd, StreamEnd]:
    """A pool of 2 whose first connection a client of ``ssh`` took (``first``: the
    client's bytes that came with the join line), its local dial ended as ``outcome``,
    and, if connected, spliced to the local leg."""
    pool, proxy, clock = make(2)
    dialled: Deferred[Any] = Deferred()
    pool.on_join = lambda end, service: dialled
    end = proxy.ends[0]
    end.dataReceived(messages.join_line("ssh") + first)
    assert len(proxy.ends) == 2 and len(pool.idle) == 1 and pool.opening == 0
    local = StreamEnd()
    local.makeConnection(StringTransport())
    if outcome == "connected":
        join(local, end)
        dialled.callback(None)
    else:
        dialled.errback(Failure(ConnectionRefusedError()))
        dialled.addErrback(lambda _: None)
    return pool, proxy, clock, end, local


def refilled(pool: DialPool, proxy: Proxy) -> bool:
    return len(proxy.ends) == 3 and len(pool.idle) == 2


def test_the_refill_waits_for_the_services_answer() -> None:
    """The refill's dial stays off the path of the client's first exchange: nothing is
    opened before the local dial is done and the service's answer went on."""
    pool, proxy, _, end, local = joined(first=b"GET")
    end.dataReceived(b" / HTTP/1.0\r\n\r\n")  # the client's bytes, relayed
    assert local.transport.value() == b"GET / HTTP/1.0\r\n\r\n"
    assert not refilled(pool, proxy)
    local.dataReceived(b"HTTP/1.0 200 OK\r\n")  # the answer, on its way to the proxy
    assert end.transport.value().endswith(b"HTTP/1.0 200 OK\r\n")
    assert refilled(pool, proxy)
    local.dataReceived(b"more")
    assert len(proxy.ends) == 3  # once


def test_a_service_that_speaks_first_refills_when_its_bytes_go_on() -> None:
    pool, proxy, _, end, local = joined()
    local.dataReceived(b"SSH-2.0-server\r\n")
    assert end.transport.value().endswith(b"SSH-2.0-server\r\n")
    assert refilled(pool, proxy)


def test_a_failed_local_dial_refills_at_once() -> None:
    pool, proxy, _, _, _ = joined("failed")
    assert refilled(pool, proxy)


def test_a_silent_connection_refills_after_the_wait() -> None:
    pool, proxy, clock, _, _ = joined()
    clock.advance(REFILL_WAIT * 0.9)
    assert not refilled(pool, proxy)
    clock.advance(REFILL_WAIT * 0.2)
    assert refilled(pool, proxy)


def test_a_used_connection_closed_before_any_byte_refills_at_once() -> None:
    pool, proxy, clock, end, _ = joined()
    end.connectionLost(Failure(ConnectionRefusedError()))
    assert refilled(pool, proxy) and pool.failures == 0
    assert not clock.getDelayedCalls()


def test_stopping_forgets_the_refills_still_waiting() -> None:
    pool, proxy, clock, end, _ = joined()
    pool.stop()
    assert not clock.getDelayedCalls()
    end.dataReceived(b"late")
    clock.advance(1)
    assert len(proxy.ends) == 2 and not pool.idle


def test_the_join_line_may_come_in_pieces() -> None:
    _pool, proxy, _ = make(1)
    end = proxy.ends[0]
    line = messages.join_line("console")
    end.dataReceived(line[:5])
    assert proxy.joined == []
    end.dataReceived(line[5:])
    assert proxy.joined == [(end, "console")]


def test_anything_but_a_join_line_closes_the_connection() -> None:
    pool, proxy, _clock = make(2)
    bad, long = proxy.ends
    bad.dataReceived(b"TREADMILL-JOIN/1 -nope\n")
    long.dataReceived(b"x" * (messages.MAX_JOIN_BYTES + 1))
    assert bad.transport.disconnecting and long.transport.disconnecting
    assert proxy.joined == [] and pool.counts["bad_join"] == 2


def test_connections_the_proxy_closes_idle_back_off_until_one_is_kept() -> None:
    pool, proxy, clock = make(2)
    for end in list(proxy.ends):
        proxy.close(end)  # refused: the proxy's bound, say
    assert pool.failures == 2 and len(pool.idle) == 0 and len(proxy.ends) == 2
    assert pool.delay() == 1.0  # 0.5 s doubling
    clock.advance(1.0)
    assert len(proxy.ends) == 3  # one probe, not a flood
    proxy.close(proxy.ends[-1])
    clock.advance(pool.delay())
    assert len(proxy.ends) == 4 and pool.failures == 3
    clock.advance(pool.delay())  # the probe was kept: the pool fills at once
    assert pool.failures == 0 and len(pool.idle) == 2 and len(proxy.ends) == 5


def test_the_backoff_is_capped_and_a_failed_dial_counts_too() -> None:
    pool, proxy, clock = make(0)
    proxy.refuse = True
    pool.resize(1)
    assert pool.counts["failed"] == 1 and pool.opening == 0
    for _ in range(10):
        clock.advance(pool.delay())
    assert pool.delay() == 4.0  # the backoff's most
    proxy.refuse = False
    clock.advance(4.0)
    clock.advance(4.0)
    assert len(pool.idle) == 1 and pool.failures == 0


def test_a_join_resets_the_backoff() -> None:
    pool, proxy, _clock = make(2)
    proxy.close(proxy.ends[0])
    assert pool.failures == 1 and pool._timer is not None
    proxy.ends[1].dataReceived(messages.join_line("ssh"))
    assert pool.failures == 0 and pool._timer is None
    assert len(pool.idle) == 2  # refilled at once


def test_resizing_to_zero_closes_the_idle_ones_without_counting_a_failure() -> None:
    pool, proxy, clock = make(3)
    pool.resize(1)
    closed = [end for end in proxy.ends if end.transport.disconnecting]
    assert len(closed) == 2 and len(pool.idle) == 1
    for end in closed:
        end.connectionLost(Failure(ConnectionRefusedError()))
    pool.stop()
    assert len(pool.idle) == 0 and all(e.transport.disconnecting for e in proxy.ends)
    for end in proxy.ends[:1]:
        end.connectionLost(Failure(ConnectionRefusedError()))
    assert pool.failures == 0 and pool.counts["closed_idle"] == 0
    clock.advance(60)
    assert len(proxy.ends) == 3  # nothing reopened


def test_a_connection_that_opens_after_a_stop_is_closed() -> None:
    clock = Clock()
    waiting: list[tuple[PooledEnd, Deferred[Any]]] = []

    def dial(end: PooledEnd) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        waiting.append((end, d))
        return d

    pool = DialPool(clock, dial, lambda: HEADER, lambda end, service: None)
    pool.resize(1)
    assert pool.opening == 1
    pool.stop()
    end, d = waiting[0]
    end.makeConnection(StringTransport())
    d.callback(end)
    assert end.transport.disconnecting and pool.idle == set() and pool.opening == 0
