"""A whole Treadmill testbed on one machine, for a first run and for development.

Run through ``tools/devstack``. State lives in ``.devstack/`` (or
``--state DIR``): a private PostgreSQL cluster, each role's configuration,
keys and logs. Running it again reuses all of it; Ctrl-C stops every role and
the cluster. ``--detach`` leaves everything running in the background and
``tools/devstack stop`` stops it. ``--serial-sim`` adds a serial board host
(``board-1``) on a simulated board (``treadmill/dev/fakeboard.py``).

This is development tooling: it blocks, and runs no reactor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from treadmill.dev import fakeboard
from treadmill.dev.pgcluster import Cluster, ClusterError
from treadmill.images import format as fmt

DATABASE = "treadmill"
ADMIN = "admin"
STORE_SERVICE = "treadmill-imagestore"  # the devstack image store's service name
FAKEBOARD = fakeboard.__file__
BOARD_IMAGE = "board-demo"
# The demo board image's app (a fakeboard.py script): ready, its parameters, exit 0.
BOARD_APP = b"""print Hello from the simulated board (tools/devstack --serial-sim)
agent {"type":"ready"}
params
print the app is done; its exit status is 0
exit 0 board demo done
"""


@dataclass
class Role:
    """A daemon of the devstack, started as ``twistd -n <plugin> --config <file>``, or as
    ``argv`` and ready once ``ready_path`` exists."""

    name: str
    plugin: str
    config: Path
    health_url: str | None = None
    argv: list[str] | None = None
    ready_path: Path | None = None


def _say(message: str) -> None:
    print(f"[devstack] {message}", flush=True)


def _http_json(url: str, token: str | None = None, timeout: float = 2.0) -> tuple[int, object]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, OSError):
        return 0, None
    try:
        return response.status, json.loads(body or b"null")
    except ValueError:
        return response.status, body


class Devstack:
    def __init__(self, state: Path, port: int, serial_sim: bool = False):
        self.state = state.absolute()
        self.serial_sim = serial_sim
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.store_url = f"http://127.0.0.1:{port + 1}"
        self.logs_url = f"http://127.0.0.1:{port + 2}"
        self.proxy_url = f"ws://127.0.0.1:{port + 3}"
        # The proxy's data port is port + 4; its public ports are port + 10 … port + 29.
        self.cluster = Cluster(self.state / "pg", port=5432, durable=True)
        self.logs = self.state / "logs"
        self.run = self.state / "run"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        # QEMU's UNIX sockets need short paths: its work directory is not in the state.
        self.qemu_work = Path(f"/tmp/treadmill-devstack-{port}-qemu")
        self.demo: str | None = None  # the demo image's digest, once pushed
        self.board = self.state / "board"  # the simulated board's directory (--serial-sim)
        self.board_image: str | None = None  # the demo board image's digest, once pushed

    # -- processes ------------------------------------------------------------

    def _pidfile(self, role: Role) -> Path:
        return self.run / f"{role.name}.pid"

    def _alive(self, role: Role) -> int | None:
        proc = self._procs.get(role.name)
        if proc is not None:
            return proc.pid if proc.poll() is None else None
        try:
            pid = int(self._pidfile(role).read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def start_role(self, role: Role) -> None:
        pid = self._alive(role)
        if pid is not None:
            _say(f"{role.name} already runs (pid {pid}); restarting it")
            self.stop_role(role)
        log = open(os.open(self.logs / f"{role.name}.log",  # private: tokens, tunnel paths
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600), "ab")
        twistd = Path(sys.executable).with_name("twistd")
        argv = role.argv or [
            str(twistd), "--nodaemon", "--pidfile=", "--logger=treadmill.common.logging.text",
            role.plugin, "--config", str(role.config)]
        if role.ready_path is not None and role.ready_path.is_symlink():
            role.ready_path.unlink()  # a stale one from an earlier run
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs[role.name] = proc
        self._pidfile(role).write_text(str(proc.pid))
        if role.health_url or role.ready_path:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise SystemExit(f"[devstack] {role.name} exited with {proc.returncode}; "
                                     f"see {self.logs / (role.name + '.log')}")
                if role.health_url and _http_json(role.health_url)[0] == 200:
                    break
                if role.ready_path and role.ready_path.exists():
                    break
                time.sleep(0.1)
            else:
                raise SystemExit(f"[devstack] {role.name} did not become healthy in 30 s; "
                                 f"see {self.logs / (role.name + '.log')}")
        _say(f"{role.name} running (pid {proc.pid}), log {self.logs / (role.name + '.log')}")

    def stop_role(self, role: Role) -> None:
        pid = self._alive(role)
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if self._alive(role) is None:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        self._procs.pop(role.name, None)
        self._pidfile(role).unlink(missing_ok=True)
        _say(f"{role.name} stopped")

    def stop_vms(self) -> None:
        """Kill the QEMU host's VMs: they outlive their supervisor on purpose (it adopts
        them when it restarts), but not the devstack. Only a process whose command line
        names this devstack's QEMU work directory is killed."""
        for pidfile in self.qemu_work.glob("*/qemu.pid"):
            try:
                pid = int(pidfile.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if str(self.qemu_work).encode() not in cmdline:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                _say(f"VM {pidfile.parent.name} stopped (pid {pid})")

    # -- set-up -------------------------------------------------------------------

    def roles(self, serial: bool | None = None) -> list[Role]:
        """The roles, in start order; the simulated board's if ``serial`` (default:
        ``--serial-sim``)."""
        return [Role("switchboard", "treadmill-switchboard", self.state / "switchboard.toml",
                     f"{self.url}/healthz"),
                Role("imagestore", "treadmill-imagestore", self.state / "imagestore.toml",
                     f"{self.store_url}/healthz"),
                Role("logserver", "treadmill-logserver", self.state / "logserver.toml",
                     f"{self.logs_url}/healthz"),
                Role("proxy", "treadmill-proxy", self.state / "proxy.toml",
                     f"http://127.0.0.1:{self.port + 3}/healthz"),
                Role("supervisor-mock-1", "treadmill-supervisor",
                     self.state / "supervisor-mock-1.toml"),
                *([Role("supervisor-qemu-1", "treadmill-supervisor",
                        self.state / "supervisor-qemu-1.toml")] if self.has_qemu() else []),
                *(self.serial_roles() if (self.serial_sim if serial is None else serial)
                  else [])]

    def serial_roles(self) -> list[Role]:
        """The simulated board (its own process) and its supervisor."""
        return [Role("fakeboard", "fakeboard", self.board,
                     argv=[sys.executable, FAKEBOARD, "run", str(self.board)],
                     ready_path=self.board / "tty"),
                Role("supervisor-board-1", "treadmill-supervisor",
                     self.state / "supervisor-board-1.toml")]

    @staticmethod
    def has_qemu() -> bool:
        return bool(shutil.which("qemu-system-x86_64") and shutil.which("qemu-img"))

    def _api(self, method: str, path: str, token: str, body: object = None
             ) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("Authorization", f"Bearer {token}")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def host(self, admin: str, name: str, tags: list[str], description: str) -> Path:
        """Register a host (once) that every user may start jobs on; its token file."""
        token_file = self.state / f"{name}.token"
        status, body = self._api("POST", "/api/v1/hosts", admin,
                                 {"name": name, "tags": tags, "description": description})
        if status == 201:
            self._api("POST", f"/api/v1/hosts/{name}/grants", admin,
                      {"user": "*", "privilege": "start"})
        elif status == 409 and not token_file.exists():
            status, body = self._api("POST", f"/api/v1/hosts/{name}/token", admin)
        elif status != 409:
            raise SystemExit(f"[devstack] could not register {name}: {status} {body}")
        if isinstance(body, dict) and "token" in body:
            token_file.write_text(body["token"] + "\n")
            token_file.chmod(0o600)
        return token_file

    def register_store(self, admin: str) -> None:
        """Register the image store with the switchboard (once): only registered stores
        get registry tokens, catalogue entries and requests from tml and supervisors."""
        status, body = self._api("POST", "/api/v1/stores", admin, {
            "url": self.store_url, "service": STORE_SERVICE,
            "description": "devstack image store"})
        if status not in (201, 409):
            raise SystemExit(f"[devstack] could not register the image store: {status} {body}")

    def mock_host(self, admin: str) -> None:
        """Register the mock host and write its supervisor's configuration."""
        name = "mock-1"
        token_file = self.host(admin, name, ["mock"], "devstack mock host")
        (self.state / f"supervisor-{name}.toml").write_text(
            "# Written by tools/devstack; edits are overwritten.\n"
            f"state_dir = {json.dumps(str(self.state / 'supervisors' / name))}\n"
            'driver = "mock"\n'
            "[switchboard]\n"
            f'url = "ws://127.0.0.1:{self.port}"\n'
            f"token_file = {json.dumps(str(token_file))}\n"
            "[reconnect]\ninitial = 0.5\nmax = 10.0\n"
            "[mock]\nrun_time = 5.0\nconsole_rate = 200\n"
            "[mock.stages]\nstarting = 0.3\nfetching_image = 1.0\nallocating = 0.3\n"
            "provisioning = 0.5\nbooting = 1.0\n")

    def qemu_host(self, admin: str) -> None:
        """Register the QEMU host and write its supervisor's configuration."""
        name = "qemu-1"
        token_file = self.host(admin, name, ["qemu"], "devstack QEMU host")
        self.qemu_work.mkdir(mode=0o700, exist_ok=True)
        (self.state / f"supervisor-{name}.toml").write_text(
            "# Written by tools/devstack; edits are overwritten.\n"
            f"state_dir = {json.dumps(str(self.state / 'supervisors' / name))}\n"
            'driver = "qemu"\n'
            "[switchboard]\n"
            f'url = "ws://127.0.0.1:{self.port}"\n'
            f"token_file = {json.dumps(str(token_file))}\n"
            "[reconnect]\ninitial = 0.5\nmax = 10.0\n"
            "[qemu]\n"
            f"work_dir = {json.dumps(str(self.qemu_work))}\n"
            'accel = "auto"\nprobe_timeout = 10.0\nmemory = 256\n'
            "shutdown_timeout = 10.0\n")

    def board_host(self, admin: str) -> None:
        """Register the serial host ``board-1`` and write its supervisor's configuration:
        the simulated board's pty, and its flash, erase, reset and health tools."""
        name = "board-1"
        token_file = self.host(admin, name, ["serial"], "devstack simulated serial board")
        self.board.mkdir(exist_ok=True)

        def tool(what: str, *args: str) -> str:
            return json.dumps([sys.executable, FAKEBOARD, what, str(self.board), *args])

        (self.state / f"supervisor-{name}.toml").write_text(
            "# Written by tools/devstack --serial-sim; edits are overwritten.\n"
            f"state_dir = {json.dumps(str(self.state / 'supervisors' / name))}\n"
            'driver = "serial"\n'
            "[switchboard]\n"
            f'url = "ws://127.0.0.1:{self.port}"\n'
            f"token_file = {json.dumps(str(token_file))}\n"
            "[reconnect]\ninitial = 0.5\nmax = 10.0\n"
            "[serial]\n"
            f"device = {json.dumps(str(self.board / 'tty'))}\n"
            "reopen_interval = 0.5\ncommand_timeout = 20.0\n"
            "[serial.flash]\n"
            f"command = {tool('flash', '{firmware}')}\n"
            "timeout = 30.0\n"
            f"[serial.erase]\ncommand = {tool('erase')}\n"
            f"[serial.reset]\ncommand = {tool('ctl', 'reset')}\n"
            '[serial.clean]\nafter = "erase"\n'
            f"[serial.health]\ncommand = {tool('health')}\n"
            'pattern = "FakeBoard ok"\ntimeout = 10.0\n'
            '[serial.boot]\nready = "agent"\ntimeout = 15.0\n')

    def push_board_image(self) -> None:
        """Push the demo board image (``BOARD_APP`` as firmware ``app.bin``), once."""
        app = self.state / "board-image" / "app.bin"
        app.parent.mkdir(exist_ok=True)
        app.write_bytes(BOARD_APP)
        blob = fmt.Blob(fmt.digest_of(BOARD_APP), len(BOARD_APP))
        digest = fmt.digest_of(fmt.manifest_bytes(fmt.build_board_manifest(
            [fmt.FirmwareFile("app.bin", blob)])))
        token = (self.state / "admin-token").read_text().strip()
        status, body = self._api("GET", f"/api/v1/images/{BOARD_IMAGE}", token)
        if (status != 200 or not isinstance(body, dict) or body.get("digest") != digest
                or body.get("host_tags") != ["serial"]):
            _say("pushing the demo board image")
            env = {**os.environ, "TREADMILL_CONFIG": str(self.state / "tml.toml")}
            pushed = subprocess.run(
                [sys.executable, "-m", "treadmill.cli.main", "image", "push", BOARD_IMAGE,
                 "--store", self.store_url, "--firmware", str(app), "--host-tag", "serial",
                 "--description",
                 "devstack: an app for the simulated board (treadmill/dev/fakeboard.py)"],
                capture_output=True, text=True, env=env, check=False)
            if pushed.returncode != 0:
                raise SystemExit("[devstack] could not push the demo board image: "
                                 f"{pushed.stderr.strip()[-500:]}")
        self.board_image = digest

    def demo_image(self) -> None:
        """Build the demo image (tools/build-test-image) and push it to the store, once."""
        tool = Path(__file__).resolve().parents[2] / "tools" / "build-test-image"
        if not (tool.exists() and shutil.which("qemu-img") and shutil.which("busybox")):
            _say("no demo image: tools/build-test-image, qemu-img or busybox is missing "
                 "(tools/setup-env installs them)")
            return
        cache = self.state / "test-image"
        built = subprocess.run([sys.executable, str(tool), "--cache", str(cache), "--json"],
                               capture_output=True, text=True, check=False)
        if built.returncode != 0:
            _say(f"no demo image: tools/build-test-image failed: {built.stderr.strip()[-500:]}")
            return
        digest = json.loads(built.stdout)["digest"]
        token = (self.state / "admin-token").read_text().strip()
        status, body = self._api("GET", "/api/v1/images/demo", token)
        host_tags = ["qemu"] if self.has_qemu() else []
        if (status != 200 or not isinstance(body, dict) or body.get("digest") != digest
                or body.get("host_tags") != host_tags):
            _say("pushing the demo image")
            env = {**os.environ, "TREADMILL_CONFIG": str(self.state / "tml.toml")}
            pushed = subprocess.run(
                [sys.executable, str(tool), "--cache", str(cache), "--push", "demo",
                 "--store", self.store_url,
                 *(arg for tag in host_tags for arg in ("--host-tag", tag))],
                capture_output=True, text=True, env=env,
                check=False)
            if pushed.returncode != 0:
                _say(f"could not push the demo image: {pushed.stderr.strip()[-500:]}")
                return
        self.demo = digest

    def prepare(self) -> None:
        for path in (self.state, self.logs, self.run):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o711)  # The postgres user must reach its cluster (0700).
        for private in (self.logs, self.run):  # daemon logs, sockets, pid files
            os.chmod(private, 0o700)
        _say("starting PostgreSQL")
        try:
            self.cluster.start()
            self.cluster.create_database(DATABASE)
        except ClusterError as e:
            raise SystemExit(f"[devstack] {e}") from None
        dsn = self.cluster.dsn(DATABASE)
        (self.state / "switchboard.toml").write_text(
            "# Written by tools/devstack; edits are overwritten.\n"
            f'listen = ["tcp:{self.port}:interface=127.0.0.1"]\n'
            'instance = "devstack"\n'
            "[database]\n"
            f"dsn = {json.dumps(dsn)}\n"
            "[capabilities]\n"
            f"signing_key = {json.dumps(str(self.state / 'capability-key.pem'))}\n"
            "[logs]\n"
            f"servers = [{json.dumps(self.logs_url)}]\n"
            "replicas = 1\n"
            "[proxies]\n"
            f"servers = [{json.dumps(self.proxy_url)}]\n"
            + self._manhole_config())
        keys_url = f"{self.url}/.well-known/treadmill/capability-keys"
        (self.state / "imagestore.toml").write_text(
            "# Written by tools/devstack; edits are overwritten.\n"
            f'listen = ["tcp:{self.port + 1}:interface=127.0.0.1:backlog=1024"]\n'
            f"root = {json.dumps(str(self.state / 'images'))}\n"
            f"service = {json.dumps(STORE_SERVICE)}\n"
            "[auth]\n"
            f"realm = {json.dumps(self.url + '/api/v1/registry/token')}\n"
            f"keys_url = {json.dumps(keys_url)}\n"
            f"keys_file = {json.dumps(str(self.state / 'imagestore-keys.json'))}\n")
        (self.state / "logserver.toml").write_text(
            "# Written by tools/devstack; edits are overwritten.\n"
            f'listen = ["tcp:{self.port + 2}:interface=127.0.0.1"]\n'
            f"root = {json.dumps(str(self.state / 'logs-data'))}\n"
            f"[http]\ncors_origins = [{json.dumps(self.url)}]\n"  # the web console's page
            "[auth]\n"
            f"keys_url = {json.dumps(keys_url)}\n"
            f"keys_file = {json.dumps(str(self.state / 'logserver-keys.json'))}\n")
        (self.state / "proxy.toml").write_text(
            "# Written by tools/devstack; edits are overwritten.\n"
            f'listen = ["tcp:{self.port + 3}:interface=127.0.0.1"]\n'
            f'data_listen = ["tcp:{self.port + 4}:interface=127.0.0.1"]\n'
            'public_host = "127.0.0.1"\n'
            'public_interface = "127.0.0.1"\n'
            f'ports = "{self.port + 10}-{self.port + 29}"\n'
            "grace = 10.0\n"
            "[auth]\n"
            f"keys_url = {json.dumps(keys_url)}\n"
            f"keys_file = {json.dumps(str(self.state / 'proxy-keys.json'))}\n")

    def _manhole_config(self) -> str:
        keys = [p for p in (Path.home() / ".ssh").glob("*.pub")] if Path.home().exists() else []
        if not keys:
            return ""
        authorized = self.state / "manhole_authorized_keys"
        authorized.write_text("".join(p.read_text() for p in keys))
        return ("[manhole]\n"
                'listen = ["tcp:2222:interface=127.0.0.1"]\n'
                f"authorized_keys = {json.dumps(str(authorized))}\n"
                f"host_key = {json.dumps(str(self.state / 'manhole_host_key'))}\n")

    def admin_token(self) -> str:
        path = self.state / "admin-token"
        if path.exists():
            token = path.read_text().strip()
            if _http_json(f"{self.url}/api/v1/whoami", token)[0] == 200:
                return token
        proc = subprocess.run(
            [sys.executable, "-m", "treadmill.switchboard.bootstrap",
             "--config", str(self.state / "switchboard.toml"), "--admin", ADMIN,
             "--label", "devstack"],
            capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"[devstack] bootstrap failed: {proc.stderr.strip()}")
        token = proc.stdout.strip().splitlines()[-1]
        path.write_text(token + "\n")
        path.chmod(0o600)
        return token

    def write_cli_config(self, token: str) -> Path:
        path = self.state / "tml.toml"
        path.write_text(f"url = {json.dumps(self.url)}\ntoken = {json.dumps(token)}\n")
        path.chmod(0o600)
        return path

    # -- commands -----------------------------------------------------------------------

    def up(self) -> Path:
        self.prepare()
        switchboard, *others = self.roles()
        self.start_role(switchboard)
        token = self.admin_token()
        self.register_store(token)
        self.mock_host(token)
        if self.has_qemu():
            self.qemu_host(token)
        else:
            _say("qemu-system-x86_64 is not installed: no QEMU host (tools/setup-env "
                 "installs it)")
        if self.serial_sim:
            self.board_host(token)
        else:
            for role in reversed(self.serial_roles()):  # left over from a --serial-sim run
                self.stop_role(role)
        for role in others:
            self.start_role(role)
        cli = self.write_cli_config(token)
        self.demo_image()
        if self.serial_sim:
            self.push_board_image()
        self.banner(cli)
        return cli

    def down(self) -> None:
        for role in reversed(self.roles(serial=True)):
            self.stop_role(role)
        self.stop_vms()
        shutil.rmtree(self.qemu_work, ignore_errors=True)
        try:
            self.cluster.stop()
            _say("PostgreSQL stopped")
        except ClusterError as e:
            _say(f"could not stop PostgreSQL: {e}")

    def banner(self, cli: Path) -> None:
        venv_bin = Path(sys.executable).parent
        print(f"""
Treadmill devstack is up.

  Switchboard API   {self.url}   (daemon logs in {self.logs})
  Web console       {self.url}/   (log in as a user with a password: docs/console.md)
  Image store       {self.store_url}
  Log server        {self.logs_url}
  Proxy             {self.proxy_url} (public ports {self.port + 10}-{self.port + 29})
  Admin user        {ADMIN}; token in {self.state / 'admin-token'}
  PostgreSQL        {self.cluster.dsn(DATABASE)}

Use it from another shell:

  export PATH={venv_bin}:$PATH TREADMILL_CONFIG={cli}
  tml whoami
  tml host ls                       # mock-1: a simulated host, connected
  tml job submit sha256:{'0' * 64} --tag mock --follow
  tml job submit sha256:{'0' * 64} --tag mock --param mock.exit_status=3 --follow
  tml job ls
  tml job logs JOB_ID --follow      # the mock host's console, from the log server

  tml job submit sha256:{'0' * 64} --tag mock --param mock.run_time=inf
  tml job show JOB_ID               # endpoint: echo ws://… (the mock's echo: a console token)
  tml job connect JOB_ID echo --local-port 7007    # then: socat - TCP:127.0.0.1:7007
  tml job cancel JOB_ID
{self._demo_text()}{self._board_text()}
  tml admin user add alice --password-stdin <<< 'correct horse battery'
  tml admin token create --user alice --label laptop
  tml grant image demo '*' use      # other users may boot the demo image too
  tml admin host add {'board-2' if self.serial_sim else 'board-1'} --tag arch=arm64
  tml image push demo --store {self.store_url} --qcow2 disk.qcow2
""", flush=True)


    def _demo_text(self) -> str:
        if self.demo is None:
            return ""
        text = """
  tml image ls                      # demo: a tiny busybox VM (tools/build-test-image)
  tml job submit demo --tag mock --follow          # the mock host really fetches it
"""
        if self.has_qemu():
            text += """  tml job submit demo --follow      # boots on qemu-1 (the host tag)
  tml job submit demo --param exit_status=3 --follow
  tml job submit demo --param hang=1    # then: tml job connect JOB_ID console
  tml key add ~/.ssh/id_ed25519.pub     # before submitting: then tml job ssh JOB_ID
  tml host reserve --tag qemu --image demo --for 30m   # a VM to work in: tml job ssh
"""
        return text


    def _board_text(self) -> str:
        if self.board_image is None:
            return ""
        ctl = f"{Path(sys.executable).name} {FAKEBOARD} ctl {self.board}"
        return f"""
  tml job submit {BOARD_IMAGE} --tag serial --follow   # flashed and run on board-1 (simulated)
  tml job submit {BOARD_IMAGE} --tag serial --param greeting=hi --follow   # the app prints it
  tml job connect JOB_ID console    # the board's console while a job runs
  {ctl} break    # or fix, unplug, plug
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/devstack", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="up", choices=["up", "stop", "status"])
    parser.add_argument("--state", default=".devstack", help="state directory")
    parser.add_argument("--port", type=int, default=8080, help="switchboard API port")
    parser.add_argument("--detach", action="store_true",
                        help="leave the testbed running in the background and return")
    parser.add_argument("--serial-sim", action="store_true",
                        help="also run a serial supervisor (host board-1, tag serial) on a "
                        "simulated board, and push the demo board image")
    args = parser.parse_args(argv)
    stack = Devstack(Path(args.state), args.port, serial_sim=args.serial_sim)
    if args.command == "stop":
        stack.down()
        return 0
    if args.command == "status":
        for role in stack.roles(serial=True):
            pid = stack._alive(role)
            if role in stack.serial_roles() and not (pid or args.serial_sim):
                continue
            print(f"{role.name}: {'running, pid ' + str(pid) if pid else 'stopped'}")
        return 0
    try:
        stack.up()
    except BaseException:
        stack.down()
        raise
    if args.detach:
        _say("detached; stop it with: tools/devstack stop")
        return 0
    _say("press Ctrl-C to stop every role and PostgreSQL")
    stopping = []

    def stop(signum: int, frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping:
        for role in stack.roles():
            if stack._alive(role) is None:
                _say(f"{role.name} exited; see {stack.logs / (role.name + '.log')}")
                stopping.append(0)
        time.sleep(0.5)
    stack.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
