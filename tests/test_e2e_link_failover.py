"""A failover behind HAProxy with queued link handshakes, end to end.

Three real ``twistd treadmill-switchboard`` processes on one database, each admitting
two link handshakes at a time and queueing the rest (``supervisors.max_handshakes =
2``, a handshake queue), sit behind a real HAProxy running the example
``etc/haproxy/haproxy.cfg``; 60 real mock supervisors connect through it. One instance
is killed with SIGKILL: its supervisors come back at once, wait in the survivors'
queues (held upgrades are connections to ``balance leastconn``; their host rows are
locked for a second, so that the gates fill on any machine), and both survivors
take a share of them; none is refused, every supervisor is connected again, the
balancer never marks a survivor down, and no survivor logs a traceback.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred, gatherResults

from tests.support import Client
from tests.switchboard.support import locked_hosts
from tests.util.daemons import Daemon, bootstrap_admin
from tests.util.haproxy import HAPROXY, HAProxy, balancer_config, fleet_through
from tests.util.ports import free_port
from tests.util.waiting import eventually, sleep
from treadmill.dev.fleet import Fleet

SUPERVISORS = 60
NAMES = ("a", "b", "c")

pytestmark = pytest.mark.skipif(not os.access(HAPROXY, os.X_OK),
                                reason="haproxy is not installed (tools/setup-env installs it)")


def instance(tmp: Path, database: str, name: str, port: int, metrics: int) -> Daemon:
    config = tmp / f"{name}.toml"
    config.write_text(
        f'listen = ["tcp:{port}:interface=127.0.0.1"]\ninstance = "{name}"\n'
        f'[database]\ndsn = "{database}"\npool_size = 3\n'
        f'[capabilities]\nsigning_key = "{tmp / "key.pem"}"\n'
        "[supervisors]\nmax_handshakes = 2\nhandshake_queue = 100\nhandshake_wait = 8.0\n"
        f'[metrics]\nlisten = ["tcp:{metrics}:interface=127.0.0.1"]\n')
    return Daemon("treadmill-switchboard", ["--config", str(config)])


async def counters(metrics: int) -> dict[str, float]:
    r = await treq.get(f"http://127.0.0.1:{metrics}/metrics")
    text = (await r.content()).decode()
    out = {}
    for line in text.splitlines():
        for name in ("queued", "refused"):
            if line.startswith(f"treadmill_supervisor_link_handshakes_{name}_total "):
                out[name] = float(line.split()[1])
    assert set(out) == {"queued", "refused"}, text
    return out


@pytest_twisted.ensureDeferred
async def test_a_killed_instances_fleet_waits_in_the_survivors_queues_and_is_shared(
        database: str, tmp_path: Path) -> None:
    ports = {name: free_port() for name in NAMES}
    metrics = {name: free_port() for name in NAMES}
    switchboards = {name: instance(tmp_path, database, name, ports[name], metrics[name])
                    for name in NAMES}
    front = free_port()
    (tmp_path / "haproxy.cfg").write_text(balancer_config(front, ports))
    haproxy = HAProxy(tmp_path / "haproxy.cfg")
    fleet: Fleet | None = None
    try:
        switchboards["a"].start()  # first: it creates the key file the others use
        await switchboards["a"].wait_http(f"http://127.0.0.1:{ports['a']}/healthz")
        for name in ("b", "c"):
            switchboards[name].start()
            await switchboards[name].wait_http(f"http://127.0.0.1:{ports[name]}/healthz")
        haproxy.start()
        url = f"http://127.0.0.1:{front}"
        await haproxy.wait_http(f"{url}/healthz")
        admin = Client(url, await bootstrap_admin("--database-dsn", database))
        fleet = await fleet_through(admin, front, tmp_path, SUPERVISORS)
        fleet.startService()

        async def holders() -> dict[str, str | None]:
            hosts = (await admin.get("/api/v1/hosts")).body["hosts"]
            return {h["name"]: h["instance"] if h["connected"] else None for h in hosts}

        async def spread() -> dict[str, str | None] | None:
            held = await holders()
            counts = [list(held.values()).count(name) for name in NAMES]
            return held if sum(counts) == SUPERVISORS and min(counts) > 0 else None

        before = await eventually(spread, timeout=60, interval=0.25,
                                  what="every supervisor connected, on every instance")
        victim = max(NAMES, key=lambda name: list(before.values()).count(name))
        moving = {host for host, name in before.items() if name == victim}
        survivors = [name for name in NAMES if name != victim]
        counted = {name: await counters(metrics[name]) for name in survivors}
        os.kill(switchboards[victim]._transport.pid, signal.SIGKILL)
        killed = time.monotonic()
        # The first registrations wait a moment on their rows (as on a busy database),
        # so that the gates fill and the others queue whatever this machine's speed.
        async with locked_hosts(database, *sorted(moving)):
            await sleep(1.0)

        async def moved() -> dict[str, str | None] | None:
            held = await holders()
            back = all(held[host] in survivors for host in moving)
            return held if back and all(held[h] is not None for h in held) else None

        after = await eventually(moved, timeout=60, interval=0.25,
                                 what="the victim's supervisors on the survivors")
        settle = time.monotonic() - killed
        now = {name: await counters(metrics[name]) for name in survivors}
        shares = {name: sum(after[host] == name for host in moving) for name in survivors}
        print(f"{len(moving)} links moved in {settle:.1f} s: {shares}; queue {now}")
        assert sum(now[n]["queued"] - counted[n]["queued"] for n in survivors) > 0, \
            "no upgrade waited in a survivor's queue: the test proves nothing"
        assert all(now[n]["refused"] == counted[n]["refused"] for n in survivors), now
        assert all(share >= len(moving) // 4 for share in shares.values()), shares
        for name in survivors:
            assert "Traceback" not in switchboards[name].output, switchboards[name].output
        assert f"switchboards/{survivors[0]} is DOWN" not in haproxy.output
        assert f"switchboards/{survivors[1]} is DOWN" not in haproxy.output
    finally:
        if fleet is not None:
            await fleet.stopService()
        await gatherResults([Deferred.fromCoroutine(d.stop())
                             for d in (*switchboards.values(), haproxy)])
