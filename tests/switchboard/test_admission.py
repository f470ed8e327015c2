"""Admission control for supervisor link handshakes: the gate, its queue, the upgrade.

The gate's arithmetic and its FIFO queue on a ``Clock`` (in order, bounded, a wait
that runs out, a client that goes, a long queue drained without recursion, a
``Retry-After`` that grows with the queue), and
:class:`~treadmill.switchboard.links.SupervisorResource` holding an upgrade or
answering ``503`` with ``Retry-After``, before a protocol (and so any database work)
exists. Real handshakes against a real switchboard are in ``test_links_admission.py``.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from treadmill.switchboard.admission import (
    RETRY_AFTER,
    RETRY_AFTER_MAX,
    HandshakeGate,
    QueueTimeout,
    ReactorLag,
    Slot,
)
from treadmill.switchboard.links import (
    LinkPolicy,
    SupervisorResource,
    SupervisorSessionFactory,
)


def test_the_gate_admits_up_to_its_limit_and_counts() -> None:
    gate = HandshakeGate(2)
    first, second = gate.acquire(), gate.acquire()
    assert first is not None and second is not None
    assert gate.full and gate.in_progress == 2
    assert gate.acquire() is None and gate.refused == 1
    first.release()
    assert not gate.full and gate.in_progress == 1
    third = gate.acquire()
    assert third is not None and gate.admitted == 3 and gate.peak == 2


def test_a_slot_is_released_once_however_often_its_end_is_reported() -> None:
    """A handshake may end twice (its coroutine finishes after the connection closed):
    the second release must not free another handshake's slot."""
    gate = HandshakeGate(1)
    slot = gate.acquire()
    assert slot is not None and slot.held
    slot.release()
    slot.release()
    assert gate.in_progress == 0 and not slot.held
    again = gate.acquire()
    assert again is not None and gate.in_progress == 1
    slot.release()  # the old slot, late: nothing changes
    assert gate.in_progress == 1 and gate.full


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_below_one_is_refused(limit: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HandshakeGate(limit)


class Links:
    """What :class:`SupervisorSessionFactory` reads of the links (its options)."""

    policy = LinkPolicy()
    handshake_timeout = 10.0
    reactor = Clock()


def test_a_full_gate_refuses_the_upgrade_with_503_and_retry_after() -> None:
    gate = HandshakeGate(1)
    held = gate.acquire()
    assert held is not None
    factory = SupervisorSessionFactory(Links())  # type: ignore[arg-type]
    built: list[object] = []
    factory.buildProtocol = lambda addr: built.append(addr)  # type: ignore[method-assign]
    resource = SupervisorResource(factory, gate)
    request = DummyRequest([b"api", b"v1", b"supervisor"])
    request.requestHeaders.setRawHeaders(b"upgrade", [b"websocket"])
    request.requestHeaders.setRawHeaders(b"connection", [b"Upgrade"])
    body = resource.render(request)
    assert request.responseCode == 503
    assert request.responseHeaders.getRawHeaders(b"retry-after") == [str(RETRY_AFTER).encode()]
    error = json.loads(body)["error"]
    assert error["code"] == "unavailable" and "try again later" in error["message"]
    assert built == [] and gate.refused == 1 and gate.in_progress == 1


# -- the queue (on a Clock) ------------------------------------------------------------


def queued_gate(limit: int = 1, queue: int = 3, wait: float = 5.0) -> tuple[HandshakeGate,
                                                                              Clock]:
    clock = Clock()
    return HandshakeGate(limit, queue=queue, wait=wait, clock=clock), clock


def slot_of(waiting: Deferred[Slot] | None) -> Slot | None:
    """The slot ``waiting`` has fired with, or None while it waits."""
    assert waiting is not None
    got: list[Slot] = []
    waiting.addCallback(lambda slot: got.append(slot) or slot)
    return got[0] if got else None


def test_beyond_the_limit_upgrades_wait_and_get_their_slots_in_order() -> None:
    gate, _ = queued_gate(queue=3)
    first = slot_of(gate.enter())
    assert first is not None
    waiting = [gate.enter() for _ in range(3)]
    assert [slot_of(w) for w in waiting] == [None, None, None]
    assert gate.waiting == 3 and gate.queued == 3 and gate.refused == 0
    first.release()  # a handshake ends: the oldest waiter, and only it, has the slot
    second = slot_of(waiting[0])
    assert second is not None and slot_of(waiting[1]) is None and gate.in_progress == 1
    second.release()
    third = slot_of(waiting[1])
    assert third is not None and slot_of(waiting[2]) is None
    third.release()
    assert slot_of(waiting[2]) is not None and gate.waiting == 0 and gate.peak == 1


def test_a_full_queue_refuses_and_a_newcomer_never_jumps_it() -> None:
    gate, _ = queued_gate(queue=1)
    first = slot_of(gate.enter())
    waiter = gate.enter()
    assert gate.enter() is None and gate.refused == 1  # the queue is full
    assert gate.acquire() is None and gate.refused == 2  # nor around the queue
    assert first is not None
    first.release()
    assert slot_of(waiter) is not None


def test_a_wait_that_runs_out_fails_and_gives_its_place_to_the_next() -> None:
    gate, clock = queued_gate(queue=3, wait=5.0)
    first = slot_of(gate.enter())
    late = gate.enter()
    clock.advance(2.0)
    later = gate.enter()  # its own five seconds start now
    assert late is not None and later is not None
    failures: list[Failure] = []
    late.addErrback(failures.append)
    clock.advance(3.0)
    assert len(failures) == 1 and failures[0].check(QueueTimeout)
    assert gate.waiting == 1 and gate.timed_out == 1
    assert first is not None
    first.release()
    assert slot_of(later) is not None and not clock.getDelayedCalls()  # its timer stopped


def test_a_client_that_goes_while_waiting_frees_its_place() -> None:
    gate, clock = queued_gate(queue=2)
    first = slot_of(gate.enter())
    gone, next_ = gate.enter(), gate.enter()
    assert gone is not None and next_ is not None
    gone.addErrback(lambda f: f.trap(CancelledError))
    gone.cancel()
    assert gate.waiting == 1 and len(clock.getDelayedCalls()) == 1
    assert slot_of(gate.enter()) is None  # the place it left is taken again
    assert first is not None
    first.release()
    assert slot_of(next_) is not None and gate.in_progress == 1


def test_handshakes_ending_as_their_slots_arrive_drain_a_long_queue_without_recursion(
        ) -> None:
    """Bad tokens end a handshake inside the callback that admitted it: thousands in
    the queue must not nest one release inside another."""
    gate, _ = queued_gate(limit=1, queue=5000)
    first = slot_of(gate.enter())
    order: list[int] = []
    for i in range(5000):
        waiting = gate.enter()
        assert waiting is not None
        waiting.addCallback(lambda slot, i=i: (order.append(i), slot.release()))
    assert first is not None
    first.release()
    assert order == list(range(5000))
    assert gate.in_progress == 0 and gate.waiting == 0 and gate.admitted == 5001


def test_retry_after_grows_with_the_queue_at_the_rate_handshakes_end() -> None:
    gate, clock = queued_gate(limit=2, queue=1000, wait=30.0)
    slots = [slot_of(gate.enter()) for _ in range(2)]
    waiting = [gate.enter() for _ in range(600)]
    assert gate.retry_after() == RETRY_AFTER_MAX  # nothing ended yet: one a second
    for _ in range(100):  # 100 handshakes end within a second
        for slot in slots:
            assert slot is not None
            slot.release()
        slots = [slot_of(w) for w in waiting[:2]]
        waiting = waiting[2:]
        clock.advance(0.0049)
    assert gate.waiting == 400 and gate.retry_after() == 2  # 400 at ~200/s
    for _ in range(5):
        clock.advance(1.0)
    assert gate.retry_after() == RETRY_AFTER_MAX  # the rate is old news


def test_without_a_wait_or_a_clock_there_is_no_queue() -> None:
    assert HandshakeGate(1, queue=10, wait=0.0).queue_limit == 0
    with pytest.raises(ValueError, match="clock"):
        HandshakeGate(1, queue=10, wait=1.0)


def upgrade_request() -> DummyRequest:
    request = DummyRequest([b"api", b"v1", b"supervisor"])
    request.requestHeaders.setRawHeaders(b"upgrade", [b"websocket"])
    request.requestHeaders.setRawHeaders(b"connection", [b"Upgrade"])
    return request


def gated_resource(gate: HandshakeGate) -> tuple[SupervisorResource, list[object]]:
    factory = SupervisorSessionFactory(Links())  # type: ignore[arg-type]
    built: list[object] = []
    factory.buildProtocol = lambda addr: built.append(addr)  # type: ignore[method-assign]
    return SupervisorResource(factory, gate), built


def held_upgrade() -> tuple[HandshakeGate, Clock, Slot | None, SupervisorResource,
                            list[object], DummyRequest]:
    """A gate of one slot (taken) and one place in its queue, and an upgrade waiting
    there: (gate, clock, the taken slot, the resource, protocols built, the request)."""
    gate, clock = queued_gate(queue=1, wait=5.0)
    held = slot_of(gate.enter())
    resource, built = gated_resource(gate)
    request = upgrade_request()
    assert resource.render(request) is NOT_DONE_YET
    return gate, clock, held, resource, built, request


def test_an_upgrade_beyond_the_limit_is_held_then_refused_when_its_wait_runs_out() -> None:
    gate, clock, held, resource, built, request = held_upgrade()
    clock.advance(4.9)
    assert request.finished == 0 and request.written == []  # held, nothing answered
    queued_too_many = upgrade_request()
    body = resource.render(queued_too_many)  # the queue is full: refused at once
    assert queued_too_many.responseCode == 503 and b"try again later" in body
    clock.advance(0.1)
    assert request.finished == 1 and request.responseCode == 503
    assert request.responseHeaders.getRawHeaders(b"retry-after") == [b"1"]
    assert json.loads(b"".join(request.written))["error"]["code"] == "unavailable"
    assert built == [] and gate.refused == 2 and gate.timed_out == 1
    assert held is not None and held.held


def test_an_upgrade_whose_client_goes_while_held_leaves_the_queue() -> None:
    gate, clock, held, _, built, request = held_upgrade()
    request.processingFailed(Failure(ConnectionDone()))  # the client closed
    assert gate.waiting == 0 and not clock.getDelayedCalls()
    assert held is not None
    held.release()
    assert gate.in_progress == 0 and built == [] and request.written == []


# -- the reactor running late ------------------------------------------------------------


def test_the_reactor_lag_is_how_late_its_timer_comes_or_is_already() -> None:
    clock = Clock()
    lag = ReactorLag(clock, interval=0.05)
    assert lag.lag() == 0.0
    lag.tick()
    clock.advance(0.05)
    lag.tick()
    assert lag.lag() == 0.0
    clock.advance(0.3)  # the next tick is 0.25 s overdue (a long turn, no CPU)
    assert lag.lag() == pytest.approx(0.25)
    lag.tick()
    assert lag.lag() == pytest.approx(0.25)  # it came that late
    clock.advance(0.05)
    lag.tick()
    assert lag.lag() == 0.0


def test_while_the_reactor_runs_late_the_queue_holds_its_waiters() -> None:
    clock = Clock()
    late = [0.0]
    gate = HandshakeGate(1, queue=5, wait=5.0, clock=clock, lag=lambda: late[0], max_lag=0.1)
    first = slot_of(gate.enter())
    waiter = gate.enter()
    late[0] = 0.3
    assert first is not None
    first.release()  # a slot frees, but the reactor is late: nobody gets it yet
    assert slot_of(waiter) is None and gate.in_progress == 0 and gate.paused == 1
    newcomer = gate.enter()  # nor does a newcomer, though a slot is free
    assert slot_of(newcomer) is None and gate.waiting == 2
    clock.advance(0.1)
    assert slot_of(waiter) is None  # still late: paused again
    late[0] = 0.0
    clock.advance(0.1)
    second = slot_of(waiter)
    assert second is not None and slot_of(newcomer) is None  # in order, one slot
    second.release()
    assert slot_of(newcomer) is not None


def test_without_a_queue_the_reactor_lag_changes_nothing() -> None:
    clock = Clock()
    gate = HandshakeGate(1, clock=clock, lag=lambda: 5.0)
    assert slot_of(gate.enter()) is not None and gate.enter() is None
