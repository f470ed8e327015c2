"""A real HAProxy running ``etc/haproxy/haproxy.cfg`` (its bind and server lines
replaced) in front of switchboard instances on loopback: ``HAProxy`` (the process),
``balancer_config`` (the example, fitted), ``HAPROXY`` (the binary; tests skip without
it: ``tools/setup-env`` installs it), ``fleet_through`` (mock supervisors that connect
through it)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from twisted.internet import reactor

from tests.util.daemons import Daemon, _Output
from treadmill.dev.fleet import Fleet
from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.drivers import STAGES
from treadmill.supervisor.drivers.mock import MockSettings

__all__ = ["EXAMPLE", "HAPROXY", "HAProxy", "balancer_config", "fleet_through"]

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
EXAMPLE = Path(__file__).parents[2] / "etc" / "haproxy" / "haproxy.cfg"


class HAProxy(Daemon):
    """``haproxy -db -f CONFIG`` in the foreground."""

    def __init__(self, config: Path):
        super().__init__("haproxy", [])
        self.config = config

    def start(self) -> None:
        self._proto = _Output(self.log)
        argv = [HAPROXY, "-db", "-f", str(self.config)]
        self._transport = reactor.spawnProcess(self._proto, argv[0], argv, env=self.env)


def balancer_config(port: int, backends: dict[str, int]) -> str:
    """The example configuration, listening on ``port`` in front of ``backends``."""
    text = EXAMPLE.read_text()
    text = re.sub(r"^    bind .*\n", f"    bind 127.0.0.1:{port}\n", text, flags=re.M)
    text = re.sub(r"^    server .*\n", "", text, flags=re.M)
    servers = "".join(f"    server {name} 127.0.0.1:{p} check\n" for name, p in backends.items())
    return text.rstrip("\n") + "\n" + servers


async def fleet_through(admin: Any, port: int, state: Path, count: int) -> Fleet:
    """``count`` new hosts ``mock-0``… (through ``admin``, a client of the balancer on
    ``port``) and a fleet of their mock supervisors connecting through it (not started:
    the caller chooses the moment), retrying every 0.2 s at first, 4 s at most."""
    configs = []
    for i in range(count):
        r = await admin.post("/api/v1/hosts", {"name": f"mock-{i}", "tags": ["mock"]})
        assert r.status == 201, r.body
        configs.append(SupervisorConfig(
            url=f"ws://127.0.0.1:{port}", token=r.body["token"],
            state_dir=str(state / f"mock-{i}"), name=f"mock-{i}",
            reconnect_initial=0.2, reconnect_max=4.0, durable=False,
            driver_values=MockSettings(durations=dict.fromkeys(STAGES, 0.02)).values()))
    return Fleet(reactor, configs)
