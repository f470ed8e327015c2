"""ConsoleBridge: a console's output to TCP clients, their input back."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor

from tests.proxy.support import echo_client
from tests.util.waiting import eventually, sleep
from treadmill.supervisor.console import ConsoleBridge


@pytest_twisted.ensureDeferred
async def test_output_fans_out_and_input_comes_back() -> None:
    typed: list[bytes] = []
    bridge = ConsoleBridge(reactor, typed.append)
    host, port = await bridge.listen()
    assert host == "127.0.0.1"
    try:
        one, two = await echo_client(port), await echo_client(port)
        await eventually(lambda: len(bridge.clients) == 2)
        bridge.output(b"login: ")
        assert await one.wait_for(7) == b"login: " and await two.wait_for(7) == b"login: "
        one.transport.write(b"root\n")
        await eventually(lambda: b"".join(typed) == b"root\n")
    finally:
        await bridge.close()
    await one.lost
    await two.lost


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_dropped_not_buffered() -> None:
    bridge = ConsoleBridge(reactor, lambda data: None, client_buffer=64 * 1024)
    _, port = await bridge.listen()
    try:
        slow = await echo_client(port)
        await eventually(lambda: len(bridge.clients) == 1)
        slow.transport.pauseProducing()  # never reads again
        for _ in range(400):
            bridge.output(b"x" * 16384)
            if not bridge.clients:
                break
            await sleep(0)
        await eventually(lambda: not bridge.clients)
    finally:
        await bridge.close()
