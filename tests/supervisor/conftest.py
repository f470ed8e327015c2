"""Fixtures of the supervisor tests: a fake switchboard peer and supervisors in-process,
the log servers' signing ``keys`` and a log server started ``later``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.logserver.support import Keys, LaterLogServer
from tests.supervisor.peer import FakeSwitchboard
from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.drivers import STAGES
from treadmill.supervisor.drivers.mock import MockSettings
from treadmill.supervisor.service import SupervisorService

FAST_MOCK = MockSettings(durations=dict.fromkeys(STAGES, 0.01), run_time=0.05)


def fast_config(url: str, state_dir: Path | str, **overrides: Any) -> SupervisorConfig:
    """A supervisor configuration with test-sized timings."""
    values: dict[str, Any] = {
        "url": url, "token": "host-token", "state_dir": str(state_dir),
        "reconnect_initial": 0.05, "reconnect_max": 0.4,
        "heartbeat_interval": 1.0, "heartbeat_timeout": 2.0,
        "flush_timeout": 1.0, "driver_values": FAST_MOCK.values(),
    }
    values.update(overrides)
    return SupervisorConfig(**values)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """The switchboard's key, as log servers trust it."""
    return Keys(tmp_path)


@pytest.fixture
def later(tmp_path: Path, keys: Keys) -> LaterLogServer:
    """A log server that is down until the test starts it (``await later.start()``)."""
    return LaterLogServer(tmp_path / "logs", keys)


@pytest_twisted.async_yield_fixture
async def peer() -> AsyncIterator[FakeSwitchboard]:
    switchboard = FakeSwitchboard().listen()
    try:
        yield switchboard
    finally:
        await switchboard.shutdown()
        assert not switchboard.errors, switchboard.errors


@pytest_twisted.async_yield_fixture
async def supervisors(peer: FakeSwitchboard, tmp_path: Path
                      ) -> AsyncIterator[Callable[..., SupervisorService]]:
    """``make(state="name", start=True, **config overrides)``: a SupervisorService, started
    unless ``start=False``, and stopped at the end if it runs."""
    made: list[SupervisorService] = []

    def make(state: str = "state", driver: Any = None, start: bool = True,
             **overrides: Any) -> SupervisorService:
        overrides.setdefault("url", peer.url)
        service = SupervisorService(reactor, fast_config(state_dir=tmp_path / state,
                                                         **overrides), driver=driver)
        if start:
            service.startService()
        made.append(service)
        return service

    try:
        yield make
    finally:
        for service in made:
            if service.running:
                await service.stopService()


@pytest_twisted.async_yield_fixture
async def peered(tmp_path: Path
                 ) -> AsyncIterator[Callable[..., tuple[FakeSwitchboard, SupervisorService]]]:
    """``make(minor=2, driver=None)``: a fake switchboard speaking protocol minor ``minor``
    and a started supervisor linked to it (``driver``: its host driver, else the mock);
    all stopped at the end."""
    made: list[tuple[FakeSwitchboard, SupervisorService]] = []

    def make(minor: int = 2, driver: Any = None) -> tuple[FakeSwitchboard, SupervisorService]:
        peer = FakeSwitchboard(minor=minor).listen()
        service = SupervisorService(reactor, fast_config(peer.url, tmp_path / "state"),
                                    driver=driver)
        service.startService()
        made.append((peer, service))
        return peer, service

    try:
        yield make
    finally:
        for peer, service in made:
            if service.running:
                await service.stopService()
            await peer.shutdown()
