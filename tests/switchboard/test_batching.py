"""The calls arriving together written as one (:mod:`treadmill.switchboard.batching`),
on a Clock: one turn's calls in one batch, at most ``concurrency`` batches in flight
and the calls arriving meanwhile gathered into the next, and a failed batch written
again item by item so that only the failing item's call fails."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from treadmill.switchboard.batching import Batcher


class Writes:
    """``write`` for a Batcher: each call waits until the test ends it."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], Deferred[list[int]]]] = []

    def __call__(self, items: list[int]) -> Deferred[list[int]]:
        done: Deferred[list[int]] = Deferred()
        self.calls.append((items, done))
        return done

    def answer(self, index: int) -> None:
        items, done = self.calls[index]
        done.callback([item * 10 for item in items])

    def fail(self, index: int, error: Exception) -> None:
        self.calls[index][1].errback(error)


def submit(batcher: Batcher[int, int], *items: int) -> list[Deferred[int]]:
    return [Deferred.fromCoroutine(batcher.submit(item)) for item in items]


def results(calls: list[Deferred[int]]) -> list[Any]:
    out: list[Any] = []
    for call in calls:
        call.addBoth(out.append)
    return out


def test_one_turns_calls_are_one_batch_and_each_gets_its_result() -> None:
    clock, writes = Clock(), Writes()
    batcher = Batcher(clock, writes)
    calls = submit(batcher, 1, 2, 3)
    assert writes.calls == []  # not before the turn ends
    clock.advance(0)
    assert [items for items, _ in writes.calls] == [[1, 2, 3]]
    writes.answer(0)
    assert results(calls) == [10, 20, 30] and batcher.batches == 1


def test_calls_arriving_while_the_batches_are_in_flight_go_together_in_the_next() -> None:
    clock, writes = Clock(), Writes()
    batcher = Batcher(clock, writes, concurrency=2, max_batch=3)
    first = submit(batcher, 1)
    clock.advance(0)
    second = submit(batcher, 2)
    clock.advance(0)
    rest = submit(batcher, 3, 4, 5, 6)
    clock.advance(0)
    assert [items for items, _ in writes.calls] == [[1], [2]]  # two in flight: the most
    writes.answer(1)
    assert [items for items, _ in writes.calls][2:] == [[3, 4, 5]]  # at most max_batch
    writes.answer(0)
    assert [items for items, _ in writes.calls][3:] == [[6]]
    writes.answer(2)
    writes.answer(3)
    assert results(first + second + rest) == [10, 20, 30, 40, 50, 60]


def test_a_failed_batch_is_written_again_item_by_item() -> None:
    clock, writes = Clock(), Writes()
    batcher = Batcher(clock, writes)
    calls = submit(batcher, 1, 2, 3)
    clock.advance(0)
    writes.fail(0, RuntimeError("lock timeout"))
    writes.answer(1)
    writes.fail(2, RuntimeError("lock timeout"))
    writes.answer(3)
    assert [items for items, _ in writes.calls] == [[1, 2, 3], [1], [2], [3]]
    outcomes = results(calls)
    assert outcomes[0] == 10 and outcomes[2] == 30
    with pytest.raises(RuntimeError, match="lock timeout"):
        outcomes[1].raiseException()
    assert batcher.batches == 4
