"""The dial-back pool's accounting on the proxy (``treadmill.proxy.pool``): the bounds per
job and per proxy, newest first, and closing a job's idle connections."""

from __future__ import annotations

from treadmill.proxy.pool import DataPool


def test_a_job_holds_at_most_per_job_and_the_proxy_at_most_total() -> None:
    pool: DataPool[str] = DataPool(per_job=2, total=3)
    assert pool.add("a", "a1") and pool.add("a", "a2")
    assert not pool.add("a", "a3")  # the job's bound
    assert pool.add("b", "b1")
    assert not pool.add("c", "c1")  # the proxy's bound, though c holds none
    assert pool.size == 3 and pool.waiting("a") == 2 and pool.waiting("c") == 0
    assert pool.counts["refused_job"] == 1 and pool.counts["refused_total"] == 1
    assert pool.add("a", "a1")  # already there: no second place taken
    assert pool.size == 3


def test_no_pool_at_all_when_per_job_is_zero() -> None:
    pool: DataPool[str] = DataPool(per_job=0, total=100)
    assert not pool.add("a", "a1")
    assert pool.size == 0 and pool.take("a") is None


def test_the_newest_is_taken_first_and_taking_frees_a_place() -> None:
    pool: DataPool[str] = DataPool(per_job=3, total=3)
    for conn in ("a1", "a2", "a3"):
        assert pool.add("a", conn)
    assert pool.take("a") == "a3"
    assert pool.take("b") is None
    assert pool.add("b", "b1")  # the proxy's bound has room again
    assert [pool.take("a"), pool.take("a"), pool.take("a")] == ["a2", "a1", None]
    assert pool.size == 1 and "a" not in pool.jobs
    assert pool.counts["taken"] == 3


def test_discard_and_close_job_keep_the_count_exact() -> None:
    pool: DataPool[str] = DataPool(per_job=4, total=8)
    for conn in ("a1", "a2", "a3"):
        pool.add("a", conn)
    pool.add("b", "b1")
    assert pool.discard("a", "a2") and not pool.discard("a", "a2")
    assert not pool.discard("b", "a1")  # another job's: untouched
    assert sorted(pool.close_job("a")) == ["a1", "a3"]
    assert pool.close_job("a") == []
    assert pool.size == 1 and pool.jobs == {"b": {"b1": None}}
    assert pool.discard("b", "b1") and pool.size == 0 and pool.jobs == {}
