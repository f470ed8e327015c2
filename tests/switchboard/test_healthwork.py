"""The leader's health pass on a Clock (the real one runs in
tests/test_e2e_health.py and tests/switchboard/test_host_health.py)."""

from __future__ import annotations

import psycopg2
from twisted.internet.task import Clock

from tests.fakes.conformance import check_methods
from treadmill.switchboard import store as real
from treadmill.switchboard.healthwork import HealthWork


class Store:
    """The two calls of the health pass, counted; ``error`` makes the first fail."""

    def __init__(self, error: Exception | None = None):
        self.error = error
        self.calls: list[str] = []

    async def run_due_checks(self, fresh_within: float = 20.0,
                             dead_after: float = 5.0) -> list[str]:
        self.calls.append("checks")
        if self.error is not None:
            raise self.error
        return ["job-1"]

    async def refresh_queue_messages(self) -> int:
        self.calls.append("messages")
        return 0


def test_the_stub_is_the_stores_shape():
    check_methods(Store, real.Store)


def test_runs_every_interval_on_the_leader_only():
    clock, store = Clock(), Store()
    leader = [True]
    work = HealthWork(clock, store, lambda: leader[0], interval=10.0)
    work.startService()
    assert store.calls == ["checks", "messages"]  # at once
    clock.advance(10)
    assert store.calls == ["checks", "messages"] * 2
    leader[0] = False
    clock.advance(10)
    assert store.calls == ["checks", "messages"] * 2
    work.stopService()


def test_an_unavailable_database_skips_the_pass_and_keeps_the_timer():
    clock, store = Clock(), Store(psycopg2.OperationalError("down"))
    work = HealthWork(clock, store, lambda: True, interval=1.0)
    work.startService()
    store.error = None
    clock.advance(1)
    assert store.calls == ["checks", "checks", "messages"]
    work.stopService()
