"""Fixtures of the proxy tests: signing keys and a proxy in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted

from tests.proxy.support import Keys, Running, start_proxy


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest_twisted.async_yield_fixture
async def proxy(keys: Keys) -> AsyncIterator[Running]:
    running = await start_proxy(keys)
    try:
        yield running
    finally:
        await running.stop()
