"""The daemons a benchmark starts: PostgreSQL, Treadmill roles under twistd, nginx; tokens."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchkit.cli import BenchError
from benchkit.host import first_line
from benchkit.procs import ROOT, VENV, free_port, spawn, stop_process, wait_http

DATABASE = "treadmill_bench"
ADMIN = "bench"
LOGGER = "treadmill.common.logging.text"


def temp_dir(prefix: str, base: str | None = None) -> Path:
    """A temporary directory of mode 0755: the postgres user (when run as root) and
    nginx's worker must traverse it."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base or None))
    os.chmod(path, 0o755)
    return path


def remove_temp(path: Path, keep: bool, say: Callable[[str], None]) -> None:
    if keep:
        say(f"kept {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


class Postgres:
    """A private PostgreSQL cluster (``treadmill.dev.pgcluster``) with one database."""

    def __init__(self, root: Path, say: Callable[[str], None], durable: bool = True,
                 port: int | None = None):
        from treadmill.dev.pgcluster import Cluster

        say(f"starting PostgreSQL{' (durable)' if durable else ''} in {root}")
        self.say = say
        self.cluster = Cluster(root, durable=durable, **({"port": port} if port else {}))
        self.cluster.start()
        self.cluster.create_database(DATABASE)
        self.dsn = self.cluster.dsn(DATABASE)

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.cluster.data / "postmaster.pid").read_text().splitlines()[0])
        return None

    def version(self) -> str:
        return first_line([str(self.cluster.bindir / "postgres"), "--version"])

    def stop(self) -> None:
        from treadmill.dev.pgcluster import ClusterError

        try:
            self.cluster.stop()
        except ClusterError as e:
            self.say(f"could not stop PostgreSQL: {e}")


def twistd(plugin: str, *args: str, logger: str | None = LOGGER) -> list[str]:
    """The command line of a role, as its systemd unit runs it."""
    cmd = [str(VENV / "twistd"), "--nodaemon", "--pidfile="]
    if logger:
        cmd.append(f"--logger={logger}")
    return [*cmd, plugin, *args]


def start_daemon(cmd: list[str], log: Path, health: str | None, what: str, *,
                 level: str | None = None, cwd: Path | None = None,
                 interval: float = 0.2) -> subprocess.Popen[bytes]:
    """Start ``cmd`` (``TREADMILL_LOG_LEVEL=level``), wait until ``health`` answers 200."""
    env = dict(os.environ, TREADMILL_LOG_LEVEL=level) if level else None
    proc = spawn(cmd, log, cwd=cwd or log.parent, env=env)
    if health:
        wait_http(health, proc, what, log, interval=interval)
    return proc


def bootstrap(*where: str) -> str:
    """An admin token from ``treadmill.switchboard.bootstrap`` (``--database-dsn DSN``
    or ``--config FILE``)."""
    proc = subprocess.run(
        [sys.executable, "-m", "treadmill.switchboard.bootstrap", *where, "--admin", ADMIN],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise BenchError(f"bootstrap failed ({proc.returncode}): {proc.stderr.strip()}")
    return lines[-1].strip()


def signer(keys_file: Path) -> Any:
    """A capability signer of the benchmark's own; its public keys (JWKS) in ``keys_file``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from treadmill.common.captoken import CapabilitySigner

    class WallClock:
        @staticmethod
        def seconds() -> float:
            return time.time()

    result = CapabilitySigner(Ed25519PrivateKey.generate(), "treadmill", WallClock())
    keys_file.write_text(json.dumps(result.jwks()))
    return result


class Nginx:
    """nginx with one worker and a private configuration, serving ``root`` as static files."""

    def __init__(self, base: Path, root: Path, probe: str, content_type: str,
                 say: Callable[[str], None]):
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (base / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        self.port = port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        conf = base / "nginx.conf"
        temp = "".join(f"    {name}_temp_path {base}/tmp/{sub};\n" for name, sub in
                       (("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"),
                        ("uwsgi", "uwsgi"), ("scgi", "scgi")))
        # As root, the worker would be nobody, who may not read a store's blob files.
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(f"""
{user}worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type {content_type};
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
{temp}\
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ add_header Cache-Control no-store; }}
    }}
}}
""")
        say(f"starting nginx (1 worker) on 127.0.0.1:{port}")
        binary = shutil.which("nginx")
        assert binary is not None
        self.proc = spawn([binary, "-p", str(base), "-e", str(base / "error.log"), "-c",
                           str(conf), "-g", "daemon off;"], base / "nginx.out", nofile=False)
        wait_http(self.url + probe, self.proc, "nginx", base / "error.log", timeout=20)

    @staticmethod
    def available(skip: bool, say: Callable[[str], None]) -> bool:
        if skip:
            say("nginx reference skipped (--no-nginx)")
        elif shutil.which("nginx") is None:
            say("nginx not found: the reference was skipped (apt-get install nginx)")
        else:
            return True
        return False

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGQUIT)


def role_config(path: Path, listen: str, root: Path, service: str, keys_file: Path,
                top: str = "", auth: str = "") -> Path:
    """The TOML of a role verifying our capability tokens, its access log off."""
    path.write_text(f'listen = ["{listen}"]\nroot = "{root}"\nservice = "{service}"\n{top}\n'
                    f'[auth]\n{auth}keys_file = "{keys_file}"\nissuer = "treadmill"\n\n'
                    "[http]\naccess_log = false\n")
    return path
