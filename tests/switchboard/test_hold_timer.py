"""A hold's timer on a Clock (``treadmill.switchboard.holds``): armed at the hold's end, moved
when the hold is extended or released, cancelled when the link goes; for a supervisor below
minor 9 whose hold was extended, status probes from its first end on (``plan``). The real
time end-to-end tests are in ``test_holds.py`` and ``tests/supervisor/test_e2e_hold_extension.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.task import Clock

from treadmill.protocol import supervisor as protocol
from treadmill.switchboard.holds import PROBE_FOR, PROBE_INTERVAL, HostHold, plan


def _row(held_for: float, first_for: float | None = None) -> dict[str, Any]:
    return {"id": "j", "due": False, "released": False, "timeout": 60.0,
            "held_for": held_for, "first_for": held_for if first_for is None else first_for}


class _Link:
    """What :class:`HostHold` uses of its ``SupervisorSession``: the links' reactor and
    ``spawn``, ``lost``, ``minor`` and ``reconcile``. What the timer starts is recorded."""

    def __init__(self, clock: Clock, minor: int = protocol.MINOR) -> None:
        self.lost = False
        self.minor = minor
        self.started: list[str] = []
        self.links = SimpleNamespace(reactor=clock, spawn=self._spawn)

    def _spawn(self, work: Any) -> None:
        self.started.append(work.__qualname__)
        work.close()

    async def reconcile(self) -> None:
        raise AssertionError("not run")


def _held(minor: int = protocol.MINOR) -> tuple[Clock, _Link, HostHold]:
    clock = Clock()
    link = _Link(clock, minor)
    hold = HostHold(link)
    hold.job_id = "j"
    return clock, link, hold


@pytest.mark.parametrize(("row", "minor", "expected"), [
    (_row(30.0), protocol.MINOR, (30.0, False)),  # at its end
    (_row(30.0, first_for=10.0), protocol.MINOR, (30.0, False)),  # extended: minor 9 knows
    (_row(30.0), protocol.HOLD_RENEW_MINOR - 1, (30.0, False)),  # not extended
    (_row(5.0, first_for=30.0), protocol.HOLD_RENEW_MINOR - 1, (5.0, False)),  # released
    (_row(30.0, first_for=10.0), protocol.HOLD_RENEW_MINOR - 1,
     (10.0 + PROBE_INTERVAL, True)),  # extended: it ends the hold at its first end
    (_row(30.0, first_for=-3.0), protocol.HOLD_RENEW_MINOR - 1,
     (PROBE_INTERVAL, True)),  # past the first end, still named: probe again
    (_row(30.0, first_for=-PROBE_FOR - 1), protocol.HOLD_RENEW_MINOR - 1,
     (30.0, False)),  # probed long enough: the end (and the reconciliations)
    (_row(-0.01), protocol.MINOR, (0.0, False)),
])
def test_plan(row: dict[str, Any], minor: int, expected: tuple[float, bool]) -> None:
    assert plan(row, minor) == expected


def test_the_timer_fires_at_the_holds_end() -> None:
    clock, link, hold = _held()
    hold.arm(_row(30.0))
    clock.pump([10.0] * 2 + [9.99])
    assert link.started == []
    clock.advance(0.01)
    assert link.started == ["HostHold.check"]


def test_an_extension_moves_the_timer() -> None:
    clock, link, hold = _held()
    hold.arm(_row(30.0))
    clock.advance(10.0)
    hold.arm(_row(40.0))  # extended by 20 s
    clock.advance(30.0)
    assert link.started == []
    clock.advance(10.0)
    assert link.started == ["HostHold.check"]
    assert not clock.getDelayedCalls()


def test_a_release_brings_the_timer_forward() -> None:
    clock, link, hold = _held()
    hold.arm(_row(30.0))
    hold.arm(_row(0.0))
    clock.advance(0)
    assert link.started == ["HostHold.check"]


def test_the_timer_goes_with_the_link() -> None:
    clock, link, hold = _held()
    hold.arm(_row(30.0))
    link.lost = True
    hold.cancel()  # onClose
    clock.advance(60.0)
    assert link.started == [] and not clock.getDelayedCalls()
    hold.arm(_row(30.0))  # a late check of a lost link arms nothing
    assert not clock.getDelayedCalls()


def test_a_supervisor_below_minor_9_is_probed_from_its_first_end() -> None:
    clock, link, hold = _held(protocol.HOLD_RENEW_MINOR - 1)
    hold.arm(_row(30.0, first_for=10.0))
    clock.advance(10.0)
    assert link.started == []
    clock.advance(PROBE_INTERVAL)
    assert link.started == ["_Link.reconcile"]
