"""The cache-mode seam of the OCI handlers (treadmill.imagestore.modes)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted

from treadmill.imagestore.modes import CacheMode, PlainStore, StoreMode
from treadmill.imagestore.pullthrough import UpstreamNotFound

SEAM = [name for name, _ in inspect.getmembers(StoreMode, inspect.isfunction)
        if not name.startswith("_")]


@pytest.mark.parametrize("mode", [PlainStore, CacheMode])
def test_each_mode_implements_the_seam(mode: type) -> None:
    assert SEAM
    for name in SEAM:
        expected = inspect.signature(getattr(StoreMode, name))
        actual = inspect.signature(getattr(mode, name))
        assert list(actual.parameters) == list(expected.parameters), name
        assert inspect.iscoroutinefunction(getattr(mode, name)) \
            == inspect.iscoroutinefunction(getattr(StoreMode, name)), name


class FakeCache:
    def __init__(self, upstream: set[str]):
        self.upstream = upstream
        self.hits = self.misses = 0
        self.pins: dict[str, int] = {}
        self.touched: list[str] = []
        self.commits: list[tuple[str, int, bool]] = []
        self.pull = SimpleNamespace(ensure_blob=self._ensure_blob)

    async def _ensure_blob(self, name: str, digest: str) -> None:
        if digest not in self.upstream:
            raise UpstreamNotFound(digest)

    def pin(self, digest: str) -> None:
        self.pins[digest] = self.pins.get(digest, 0) + 1

    def unpin(self, digest: str) -> None:
        self.pins[digest] -= 1
        if not self.pins[digest]:
            del self.pins[digest]

    def touch(self, *digests: str) -> None:
        self.touched += digests

    def committed(self, digest: str, size: int, new: bool) -> None:
        self.commits.append((digest, size, new))


@pytest_twisted.ensureDeferred
async def test_the_cache_mode_pulls_counts_pins_and_touches() -> None:
    cache = FakeCache({"sha256:up"})
    mode = CacheMode(cache)  # type: ignore[arg-type]
    assert await mode.fetch_blob("lab/fw", "sha256:up") is True
    assert await mode.fetch_blob("lab/fw", "sha256:nowhere") is False
    mode.found("sha256:here")
    assert (cache.misses, cache.hits) == (2, 1)
    with mode.serving("sha256:here"):
        assert cache.pins == {"sha256:here": 1}
        mode.used("sha256:here")
    assert cache.pins == {} and cache.touched == ["sha256:here"]
    with pytest.raises(RuntimeError), mode.serving("sha256:x"):
        raise RuntimeError("the client went away")
    assert cache.pins == {}
    mode.committed("sha256:m", 12)
    assert cache.commits == [("sha256:m", 12, False)]


@pytest_twisted.ensureDeferred
async def test_a_plain_store_fetches_nothing() -> None:
    mode: Any = PlainStore()
    assert await mode.fetch_blob("lab/fw", "sha256:x") is False
    with mode.serving("sha256:x"):
        mode.used("sha256:x")
