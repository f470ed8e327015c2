"""A client that hangs up mid-request harms nothing."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from tests.support import RunningSwitchboard


@pytest_twisted.ensureDeferred
async def test_hangups_during_queries(switchboard: RunningSwitchboard) -> None:
    job = (await switchboard.admin.post("/api/v1/jobs", {"image": "sha256:" + "f" * 64})).body
    host, port = switchboard.url.removeprefix("http://").split(":")
    request = (f"GET /api/v1/jobs/{job['id']} HTTP/1.1\r\nHost: x\r\n"
               f"Authorization: Bearer {switchboard.admin_token}\r\n\r\n").encode()
    errors: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(50):
            conn = await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)),
                                         Protocol())
            conn.transport.write(request)
            await deferLater(reactor, 0.001, lambda: None)  # Let the query start.
            conn.transport.abortConnection()
        await deferLater(reactor, 0.3, lambda: None)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not errors, [formatEvent(e) for e in errors[:3]]
    # The pool still answers, every connection of it.
    for _ in range(10):
        r = await switchboard.admin.get(f"/api/v1/jobs/{job['id']}")
        assert r.status == 200
