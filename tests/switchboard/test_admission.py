"""Admission control for supervisor link handshakes: the gate and the refused upgrade.

The gate's arithmetic, and :class:`~treadmill.switchboard.links.SupervisorResource`
answering ``503`` with ``Retry-After`` while the gate is full, before a protocol (and
so any database work) exists. Real handshakes against a real switchboard are in
``test_links_admission.py``.
"""

from __future__ import annotations

import json

import pytest
from twisted.web.test.requesthelper import DummyRequest

from treadmill.switchboard.admission import RETRY_AFTER, HandshakeGate
from treadmill.switchboard.links import SupervisorResource, SupervisorSessionFactory


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

    ping_interval = 5.0
    ping_timeout = 10.0
    handshake_timeout = 10.0


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
