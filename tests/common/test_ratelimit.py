"""The rate limiter and the concurrency gate, on a controlled clock."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from treadmill.common.ratelimit import (
    ConcurrencyGate,
    RateLimited,
    RateLimiter,
    Saturated,
    admit,
)


def test_burst_then_refill_at_rate():
    clock = Clock()
    limiter = RateLimiter(clock, rate=0.5, burst=3)
    for _ in range(3):
        assert limiter.wait("a") == 0
        limiter.take("a")
    assert limiter.wait("a") == pytest.approx(2.0)  # one token per 2 s
    assert limiter.wait("b") == 0  # other keys are not affected
    clock.advance(1.0)
    assert limiter.wait("a") == pytest.approx(1.0)
    clock.advance(1.0)
    assert limiter.wait("a") == 0
    limiter.take("a")
    assert limiter.wait("a") == pytest.approx(2.0)
    clock.advance(1000)  # never more than the burst
    for _ in range(3):
        limiter.take("a")
    assert limiter.wait("a") > 0


def test_give_returns_a_token_but_never_beyond_the_burst():
    clock = Clock()
    limiter = RateLimiter(clock, rate=0.01, burst=2)
    limiter.take("a")
    limiter.take("a")
    assert limiter.wait("a") > 0
    limiter.give("a")
    assert limiter.wait("a") == 0
    limiter.give("a")
    limiter.give("a")  # full: forgotten, as if never seen
    assert len(limiter) == 0
    limiter.take("a")
    limiter.take("a")
    assert limiter.wait("a") > 0


def test_table_never_exceeds_its_size_under_many_keys():
    clock = Clock()
    limiter = RateLimiter(clock, rate=0.001, burst=2, size=100)
    largest = 0
    for i in range(20000):
        key = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        if limiter.wait(key) == 0:
            limiter.take(key)
        largest = max(largest, len(limiter))
        clock.advance(0.0001)
    assert largest == 100
    # The most recent keys are the ones kept, still limited.
    limiter.take("10.0.78.31")
    assert limiter.wait("10.0.78.31") > 0


def test_refilled_buckets_expire_from_the_table():
    clock = Clock()
    limiter = RateLimiter(clock, rate=1.0, burst=5, size=1000)
    for i in range(50):
        limiter.take(f"k{i}")
    assert len(limiter) == 50
    clock.advance(5.0)  # every bucket is full again
    for i in range(20):
        limiter.take(f"new{i}")
    # Each write dropped up to four full buckets from the old end: all are gone.
    assert sorted(limiter._buckets) == sorted(f"new{i}" for i in range(20))


def test_admit_spends_all_or_nothing():
    clock = Clock()
    by_address = RateLimiter(clock, rate=0.1, burst=5)
    by_user = RateLimiter(clock, rate=0.1, burst=1)
    admit([(by_address, "1.2.3.4"), (by_user, "alice")])
    with pytest.raises(RateLimited) as refused:
        admit([(by_address, "1.2.3.4"), (by_user, "alice")])
    assert refused.value.retry_after == 10
    # The address spent nothing on the refused attempt.
    for _ in range(4):
        admit([(by_address, "1.2.3.4"), (by_user, "bob" + str(_))])
    with pytest.raises(RateLimited):
        admit([(by_address, "1.2.3.4"), (by_user, "carol")])
    assert RateLimited(0.01).retry_after == 1


def test_gate_runs_limit_at_once_queues_and_refuses_beyond():
    gate = ConcurrencyGate(limit=2, queue=1)
    started: list[Deferred[str]] = []

    async def work() -> str:
        d: Deferred[str] = Deferred()
        started.append(d)
        return await d

    calls = [ensureDeferred(gate.run(work)) for _ in range(3)]
    assert len(started) == 2 and gate.running == 2 and gate.waiting == 1
    refused = ensureDeferred(gate.run(work))
    assert isinstance(refused.result.value, Saturated)
    refused.addErrback(lambda f: None)
    started[0].callback("one")
    assert calls[0].result == "one"
    assert len(started) == 3 and gate.waiting == 0  # the queued call runs now
    started[1].errback(RuntimeError("boom"))  # a failure frees its slot too
    calls[1].addErrback(lambda f: f.trap(RuntimeError))
    started[2].callback("three")
    assert calls[2].result == "three" and gate.running == 0
