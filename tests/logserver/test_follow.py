"""Following a stream live, over WebSocket and over plain HTTP (curl)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.web.client import ResponseDone

from tests.logserver.support import (
    Keys,
    LogClient,
    Received,
    Running,
    follow_http,
    follow_ws,
    new_job,
)
from tests.util.waiting import sleep
from treadmill.logserver.follow import Pump

# The design bound is 100 ms; CI machines stall, so the assertion is looser and the
# measured value is printed.
BOUND = 1.0

Follow = Callable[[str, str, str], Awaitable[tuple[Received, Any]]]


async def ws(url: str, job: str, token: str, query: str = "") -> tuple[Received, Any]:
    return await follow_ws(url, f"/v1/jobs/{job}/streams/console/follow{query}", token)


async def curl(url: str, job: str, token: str, query: str = "") -> tuple[Received, Any]:
    sep = "&" if query else "?"
    return await follow_http(url, f"/v1/jobs/{job}/streams/console{query}{sep}follow=1", token)


FOLLOWERS = pytest.mark.parametrize("follow", [ws, curl], ids=["websocket", "http"])


async def latency(client: LogClient, received: Received, job: str, w: str, offset: int,
                  data: bytes, start: int = 0) -> float:
    """Append; the time until a follower that began at ``start`` has the bytes."""
    started = time.monotonic()
    answer = await client.append(job, "console", offset, data, w)
    assert answer.code == 200
    total = offset + len(data) - start
    await received.wait_for(total)
    arrived = next(t for t, size in received.times if size >= total)
    return arrived - started


async def following(logserver: Running, client: LogClient, keys: Keys, follow: Follow,
                    first: bytes, offset: int = 0) -> tuple[str, str, Received]:
    """A new job's console holding ``first``, followed from ``offset``: the job, its append
    token and the follower, which has received the bytes there are."""
    job, w, r = keys.new_job()
    await client.append(job, "console", 0, first, w)
    received, _ = await follow(logserver.url, job, r, f"?offset={offset}" if offset else "")
    await received.wait_for(len(first) - offset)
    return job, w, received


@FOLLOWERS
@pytest_twisted.ensureDeferred
async def test_followers_see_new_bytes_at_once(logserver: Running, client: LogClient,
                                               keys: Keys, follow: Follow) -> None:
    job, w, received = await following(logserver, client, keys, follow, b"history\n")
    measured = [await latency(client, received, job, w, 8 + 6 * i, b"line%d\n" % i)
                for i in range(5)]
    print(f"\n{follow.__name__} follower latency (append request to arrival): "
          + ", ".join(f"{m * 1000:.1f} ms" for m in measured))
    assert max(measured) < BOUND
    assert bytes(received.data) == b"history\n" + b"".join(b"line%d\n" % i for i in range(5))


@FOLLOWERS
@pytest_twisted.ensureDeferred
async def test_follow_from_an_offset_and_through_pauses(logserver: Running, client: LogClient,
                                                        keys: Keys, follow: Follow) -> None:
    job, w, received = await following(logserver, client, keys, follow, b"0123456789",
                                       offset=4)
    expected = b"456789"
    offset = 10
    for pause in (0.3, 0.05, 0.5):  # the writer goes quiet, then resumes
        await sleep(pause)
        assert bytes(received.data) == expected  # nothing new, nothing repeated
        chunk = b"after %.2f s\n" % pause
        took = await latency(client, received, job, w, offset, chunk, start=4)
        offset += len(chunk)
        expected += chunk
        print(f"\nafter a {pause} s pause: {took * 1000:.1f} ms")
        assert took < BOUND
    await client.close(job, "console", w)
    how = await received.ended
    assert bytes(received.data) == expected
    if follow is ws:
        assert how == (1000, "end of stream")


@FOLLOWERS
@pytest_twisted.ensureDeferred
async def test_closing_ends_followers(logserver: Running, client: LogClient, keys: Keys,
                                      follow: Follow) -> None:
    job, w, r = keys.new_job()
    # Following a stream nobody wrote yet: it waits for it.
    first, _ = await follow(logserver.url, job, r)
    second, _ = await follow(logserver.url, job, r)
    await client.append(job, "console", 0, b"a" * 200_000, w)
    await client.append(job, "console", 200_000, b"end", w, close=True)
    for received in (first, second):
        await received.ended
        assert bytes(received.data) == b"a" * 200_000 + b"end"
    # A follower of a closed stream gets it all, then the end.
    late, _ = await follow(logserver.url, job, r)
    how = await late.ended
    assert len(late.data) == 200_003, how  # (how it ended: the close code, the reason)
    assert logserver.service.store.follower_count == 0


@pytest_twisted.ensureDeferred
async def test_websocket_backpressure(logserver: Running, client: LogClient,
                                      keys: Keys) -> None:
    job, w, r = keys.new_job()
    size = 16 * 1024 * 1024
    for offset in range(0, size, 1024 * 1024):
        await client.append(job, "console", offset, bytes([offset // 1024 // 1024]) * 2**20, w)
    received, proto = await ws(logserver.url, job, r)
    proto.transport.pauseProducing()  # a reader that does not read
    await sleep(0.5)
    stream = logserver.service.store.lookup(job, "console")
    assert stream is not None and stream.followers
    (pump,) = stream.followers
    assert isinstance(pump, Pump)
    print(f"\nsent while the reader was stalled: {pump.sent} of {size} bytes")
    assert pump._paused and pump.sent < size // 2
    stalled = pump.sent
    await sleep(0.2)
    assert pump.sent == stalled  # no reading while paused
    proto.transport.resumeProducing()
    await received.wait_for(size, timeout=20)
    assert bytes(received.data[:2**20]) == b"\x00" * 2**20
    assert bytes(received.data[-2**20:]) == b"\x0f" * 2**20


@pytest_twisted.ensureDeferred
async def test_follow_refusals(logserver: Running, client: LogClient, keys: Keys) -> None:
    job, other = new_job(), new_job()
    r = keys.token(job, "read")
    path = f"/v1/jobs/{job}/streams/console/follow"
    plain = await client.call("GET", path, r)
    assert (plain.code, plain.error) == (400, "bad_request")
    upgrade = {"upgrade": "websocket", "connection": "Upgrade"}
    for token, status in ((None, 401), (keys.token(other, "read"), 403),
                          (keys.token(job, "append"), 403), (keys.expired(job, "read"), 401)):
        answer = await client.call("GET", path, token, headers=upgrade)
        assert answer.code == status
        curl_style = await client.call("GET", f"/v1/jobs/{job}/streams/console?follow=1", token)
        assert curl_style.code == status
    assert logserver.service.store.follower_count == 0


@pytest_twisted.ensureDeferred
async def test_deleting_a_followed_job_ends_its_followers(logserver: Running,
                                                          client: LogClient,
                                                          keys: Keys) -> None:
    job, w, r = keys.new_job()
    await client.append(job, "console", 0, b"doomed", w)
    socket, _ = await ws(logserver.url, job, r)
    http, _ = await curl(logserver.url, job, r)
    await socket.wait_for(6)
    await http.wait_for(6)
    await logserver.service.store.delete(job)
    assert (await socket.ended)[0] == 4004
    # The connection is cut: the chunked body never completes.
    assert not isinstance(await http.ended, ResponseDone)
    assert (await client.read(job, "console", r)).code == 404


@pytest_twisted.ensureDeferred
async def test_followers_that_leave_are_forgotten(logserver: Running, client: LogClient,
                                                  keys: Keys) -> None:
    job = new_job()
    r = keys.token(job, "read")
    store = logserver.service.store
    socket, proto = await ws(logserver.url, job, r)
    http, _ = await curl(logserver.url, job, r)
    deadline = time.monotonic() + 5
    while store.follower_count < 2:
        assert time.monotonic() < deadline
        await sleep(0.02)
    assert job in store.jobs  # a placeholder: nothing on disk
    proto.dropConnection(abort=True)
    http.transport.stopProducing()  # the client hangs up
    await socket.ended
    await http.ended
    while store.follower_count:
        assert time.monotonic() < deadline
        await sleep(0.02)
    assert job not in store.jobs
    assert not (logserver.root / "jobs" / job).exists()
    # The server keeps serving.
    assert (await client.list(job, r)).body["streams"] == []


@pytest_twisted.ensureDeferred
async def test_a_slow_websocket_follower_gets_the_tail_of_a_closed_stream(
        logserver: Running, client: LogClient, keys: Keys) -> None:
    """The server's closing handshake waits for a follower still reading: an aborted
    connection would drop the bytes left in its send buffers."""
    job, w, r = keys.new_job()
    data = bytes(range(256)) * 1024  # 4 x 256 KiB: the whole stream fits in the buffers
    for i in range(4):
        await client.append(job, "console", i * len(data), data, w, close=i == 3)
    received, proto = await ws(logserver.url, job, r)
    proto.transport.pauseProducing()  # the follower reads nothing for a while
    await sleep(2.5)  # longer than Autobahn's default closing handshake (1 s)
    proto.transport.resumeProducing()
    how = await received.ended
    assert bytes(received.data) == data * 4, (len(received.data), how)
