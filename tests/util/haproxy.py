"""A real HAProxy running ``etc/haproxy/haproxy.cfg`` (its bind and server lines
replaced) in front of switchboard instances on loopback: ``HAProxy`` (the process),
``balancer_config`` (the example, fitted), ``HAPROXY`` (the binary; tests skip without
it: ``tools/setup-env`` installs it)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from twisted.internet import reactor

from tests.util.daemons import Daemon, _Output

__all__ = ["EXAMPLE", "HAPROXY", "HAProxy", "balancer_config"]

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
