"""Fixtures of the image store tests: signing keys and an in-process store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted

from tests.imagestore.support import Keys, Pair, RunningStore, pair, start_store
from tests.util.running import stopping


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest_twisted.async_yield_fixture
async def store(tmp_path: Path, keys: Keys) -> AsyncIterator[RunningStore]:
    """A store that requires capability tokens (``store.keys`` signs them)."""
    async with stopping(await start_store(tmp_path / "store", keys)) as running:
        yield running


@pytest_twisted.async_yield_fixture
async def open_store(tmp_path: Path) -> AsyncIterator[RunningStore]:
    """A store with ``auth.disabled``."""
    async with stopping(await start_store(tmp_path / "open-store", None)) as running:
        yield running


@pytest_twisted.async_yield_fixture
async def stores(tmp_path: Path, keys: Keys) -> AsyncIterator[Pair]:
    """A store and a cache pulling through from it (:func:`pair`)."""
    running = await pair(tmp_path, keys)
    try:
        yield running
    finally:
        await running.cache.stop()
        await running.upstream.stop()
