"""The daemons' garbage collection policy (treadmill.common.gcpolicy), on the real
collector: what it freezes leaves the scanned generations, and a full pass still
reclaims cycles that became garbage after they were frozen."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

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


class ThreadClock(Clock):
    """A Clock that also runs ``callFromThread`` calls when told (as a reactor would)."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[tuple[Any, tuple[Any, ...]]] = []

    def callFromThread(self, fn: Any, *args: Any) -> None:
        self.from_threads.append((fn, args))

    def run_from_threads(self) -> None:
        calls, self.from_threads = self.from_threads, []
        for fn, args in calls:
            fn(*args)


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # leave the test process as it was
    gc.collect()


def test_a_freeze_takes_live_objects_out_of_the_scanned_heap(unfrozen: None) -> None:
    clock = ThreadClock()
    policy = FreezePolicy(clock, freeze_interval=60, full_interval=1800)
    ref, keep = cycle()
    policy.startService()  # the first tick freezes at once
    try:
        assert gc.get_freeze_count() > 0
        assert not any(o is keep for o in gc.get_objects())  # not scanned any more
        assert policy.stats.last_freeze >= 0
    finally:
        policy.stopService()
    assert ref() is keep


def test_a_cycle_that_died_frozen_waits_for_the_full_pass(unfrozen: None) -> None:
    clock = ThreadClock()
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
        assert policy.stats.last_full > 0
        assert gc.get_freeze_count() > 0  # and the survivors are frozen again
    finally:
        policy.stopService()


def test_the_survivors_of_the_interpreters_full_collection_are_frozen(unfrozen: None
                                                                       ) -> None:
    clock = ThreadClock()
    policy = FreezePolicy(clock, freeze_interval=60, full_interval=1800)
    policy.startService()
    try:
        gc.unfreeze()
        _, keep = cycle()
        gc.collect()  # as the interpreter's own full collection would
        assert any(o is keep for o in gc.get_objects())  # not frozen inside the collector
        assert len(clock.from_threads) == 1
        clock.run_from_threads()
        assert policy.stats.frozen_after_full == 1
        assert not any(o is keep for o in gc.get_objects())
        # The policy's own full pass does not schedule another freeze.
        clock.advance(1800)
        assert clock.from_threads == []
    finally:
        policy.stopService()
    assert policy._collected not in gc.callbacks
