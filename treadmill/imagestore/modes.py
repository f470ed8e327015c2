"""What the OCI handlers do differently in cache mode (``cache.enabled``).

:class:`~treadmill.imagestore.api.RegistryAPI` serves manifests and blobs
the same way in both modes and asks its :class:`StoreMode` at the few points
where a cache differs: :class:`PlainStore` does nothing there;
:class:`CacheMode` pulls what is missing through from the upstreams, counts
hits and misses, records last use and pins what it serves so that eviction
leaves it alone (``docs/imagestore.md``, "The image cache").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from treadmill.imagestore.cache import Cache
from treadmill.imagestore.pullthrough import UpstreamNotFound


class StoreMode(Protocol):
    """The points where serving differs between a store and a cache."""

    async def before_manifest(self, name: str, reference: str) -> None:
        """Before a manifest is resolved: make it present (or fresh) if need be."""

    async def fetch_blob(self, name: str, digest: str) -> bool:
        """A blob of ``name`` is missing: whether it was fetched and may be opened again."""

    def found(self, digest: str) -> None:
        """A blob was there when first asked for."""

    def serving(self, digest: str) -> contextlib.AbstractContextManager[None]:
        """Held while ``digest`` is read and sent."""

    def used(self, digest: str) -> None:
        """``digest`` was served."""

    def committed(self, digest: str, size: int) -> None:
        """A pushed manifest was stored."""


class PlainStore:
    """An ordinary image store: nothing to pull, count or pin."""

    async def before_manifest(self, name: str, reference: str) -> None:
        pass

    async def fetch_blob(self, name: str, digest: str) -> bool:
        return False

    def found(self, digest: str) -> None:
        pass

    def serving(self, digest: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def used(self, digest: str) -> None:
        pass

    def committed(self, digest: str, size: int) -> None:
        pass


class CacheMode:
    """An image cache: pull-through on misses, hit counts, last use and pins."""

    def __init__(self, cache: Cache):
        self.cache = cache

    async def before_manifest(self, name: str, reference: str) -> None:
        await self.cache.before_manifest(name, reference)

    async def fetch_blob(self, name: str, digest: str) -> bool:
        self.cache.misses += 1
        try:
            await self.cache.pull.ensure_blob(name, digest)
        except UpstreamNotFound:
            return False
        return True

    def found(self, digest: str) -> None:
        self.cache.hits += 1

    @contextlib.contextmanager
    def serving(self, digest: str) -> Iterator[None]:
        self.cache.pin(digest)
        try:
            yield
        finally:
            self.cache.unpin(digest)

    def used(self, digest: str) -> None:
        self.cache.touch(digest)

    def committed(self, digest: str, size: int) -> None:
        self.cache.committed(digest, size, False)
