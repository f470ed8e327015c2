"""Public port allocation: unpredictable, complete, and careful with released ports."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from twisted.internet.error import CannotListenError

from treadmill.proxy.ports import PortAllocator, PortsExhausted


def _listen(refused: set[int] | None = None) -> Any:
    def listen(port: int) -> object:
        if refused and port in refused:
            raise CannotListenError("127.0.0.1", port, OSError("in use"))
        return object()
    return listen


def test_ports_are_spread_and_not_sequential() -> None:
    first, last = 40000, 49999
    allocator = PortAllocator((first, last), {})
    ports = [allocator.allocate(_listen())[0] for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(first <= p <= last for p in ports)
    steps = [b - a for a, b in itertools.pairwise(ports)]
    # Knowing one port tells nothing about the next: almost no small steps, both signs.
    assert sum(1 for s in steps if abs(s) <= 16) < 10
    assert sum(1 for s in steps if s > 0) > 100 and sum(1 for s in steps if s < 0) > 100
    # Spread over the range: every tenth of it is used.
    assert len({(p - first) * 10 // (last - first + 1) for p in ports}) == 10


def test_two_proxies_do_not_hand_out_the_same_sequence() -> None:
    a = PortAllocator((40000, 49999), {})
    b = PortAllocator((40000, 49999), {})
    assert [a.allocate(_listen())[0] for _ in range(20)] != \
        [b.allocate(_listen())[0] for _ in range(20)]


def test_every_port_is_found_then_exhausted_and_static_ones_are_skipped() -> None:
    allocator = PortAllocator((100, 131), {"job/ssh": 105})
    refused = {110, 111}
    got = {allocator.allocate(_listen(refused))[0] for _ in range(29)}
    assert got == set(range(100, 132)) - {105, 110, 111}
    with pytest.raises(PortsExhausted):
        allocator.allocate(_listen(refused))


def test_a_released_port_waits_while_others_are_free() -> None:
    allocator = PortAllocator((100, 163), {})
    ports = [allocator.allocate(_listen())[0] for _ in range(32)]
    for port in ports[:8]:
        allocator.release(port)
    later = [allocator.allocate(_listen())[0] for _ in range(32)]
    assert not set(later) & set(ports[:8])  # 32 others were free
    # Full: the released ones come back.
    assert {allocator.allocate(_listen())[0] for _ in range(8)} == set(ports[:8])
    with pytest.raises(PortsExhausted):
        allocator.allocate(_listen())
