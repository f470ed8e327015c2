"""Shipping a job's logs: spool first, every server, no byte lost or duplicated."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.logserver.support import (
    Keys,
    LaterLogServer,
    LogClient,
    Running,
    new_job,
    start_logserver,
)
from tests.util.daemons import Daemon
from tests.util.ports import free_port
from tests.util.waiting import eventually as until
from tests.util.waiting import sleep
from treadmill.supervisor.logship import LOGS_DIR, MARKER, LogShipper

FAST = {"backoff_initial": 0.05, "backoff_max": 0.3, "save_interval": 0.05,
        "request_timeout": 5.0, "chunk": 16 * 1024, "segment_size": 32 * 1024}


@pytest.fixture
def job() -> str:
    """A new job id."""
    return new_job()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def stored(url: str, keys: Keys, job: str, stream: str) -> bytes:
    answer = await LogClient(url).read(job, stream, keys.token(job, "read"))
    assert answer.code == 200, (answer.code, answer.body)
    return answer.body



@contextlib.asynccontextmanager
async def shipping(tmp_path: Path, keys: Keys, job: str, token: str | None = None, *,
                   dead_too: bool = False) -> AsyncIterator[tuple[Running, LogShipper, str]]:
    """A log server and a shipper of ``job`` to it (and, ``dead_too``, to a port where
    nothing listens, which holds the spool): yields both and the dead URL; stops both."""
    token = token or keys.token(job, "append")
    server = await start_logserver(tmp_path / "logs", keys)
    dead = f"http://127.0.0.1:{free_port()}"
    servers = [{"url": server.url, "token": token}]
    if dead_too:
        servers.append({"url": dead, "token": token})
    shipper = LogShipper(reactor, str(tmp_path / "state"), job, servers, **FAST)
    try:
        yield server, shipper, dead
    finally:
        await shipper.stop()
        await server.stop()


def daemon_config(path: Path, port: int, root: Path, keys: Keys) -> Path:
    path.write_text(f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
                    f'root = "{root}"\n'
                    'fsync = "always"\n'
                    "[auth]\n"
                    f'keys_file = "{keys.keys_file}"\n'
                    "[http]\naccess_log = false\n")
    return path


class Producer:
    """Deterministic output of two streams, remembered for the final comparison."""

    def __init__(self, seed: int = 7):
        self.random = random.Random(seed)
        self.produced: dict[str, bytearray] = {"console": bytearray(), "events": bytearray()}
        self.count = 0

    def emit(self, shipper: LogShipper) -> None:
        self.count += 1
        size = self.random.randint(1, 6000)
        console = self.random.randbytes(size)
        assert shipper.append("console", console)
        self.produced["console"] += console
        if self.count % 5 == 0:
            event = b'{"n": %d}\n' % self.count
            assert shipper.append("events", event)
            self.produced["events"] += event

    async def run(self, shipper: LogShipper, count: int) -> None:
        for _ in range(count):
            self.emit(shipper)
            await sleep(0.002)


@pytest_twisted.ensureDeferred
async def test_two_servers_one_killed_and_the_shipper_restarted(tmp_path: Path,
                                                                keys: Keys, job: str) -> None:
    token = keys.token(job, "append", ttl=600)
    local = await start_logserver(tmp_path / "local", keys)
    port = free_port()
    remote_url = f"http://127.0.0.1:{port}"
    config = daemon_config(tmp_path / "logserver.toml", port, tmp_path / "remote", keys)
    remote = Daemon("treadmill-logserver", ["--config", str(config)])
    remote.start()
    state = tmp_path / "supervisor"
    shipper: LogShipper | None = None
    try:
        await remote.wait_http(f"{remote_url}/healthz")
        servers = [{"url": local.url, "token": token}, {"url": remote_url, "token": token}]
        shipper = LogShipper(reactor, str(state), job, servers, spool_limit=8 * 1024 * 1024,
                             **FAST)
        producer = Producer()
        await producer.run(shipper, 60)

        # The remote log server dies without warning mid-stream...
        assert await remote.signal(signal.SIGKILL) != 0
        await producer.run(shipper, 60)
        assert shipper.pending_bytes > 0  # held for the dead server
        # ...and comes back; the shipper catches up on its own.
        remote.start()
        await remote.wait_http(f"{remote_url}/healthz")
        await producer.run(shipper, 40)

        # The supervisor stops gracefully mid-stream and resumes from its state dir.
        await shipper.stop()
        assert LogShipper.unfinished(str(state)) == [job]
        shipper = LogShipper.resume(reactor, str(state), job, **FAST)
        assert shipper is not None
        await producer.run(shipper, 40)

        # The supervisor crashes (nothing saved at the last moment), with a server down.
        assert await remote.signal(signal.SIGKILL) != 0
        await producer.run(shipper, 20)
        await shipper.flushed()
        shipper.halt()
        remote.start()
        shipper = LogShipper.resume(reactor, str(state), job, **FAST)
        assert shipper is not None
        await remote.wait_http(f"{remote_url}/healthz")
        await producer.run(shipper, 40)

        assert await shipper.close(timeout=30)
        assert shipper.finished and shipper.pending_bytes == 0
        assert not os.path.exists(state / LOGS_DIR / job)
        assert LogShipper.unfinished(str(state)) == []
        for url in (local.url, remote_url):
            listing = await LogClient(url).list(job, keys.token(job, "read"))
            assert {s["name"]: (s["length"], s["closed"]) for s in listing.body["streams"]} == {
                name: (len(data), True) for name, data in producer.produced.items()}
            for name, data in producer.produced.items():
                assert sha(await stored(url, keys, job, name)) == sha(bytes(data)), (url, name)
    finally:
        if shipper is not None:
            await shipper.stop()
        await remote.stop()
        await local.stop()


@pytest_twisted.ensureDeferred
async def test_a_server_that_lost_bytes_gets_them_again(tmp_path: Path,
                                                        keys: Keys, job: str) -> None:
    # The dead server holds the spool: nothing is dropped.
    async with shipping(tmp_path, keys, job, dead_too=True) as (server, shipper, _):
        shipper.append("console", b"a" * 50_000)
        await until(lambda: shipper.status()["servers"][server.url]["cursors"]["console"]
                    == 50_000, what="the first bytes acknowledged")
        await server.service.store.delete(job)  # the server loses everything
        shipper.append("console", b"b" * 1000)
        await until(lambda: shipper.status()["servers"][server.url]["cursors"]["console"]
                    == 51_000, what="everything sent again")
        assert await stored(server.url, keys, job, "console") == b"a" * 50_000 + b"b" * 1000
        assert not shipper.status()["servers"][server.url]["failed"]



@pytest_twisted.ensureDeferred
async def test_a_full_spool_refuses_and_reports(tmp_path: Path, keys: Keys, job: str,
                                                later: LaterLogServer) -> None:
    token = keys.token(job, "append")
    url = later.url
    reports: list[tuple[str, int]] = []
    shipper = LogShipper(reactor, str(tmp_path / "state"), job, [{"url": url, "token": token}],
                         spool_limit=20_000, reserve=2_000,
                         on_spool_full=lambda s, stream, n: reports.append((stream, n)), **FAST)
    server: Running | None = None
    try:
        assert shipper.append("console", b"1" * 10_000)
        assert shipper.append("console", b"2" * 8_000)
        assert not shipper.spool_full
        # No server acknowledges anything: the next console bytes do not fit.
        assert not shipper.append("console", b"3" * 1_000)
        assert not shipper.append("console", b"4" * 500)
        assert shipper.spool_full and shipper.refused_bytes == 1_500
        assert reports == [("console", 1_000)]  # once per episode
        # The events stream has its reserve.
        assert shipper.append("events", b'{"state": "ready"}\n')
        assert shipper.pending_bytes <= 20_000

        server = await later.start()
        await shipper.drained()
        assert shipper.append("console", b"5" * 100)
        assert not shipper.spool_full
        assert await shipper.close(timeout=10)
        marker = MARKER.format(count=1_500).encode()
        assert await stored(url, keys, job, "console") == (
            b"1" * 10_000 + b"2" * 8_000 + marker + b"5" * 100)
        assert await stored(url, keys, job, "events") == b'{"state": "ready"}\n'
    finally:
        await shipper.stop()
        if server is not None:
            await server.stop()


@pytest_twisted.ensureDeferred
async def test_close_closes_empty_streams_and_ends_followers(tmp_path: Path,
                                                             keys: Keys, job: str) -> None:
    from tests.logserver.support import follow_http

    server = await start_logserver(tmp_path / "logs", keys)
    received, _ = await follow_http(server.url, f"/v1/jobs/{job}/streams/console?follow=1",
                                    keys.token(job, "read"))
    shipper = LogShipper(reactor, str(tmp_path / "state"), job,
                         [{"url": server.url, "token": keys.token(job, "append")}], **FAST)
    try:
        assert shipper.append("events", b"started\n")
        assert await shipper.close(timeout=10)
        await received.ended
        assert bytes(received.data) == b""
        listing = await LogClient(server.url).list(job, keys.token(job, "read"))
        assert listing.body["streams"] == [
            {"name": "console", "length": 0, "closed": True},
            {"name": "events", "length": 8, "closed": True}]
        assert not shipper.append("console", b"late")  # closed: refused
    finally:
        await shipper.stop()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_refused_token_is_retried_until_replaced(tmp_path: Path,
                                                       keys: Keys, job: str) -> None:
    expired = keys.expired(job, "append")
    async with shipping(tmp_path, keys, job, expired) as (server, shipper, _):
        shipper.append("console", b"hello")
        await until(lambda: shipper.status()["servers"][server.url]["last_error"] is not None,
                    what="a refusal")
        assert "expired" in shipper.status()["servers"][server.url]["last_error"]
        shipper.set_servers([{"url": server.url, "token": keys.token(job, "append")}])
        await shipper.drained()
        assert await stored(server.url, keys, job, "console") == b"hello"



def test_resume_without_state_and_bad_names(tmp_path: Path) -> None:
    assert LogShipper.resume(reactor, str(tmp_path), new_job()) is None
    assert LogShipper.unfinished(str(tmp_path)) == []
    shipper = LogShipper(reactor, str(tmp_path), new_job(), [], durable=False)
    for bad in ("../x", "a/b", "..", ".", "a\x00", "A", "x" * 65, ""):
        with pytest.raises(ValueError):
            shipper.append(bad, b"x")
    shipper.halt()


@pytest_twisted.ensureDeferred
async def test_closing_survives_a_restart(tmp_path: Path,
                                          keys: Keys, job: str, later: LaterLogServer) -> None:
    token = keys.token(job, "append")
    url = later.url
    state = str(tmp_path / "state")
    shipper = LogShipper(reactor, state, job, [{"url": url, "token": token}], **FAST)
    shipper.append("console", b"the end")
    assert not await shipper.close(timeout=0.2)  # the server is down: not done yet
    await shipper.stop()
    server = await later.start()
    try:
        resumed = LogShipper.resume(reactor, state, job, **FAST)
        assert resumed is not None
        assert not resumed.append("console", b" and more")  # it was closing: refused
        assert await resumed.close(timeout=10)
        listing = await LogClient(url).list(job, keys.token(job, "read"))
        assert listing.body["streams"] == [{"name": "console", "length": 7, "closed": True},
                                           {"name": "events", "length": 0, "closed": True}]
        assert LogShipper.unfinished(state) == []
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_last_line_of_a_spooled_stream(tmp_path: Path, job: str) -> None:
    shipper = LogShipper(reactor, str(tmp_path), job, [], durable=False, **FAST)
    try:
        assert await shipper.last_line("events") == b""
        for n in range(3):
            assert shipper.append("events", b'{"n":%d}\n' % n)
        assert await shipper.last_line("events") == b'{"n":2}'
        await shipper.stop()
        resumed = LogShipper(reactor, str(tmp_path), job, [], durable=False, **FAST)
        assert await resumed.last_line("events") == b'{"n":2}'  # read from the spool
        assert await resumed.last_line("console") == b""
        assert not resumed.closing
        await resumed.stop()
    finally:
        await shipper.stop()


@pytest_twisted.ensureDeferred
async def test_lag_per_server_backlog_and_seconds_behind(tmp_path: Path,
                                                         keys: Keys, job: str) -> None:
    """What the supervisor's metrics export: the live server catches up (0 bytes, 0 s);
    the dead one keeps every byte as backlog and falls further behind."""
    async with shipping(tmp_path, keys, job, dead_too=True) as (server, shipper, dead):
        await sleep(0.3)  # idle: nobody is behind, however long ago the last ack
        assert shipper.lag() == {server.url: (0, 0.0), dead: (0, 0.0)}
        shipper.append("console", b"a" * 20_000)
        shipper.append("events", b"{}\n")
        await until(lambda: shipper.lag()[server.url] == (0, 0.0), what="caught up")
        await sleep(0.3)
        behind, seconds = shipper.lag()[dead]
        assert behind == 20_003 and 0.3 <= seconds < 5
        await sleep(0.2)
        assert shipper.lag()[dead][1] >= seconds + 0.2
