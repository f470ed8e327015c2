"""Fixtures of the log server tests: signing keys and a log server in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted

from tests.logserver.support import Keys, LogClient, Running, start_logserver
from tests.util.running import stopping


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest_twisted.async_yield_fixture
async def logserver(tmp_path: Path, keys: Keys) -> AsyncIterator[Running]:
    async with stopping(await start_logserver(tmp_path / "logs", keys)) as running:
        yield running


@pytest.fixture
def client(logserver: Running) -> LogClient:
    return LogClient(logserver.url)
