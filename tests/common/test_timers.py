"""``treadmill.common.timers.every``: work repeated on a given reactor's clock."""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from treadmill.common.timers import every


def test_work_runs_at_start_then_every_interval_of_the_given_clock() -> None:
    clock, calls = Clock(), []
    timer = every(5.0, lambda: calls.append(clock.seconds()), clock)
    timer.startService()
    clock.pump([1.0] * 12)
    timer.stopService()
    clock.advance(10.0)
    assert calls == [0.0, 5.0, 10.0]


def test_a_coroutine_is_awaited_before_the_next_interval_counts() -> None:
    clock, started, finished = Clock(), [], []
    gates: list[Deferred[None]] = []

    async def work() -> None:
        started.append(clock.seconds())
        gate: Deferred[None] = Deferred()
        gates.append(gate)
        await gate
        finished.append(clock.seconds())

    timer = every(1.0, work, clock)
    timer.startService()
    clock.pump([1.0] * 5)
    assert started == [0.0] and finished == []  # no second pass while the first runs
    gates[0].callback(None)
    assert finished == [5.0]
    clock.pump([1.0] * 2)
    assert started == [0.0, 6.0]  # at the next boundary: the missed ones are skipped
    timer.stopService()


def test_the_timer_is_a_named_child_of_its_parent() -> None:
    parent = MultiService()
    timer = every(1.0, lambda: None, Clock(), parent=parent, name="heartbeat")
    assert parent.getServiceNamed("heartbeat") is timer
    assert every(1.0, lambda: None, Clock()).parent is None
