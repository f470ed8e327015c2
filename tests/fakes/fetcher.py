"""A stand-in for the supervisor's ``ImageFetcher`` whose fetches a test completes by hand."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred


class StubFetcher:
    """An ImageFetcher stand-in whose fetches the test completes by hand."""

    def __init__(self, cache_mount: str | None = None):
        self.cache_mount = cache_mount
        self.calls: list[dict[str, Any]] = []
        self.pending: list[Deferred[Any]] = []
        self.released: list[Any] = []

    def can_fetch(self, image: dict[str, Any]) -> bool:
        return bool(self.cache_mount or image.get("stores"))

    async def fetch(self, image: dict[str, Any]) -> Any:
        self.calls.append(image)
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return await d

    def release(self, fetched: Any) -> None:
        self.released.append(fetched)
