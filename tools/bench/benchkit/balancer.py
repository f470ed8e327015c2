"""HAProxy in front of several switchboard instances, as ``etc/haproxy/haproxy.cfg`` runs it.

One process holds about two descriptors per ``maxconn`` (a supervisor's link
is a connection on each side) and cannot go over ``RLIMIT_NOFILE``'s hard
limit: a larger fleet needs several processes, each balancing every instance.
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
from pathlib import Path

from benchkit.cli import BenchError
from benchkit.procs import ROOT, spawn, wait_http

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def maxconn_for(supervisors: int) -> int:
    """Two connections per supervisor, and room for users: never below the example's 4000."""
    return max(4000, 2 * supervisors + 1000)


def check_descriptors(supervisors: int) -> int:
    """``maxconn_for(supervisors)``, or :class:`BenchError` if one HAProxy cannot hold it."""
    maxconn = maxconn_for(supervisors)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and 2 * maxconn + 100 > hard:
        raise BenchError(f"{supervisors} supervisors through one HAProxy need its maxconn "
                         f"{maxconn}, about {2 * maxconn + 100} descriptors: over "
                         f"RLIMIT_NOFILE {hard} (use more HAProxy processes)")
    return maxconn


def config(port: int, servers: dict[str, int], supervisors: int,
           check_timeout: str = "") -> str:
    """The example configuration bound to ``127.0.0.1:port``, balancing ``servers``
    (name: loopback port), its ``maxconn`` fitted to ``supervisors``."""
    text = (ROOT / "etc" / "haproxy" / "haproxy.cfg").read_text()
    text = re.sub(r"^    bind .*\n", f"    bind 127.0.0.1:{port}\n", text, flags=re.M)
    text = re.sub(r"^    maxconn .*\n", f"    maxconn {check_descriptors(supervisors)}\n",
                  text, flags=re.M)
    if check_timeout:
        text = re.sub(r"^    timeout check .*\n", f"    timeout check {check_timeout}\n",
                      text, flags=re.M)
    text = re.sub(r"^    server .*\n", "", text, flags=re.M).rstrip("\n") + "\n"
    return text + "".join(f"    server {n} 127.0.0.1:{p} check\n" for n, p in servers.items())


def start(tmp: Path, name: str, port: int, servers: dict[str, int], supervisors: int,
          check_timeout: str = "") -> subprocess.Popen[bytes]:
    """Start HAProxy (``tmp/NAME.cfg``, log ``tmp/NAME.log``); wait for its ``/healthz``."""
    path = tmp / f"{name}.cfg"
    path.write_text(config(port, servers, supervisors, check_timeout))
    proc = spawn([HAPROXY, "-db", "-f", str(path)], tmp / f"{name}.log", cwd=tmp)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc, name, tmp / f"{name}.log",
              timeout=30, interval=0.1)
    return proc


def instance_cmd(dsn: str, name: str, key: Path, port: int, metrics_port: int,
                 *extra: str) -> list[str]:
    """The command line of switchboard instance ``name`` on loopback ``port``."""
    from benchkit.daemons import twistd

    return twistd("treadmill-switchboard", "--database-dsn", dsn, "--instance", name,
                  "--capabilities-signing-key", str(key),
                  "--listen", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
                  "--metrics-listen", f"tcp:{metrics_port}:interface=127.0.0.1",
                  "--http-access-log", "false", *extra)


def first_version() -> str:
    """HAProxy's version line."""
    from benchkit.host import first_line

    return first_line([HAPROXY, "-v"])
