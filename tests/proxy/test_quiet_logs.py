"""At debug level, a bearer token sent in a WebSocket handshake reaches no log: the
supervisor's control client (``exposure``) and the proxy's control server both log
through ``QuietLogger``, while Autobahn logs handshakes at debug level."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import txaio
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher

from tests.proxy.support import Keys, Running, new_job
from treadmill.supervisor.echo import listen_echo
from treadmill.supervisor.exposure import ExposureManager


@pytest.fixture
def debug_events() -> Iterator[list[dict[str, Any]]]:
    """Every log event while Autobahn (txaio) logs at debug level."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    txaio.set_global_log_level("debug")
    try:
        yield events
    finally:
        txaio.set_global_log_level("info")
        globalLogPublisher.removeObserver(events.append)


@pytest_twisted.ensureDeferred
async def test_a_control_token_reaches_no_log_at_debug_level(
        proxy: Running, keys: Keys, debug_events: list[dict[str, Any]]) -> None:
    job = new_job()
    token = keys.token(job)
    echo = listen_echo(reactor)
    manager = ExposureManager(reactor, job, [{"url": proxy.ws, "token": token}],
                              {"echo": ("127.0.0.1", echo.getHost().port, True)},
                              reconnect_initial=0.05, reconnect_max=0.5)
    manager.start()
    try:
        assert [e["service"] for e in await manager.published()] == ["echo"]
    finally:
        await manager.close()
        await echo.stopListening()
    assert debug_events  # the observer saw the session
    signature = token.rsplit(".", 1)[-1]
    for event in debug_events:
        text = f"{formatEvent(event)} {event!r}"
        assert signature not in text, f"the token is in a log event: {text[:300]}"
