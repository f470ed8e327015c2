"""A private PostgreSQL cluster from the distribution's server binaries.

Used by the test suite (an ephemeral cluster per session) and by
``tools/devstack`` (a persistent one under ``.devstack/``). ``initdb`` refuses
to run as root, so as root every server command runs as the ``postgres`` user
through ``runuser``.

Only its owner can reach the cluster: it listens on no TCP port
(``listen_addresses=''``), only on a UNIX socket in a directory of mode 0700
with ``unix_socket_permissions = 0700``; authentication is ``peer``, and
``pg_ident.conf`` lets exactly two operating-system users in as the
``postgres`` role: the one the server runs as and the one that created the
cluster (root, when the server runs as ``postgres``). The cluster's files are
the server user's alone. ``pg_hba.conf`` and ``pg_ident.conf`` are rewritten on
every start, so a cluster made by an older version is locked down too.

This is development tooling: it blocks, and must never run inside a reactor.

    python -m treadmill.dev.pgcluster start DIR    # prints the DSN
    python -m treadmill.dev.pgcluster stop DIR
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path


class ClusterError(RuntimeError):
    """The cluster could not be created, started or stopped."""


def find_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/*/bin`` holding ``initdb``."""
    override = os.environ.get("TREADMILL_PG_BINDIR")
    if override:
        return Path(override)
    candidates = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise ClusterError(
        "no PostgreSQL server binaries found (install the 'postgresql' package, "
        "or set TREADMILL_PG_BINDIR or TREADMILL_TEST_DSN)")


class Cluster:
    """A cluster in ``root`` (data in ``root/data``, socket in ``root/run``)."""

    def __init__(self, root: str | os.PathLike[str], *, port: int = 5432, durable: bool = True):
        self.root = Path(root).absolute()
        self.data = self.root / "data"
        self.run = self.root / "run"
        self.logfile = self.root / "postgresql.log"
        self.port = port
        self.durable = durable
        self.bindir = find_bindir()
        self._as_postgres = os.geteuid() == 0
        self.owner = pwd.getpwuid(os.geteuid()).pw_name
        self.server_user = "postgres" if self._as_postgres else self.owner

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return cmd

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            message = proc.stderr.strip() or proc.stdout.strip()
            if self._as_postgres and "Permission denied" in message:
                message += (f" (the server runs as the postgres user, which must be able to "
                            f"reach {self.root}: every parent directory needs o+x)")
            raise ClusterError(f"{' '.join(args[:2])} failed ({proc.returncode}): {message}")
        return proc

    def _own(self, path: Path) -> None:
        if self._as_postgres:
            shutil.chown(path, "postgres", "postgres")

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection string over the UNIX socket."""
        return f"host={self.run} port={self.port} user=postgres dbname={dbname}"

    @property
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    @property
    def running(self) -> bool:
        if not (self.data / "postmaster.pid").exists():
            return False
        proc = subprocess.run(self._cmd("pg_ctl", "status", "-D", str(self.data)),
                              capture_output=True, text=True, check=False)
        return proc.returncode == 0

    def init(self) -> None:
        """Create the cluster unless it exists; (re)write who may connect."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.run.mkdir(mode=0o700, exist_ok=True)
        for path in (self.root, self.run):
            os.chmod(path, 0o700)
            self._own(path)
        if not self.initialized:
            args = ["initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=peer",
                    "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C"]
            if not self.durable:
                args.append("--no-sync")
            self._run(*args)
        self._write_access_rules()

    def _write_access_rules(self) -> None:
        """Peer authentication for the owner and the server user; nothing else."""
        users = dict.fromkeys((self.server_user, self.owner))
        files = {
            "pg_hba.conf": "# Written by treadmill.dev.pgcluster on every start.\n"
                           "local all all peer map=owner\n",
            "pg_ident.conf": "# Written by treadmill.dev.pgcluster on every start.\n"
                             + "".join(f"owner {user} postgres\n" for user in users),
        }
        for name, text in files.items():
            path = self.data / name
            temporary = path.with_name(name + ".tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            self._own(temporary)
            os.replace(temporary, path)

    def start(self, timeout: float = 60) -> None:
        """Start the server unless it runs; wait until it accepts connections."""
        self.init()
        if self.running:
            self._run("pg_ctl", "reload", "-D", str(self.data))  # The rewritten rules.
            return
        opts = [f"-c listen_addresses='' -k {self.run} -p {self.port} "
                "-c unix_socket_permissions=0700"]
        if not self.durable:
            opts.append("-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        if not self.logfile.exists():
            os.close(os.open(self.logfile, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(self.logfile, 0o600)
        self._own(self.logfile)
        self._run("pg_ctl", "start", "-D", str(self.data), "-w", "-t", str(int(timeout)),
                  "-l", str(self.logfile), "-o", " ".join(opts))

    def stop(self) -> None:
        """Stop the server (fast shutdown) if it runs."""
        if self.initialized and self.running:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")

    def create_database(self, name: str, template: str | None = None) -> None:
        """Create a database unless it exists."""
        create_database(self.dsn(), name, template)


def create_database(admin_dsn: str, name: str, template: str | None = None) -> None:
    """Create database ``name`` through ``admin_dsn`` unless it exists."""
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(admin_dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone():
                return
            stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                stmt = sql.SQL("{} TEMPLATE {}").format(stmt, sql.Identifier(template))
            for attempt in range(20):
                try:
                    cur.execute(stmt)
                    return
                except psycopg2.errors.ObjectInUse:
                    # The template is briefly in use by another session.
                    time.sleep(0.05 * (attempt + 1))
            cur.execute(stmt)
    finally:
        conn.close()


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop database ``name``, disconnecting its sessions."""
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(admin_dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("start", "stop", "dsn"):
        print("usage: python -m treadmill.dev.pgcluster start|stop|dsn DIR", file=sys.stderr)
        return 2
    cluster = Cluster(argv[2])
    try:
        if argv[1] == "start":
            cluster.start()
        elif argv[1] == "stop":
            cluster.stop()
    except ClusterError as e:
        print(f"pgcluster: {e}", file=sys.stderr)
        return 1
    if argv[1] != "stop":
        print(cluster.dsn())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
