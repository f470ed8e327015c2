"""The dial-back pool end to end: the proxy as operators run it (``twistd``, its example
configuration with ``pool.per_job`` and ``pool.max`` set) and two supervisors' sides as
their own processes (``tools/bench/expose.py``), over loopback. Clients are joined
through the pool, the proxy's metrics show the pool, ``pool.max`` bounds both jobs
together, and a supervisor's end frees its share for the other."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from tests.proxy.support import Keys, echo_once, new_job, proxy_daemon
from tests.util.ports import free_port
from tests.util.waiting import eventually

ROOT = Path(__file__).parents[2]


class Supervisor(ProcessProtocol):
    """``tools/bench/expose.py``: one job's services published; its endpoints as JSON."""

    def __init__(self) -> None:
        self.buffer = b""
        self.endpoints: list[dict[str, Any]] = []
        self.ended: Deferred[None] = Deferred()
        self.errors = b""

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.endpoints = json.loads(line)

    def errReceived(self, data: bytes) -> None:
        self.errors += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


def start_supervisor(tmp: Path, keys: Keys, proxy: str, job: str) -> Supervisor:
    token = tmp / f"{job}.token"
    token.write_text(keys.token(job))
    echo = free_port()
    protocol = Supervisor()
    argv = [sys.executable, str(ROOT / "tools" / "bench" / "expose.py"), "--job", job,
            "--proxy", proxy, "--token-file", str(token), "--echo", str(echo),
            "--service", f"echo=127.0.0.1:{echo}", "--self-authenticating", "--quiet"]
    protocol.transport = reactor.spawnProcess(protocol, sys.executable, argv,
                                              env=dict(os.environ), path=str(ROOT))
    return protocol


async def scrape(port: int) -> dict[str, float]:
    text = await (await treq.get(f"http://127.0.0.1:{port}/metrics")).text()
    found = {}
    for line in text.splitlines():
        if line.startswith("treadmill_proxy_") and " " in line:
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


@pytest_twisted.ensureDeferred
async def test_the_pool_of_a_proxy_daemon_joins_clients_and_is_bounded(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    running = proxy_daemon(keys, "--pool-per-job", "2", "--pool-max", "3")
    daemon, http, metrics = running.daemon, running.http, running.metrics
    daemon.start()
    supervisors: list[Supervisor] = []
    try:
        await daemon.wait_http(f"http://127.0.0.1:{http}/healthz")
        one = start_supervisor(tmp_path, keys, f"ws://127.0.0.1:{http}", new_job())
        supervisors.append(one)
        await eventually(lambda: bool(one.endpoints), timeout=30)
        port = one.endpoints[0]["port"]

        async def pooled() -> float:
            return (await scrape(metrics)).get("treadmill_proxy_pooled", -1)

        async def pooled_is(count: int) -> bool:
            return await pooled() == count

        async def pool_full() -> bool:
            seen = await scrape(metrics)
            return seen.get('treadmill_proxy_events_total{event="pool_full"}', 0) >= 1

        await eventually(lambda: pooled_is(2), timeout=15)
        for i in range(3):
            assert await echo_once(port, b"hello %d" % i) == b"hello %d" % i
        await eventually(lambda: pooled_is(2), timeout=15)  # refilled
        seen = await scrape(metrics)
        assert seen['treadmill_proxy_events_total{event="pool_joined"}'] == 3
        assert seen.get('treadmill_proxy_events_total{event="pool_empty"}', 0) == 0
        assert seen['treadmill_proxy_clients_total{outcome="spliced"}'] == 3

        # A second job: both together hold at most pool.max = 3.
        two = start_supervisor(tmp_path, keys, f"ws://127.0.0.1:{http}", new_job())
        supervisors.append(two)
        await eventually(lambda: bool(two.endpoints), timeout=30)
        await eventually(pool_full, timeout=15)
        assert await pooled() == 3
        assert await echo_once(two.endpoints[0]["port"], b"two") == b"two"

        # The first supervisor ends its job: its pooled connections close, and the second
        # job's refills (after its backoff) take the places.
        one.transport.signalProcess("TERM")
        await one.ended
        await eventually(lambda: pooled_is(2), timeout=20)
        seen = await scrape(metrics)
        assert seen['treadmill_proxy_jobs{connected="true"}'] == 1
    finally:
        for supervisor in supervisors:
            if not supervisor.ended.called:
                supervisor.transport.signalProcess("KILL")
                await supervisor.ended
        await daemon.stop()
    assert "Traceback" not in daemon.output, daemon.output
