"""The daemons' garbage collection policy (treadmill.common.gcpolicy), on the real
collector: what it freezes leaves the scanned generations, and a full pass still
reclaims cycles that became garbage after they were frozen."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock

from treadmill.common.gcpolicy import FreezePolicy


class Node:
    def __init__(self) -> None:
        self.peer: Node | None = None


def cycle() -> tuple[weakref.ref[Node], Node]:
    a, b = Node(), Node()
    a.peer, b.peer = b, a
    return weakref.ref(a), a


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # leave the test process as it was
    gc.collect()


def test_a_freeze_takes_live_objects_out_of_the_scanned_heap(unfrozen: None) -> None:
    clock = Clock()
    policy = FreezePolicy(clock, freeze_interval=60, full_interval=1800)
    ref, keep = cycle()
    policy.startService()  # the first tick freezes at once
    try:
        assert gc.get_freeze_count() > 0
        assert not any(o is keep for o in gc.get_objects())  # not scanned any more
        assert policy.last_freeze >= 0
    finally:
        policy.stopService()
    assert ref() is keep


def test_a_cycle_that_died_frozen_waits_for_the_full_pass(unfrozen: None) -> None:
    clock = Clock()
    policy = FreezePolicy(clock, freeze_interval=60, full_interval=300)
    ref, keep = cycle()
    policy.startService()
    try:
        del keep  # garbage now, but frozen: an ordinary collection cannot see it
        gc.collect()
        assert ref() is not None
        for _ in range(4):  # freezes at 60..240 s keep it
            clock.advance(60)
        assert ref() is not None
        clock.advance(60)  # 300 s: the full pass
        assert ref() is None
        assert policy.last_full > 0
        assert gc.get_freeze_count() > 0  # and the survivors are frozen again
    finally:
        policy.stopService()
