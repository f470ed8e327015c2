"""A fleet connecting at once through HAProxy to an instance that admits two link
handshakes at a time, end to end.

A real ``twistd treadmill-switchboard`` with ``supervisors.max_handshakes = 2`` and a
handshake queue of eight in its configuration file sits behind a real HAProxy running
the example ``etc/haproxy/haproxy.cfg`` (a 500 ms health check, sessions shut down
when a server is marked down); 40 real mock supervisors start at the same moment
through the balancer. The instance holds some upgrades in its queue and refuses the
rest with 503 (both counted in its metrics), every supervisor still ends up
connected, the balancer never marks the instance down, and no daemon logs a
traceback.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import pytest_twisted
import treq

from tests.support import Client
from tests.util.daemons import Daemon, bootstrap_admin
from tests.util.haproxy import HAPROXY, HAProxy, balancer_config, fleet_through
from tests.util.ports import free_port
from tests.util.waiting import eventually, sleep
from treadmill.dev.fleet import Fleet

SUPERVISORS = 40

pytestmark = pytest.mark.skipif(not os.access(HAPROXY, os.X_OK),
                                reason="haproxy is not installed (tools/setup-env installs it)")


async def counted(metrics_url: str, name: str) -> float:
    r = await treq.get(metrics_url)
    text = (await r.content()).decode()
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


@pytest_twisted.ensureDeferred
async def test_a_fleet_at_once_through_haproxy_all_connects(database: str,
                                                            tmp_path: Path) -> None:
    port, metrics, front = free_port(), free_port(), free_port()
    config = tmp_path / "switchboard.toml"
    config.write_text(
        f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
        f'[database]\ndsn = "{database}"\n'
        f'[capabilities]\nsigning_key = "{tmp_path / "key.pem"}"\n'
        "[supervisors]\nmax_handshakes = 2\nhandshake_queue = 8\nhandshake_wait = 2.0\n"
        f'[metrics]\nlisten = ["tcp:{metrics}:interface=127.0.0.1"]\n')
    switchboard = Daemon("treadmill-switchboard", ["--config", str(config)])
    (tmp_path / "haproxy.cfg").write_text(balancer_config(front, {"swb-1": port}))
    haproxy = HAProxy(tmp_path / "haproxy.cfg")
    fleet: Fleet | None = None
    try:
        switchboard.start()
        await switchboard.wait_http(f"http://127.0.0.1:{port}/healthz")
        haproxy.start()
        url = f"http://127.0.0.1:{front}"
        await haproxy.wait_http(f"{url}/healthz")
        admin = Client(url, await bootstrap_admin("--config", str(config)))
        fleet = await fleet_through(admin, front, tmp_path, SUPERVISORS)
        started = time.monotonic()
        fleet.startService()  # Every supervisor at once.

        async def all_connected() -> bool:
            hosts = (await admin.get("/api/v1/hosts")).body["hosts"]
            return sum(h["connected"] for h in hosts) == SUPERVISORS

        await eventually(all_connected, timeout=60, interval=0.25,
                         what="every supervisor connected")
        connect = time.monotonic() - started
        metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        assert await counted(metrics_url, "treadmill_supervisor_link_handshakes_queued_total"
                             ) > 0, "no upgrade ever waited: the test proves nothing"
        assert await counted(metrics_url, "treadmill_supervisor_link_handshakes_refused_total"
                             ) > 0, "the instance never refused a handshake: the queue was "\
            "never full, the test proves nothing of the 503 path"
        await sleep(1.0)  # Connected they stay: nothing marked down, nothing cut.
        assert await all_connected()
        assert all(s.link.session is not None for s in fleet.supervisors)
        assert " is DOWN" not in haproxy.output, haproxy.output
        assert "Traceback" not in switchboard.output, switchboard.output
        print(f"{SUPERVISORS} supervisors connected in {connect:.1f} s")
    finally:
        if fleet is not None:
            await fleet.stopService()
        await haproxy.stop()
        await switchboard.stop()
