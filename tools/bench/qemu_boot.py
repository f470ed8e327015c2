#!/usr/bin/env python3
"""Benchmark of a QEMU job's start-up: enqueue to ``ready``, beside the same QEMU run by hand.

    .venv/bin/python tools/bench/qemu_boot.py [--jobs 5] [--accel tcg] [--json]

What it starts, measures and prints, and its options: ``tools/bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchkit.cli import BenchError, bench_parser, missing, options, output_options, run, sayer
from benchkit.daemons import Postgres, bootstrap, remove_temp, start_daemon, temp_dir, twistd
from benchkit.host import (
    first_line,
    host_info,
    machine_ticks,
    quiet_wait_option,
    revision,
    wait_quiet,
)
from benchkit.procfs import CLK_TCK, cpu_ticks, descendants, total_ticks
from benchkit.procs import ROOT, free_port, stop_process, tail
from benchkit.procs import http_json as http
from benchkit.report import cell

from treadmill.dev.pgcluster import ClusterError
from treadmill.images import format as fmt
from treadmill.protocol import agent as agent_proto
from treadmill.supervisor.blobcache import blob_path
from treadmill.supervisor.drivers.qemu.command import (
    Paths,
    overlay_command,
    qemu_command,
)
from treadmill.supervisor.drivers.qemu.settings import QemuSettings

TARGET_OVERHEAD = 0.10  # the issue's: supervisor overhead < 10 %
HOST = "qemu-1"
IMAGE_NAME = "demo"
PARAMS = {"exit_status": "0"}
STAGES = ("starting", "fetching_image", "allocating", "provisioning", "booting")
# Columns of a treadmill job: (key, heading).
PHASES = (("queued", "enq->asg"), ("assigned", "asg->stage1"), ("starting", "starting"),
          ("fetching_image", "fetch"), ("allocating", "alloc"),
          ("provisioning", "provision"), ("booting", "booting"), ("total", "TOTAL"))
# booting, split by the supervisor's log (its clock, not the switchboard's: the
# booting event is stamped when the switchboard stores it, after QEMU may have
# been spawned, so boot_to_spawn can be negative and is left out of the table).
BOOT_SPLIT = (("spawn_to_running", "spawn->cont"), ("running_to_ready", "guest->ready"))
HAND_PHASES = (("img_create", "img create"), ("spawn_to_running", "spawn->cont"),
               ("running_to_ready", "guest->ready"), ("total", "TOTAL"))


say = sayer()


def median(values: list[float]) -> float | None:
    """The p50: the median (the mean of the two middle values of an even count)."""
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# -- machine -------------------------------------------------------------------------


def machine_info(settings: QemuSettings, db: Postgres | None) -> dict[str, Any]:
    return {
        **host_info(),
        "postgresql": db.version() if db is not None else "unknown",
        "qemu": first_line([settings.binary, "--version"]),
        "qemu_img": first_line([settings.img_binary, "--version"]),
        "kvm_device": os.path.exists("/dev/kvm"),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "revision": revision(ROOT),
    }


# -- CPU accounting ----------------------------------------------------------------


def _tree_ticks(roots: list[int]) -> int:
    """CPU ticks of ``roots`` and every descendant, live or reaped (``cutime``)."""
    return total_ticks(descendants(roots))


class Load:
    """The machine's busy share over a window, and the share of it that was not ours."""

    def __init__(self, roots: Any):
        self.roots = roots  # a callable: the root pids of our process trees

    def begin(self) -> tuple[float, tuple[int, int], int]:
        return time.monotonic(), machine_ticks(), _tree_ticks(self.roots())

    def end(self, start: tuple[float, tuple[int, int], int]) -> dict[str, Any]:
        t0, (busy0, total0), ours0 = start
        wall = time.monotonic() - t0
        busy, total = machine_ticks()
        ours = _tree_ticks(self.roots())
        cores = len(os.sched_getaffinity(0))
        machine = (busy - busy0) / (total - total0) if total > total0 else None
        ours_share = max(0, ours - ours0) / CLK_TCK / (cores * wall) if wall > 0 else 0.0
        other = None if machine is None else max(0.0, machine - ours_share)
        return {"machine_busy": None if machine is None else round(machine, 3),
                "ours": round(ours_share, 3),
                "other": None if other is None else round(other, 3)}


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# -- by hand: QMP, console and agent from the script ---------------------------------------


class Channel:
    """A UNIX socket QEMU serves, read by lines."""

    def __init__(self, path: str, deadline: float, proc: subprocess.Popen[bytes],
                 retry: float):
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except OSError as e:
                sock.close()
                if proc.poll() is not None:
                    raise BenchError(f"QEMU exited with {proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise BenchError(f"cannot connect to {path}: {e}") from None
                time.sleep(retry)
        self.sock = sock
        self.buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def feed(self) -> list[bytes]:
        """Read what is there; the complete lines. ``EOFError`` when closed."""
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line for line in lines if line.strip()]

    def read_line(self, deadline: float) -> bytes:
        while b"\n" not in self.buffer:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise BenchError("QMP did not answer in time") from None
            if not data:
                raise BenchError("QMP closed")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        self.sock.settimeout(None)
        return line

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def qmp_execute(qmp: Channel, command: str, deadline: float) -> Any:
    qmp.send({"execute": command})
    while True:
        reply = json.loads(qmp.read_line(deadline))
        if "return" in reply:
            return reply["return"]
        if "error" in reply:
            raise BenchError(f"QMP {command}: {reply['error']}")
        # an event: skip it


def run_by_hand(settings: QemuSettings, image: fmt.TreadmillImage, blobs: str,
                size: int, work_root: Path, timeout: float, retry: float
                ) -> dict[str, Any]:
    """``qemu-img create`` + the QEMU command line of a job, timed to the agent's ready."""
    job_id = str(uuid.uuid4())
    paths = Paths(str(work_root / job_id))
    path_of = lambda d: blob_path(blobs, d.digest if isinstance(d, fmt.Descriptor) else d)  # noqa: E731
    top = path_of(image.top)
    args = qemu_command(settings, job_id=job_id, image=image, path_of=path_of, paths=paths,
                        accel=settings.accel, ssh_port=free_port())
    proc: subprocess.Popen[bytes] | None = None
    channels: list[Channel] = []
    out: dict[str, Any] = {"job": job_id}
    try:
        t0 = time.monotonic()
        os.mkdir(paths.work_dir, 0o700)
        subprocess.run(overlay_command(settings, top, paths.overlay, size), check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        t_img = time.monotonic()
        log_fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            proc = subprocess.Popen(args, cwd=paths.work_dir, stdin=subprocess.DEVNULL,
                                    stdout=log_fd, stderr=log_fd, start_new_session=True)
        finally:
            os.close(log_fd)
        deadline = time.monotonic() + timeout
        qmp = Channel(paths.qmp, deadline, proc, retry)
        channels.append(qmp)
        qmp.read_line(deadline)  # the greeting
        qmp_execute(qmp, "qmp_capabilities", deadline)
        console = Channel(paths.console, deadline, proc, retry)
        agent = Channel(paths.agent, deadline, proc, retry)
        channels += [console, agent]
        qmp_execute(qmp, "cont", deadline)
        t_run = time.monotonic()
        t_ready = None
        exit_message = None
        sel = selectors.DefaultSelector()
        for channel in (console, agent):
            sel.register(channel.sock, selectors.EVENT_READ, channel)
        console_bytes = 0
        while exit_message is None and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                channel = key.data
                if channel is console:
                    data = console.sock.recv(65536)
                    console_bytes += len(data)
                    if not data:
                        sel.unregister(console.sock)
                    continue
                try:
                    lines = agent.feed()
                except EOFError:
                    sel.unregister(agent.sock)
                    continue
                for line in lines:
                    message = json.loads(line)
                    kind = message.get("type")
                    if kind == "hello":
                        agent.sock.sendall(agent_proto.encode(agent_proto.welcome(job_id)))
                    elif kind == "get_parameters":
                        agent.sock.sendall(agent_proto.encode(
                            agent_proto.parameters(job_id, PARAMS)))
                    elif kind == "get_ssh_keys":  # the guest waits for it (none here)
                        agent.sock.sendall(agent_proto.encode(agent_proto.ssh_keys(job_id, [])))
                    elif kind == "ready" and t_ready is None:
                        t_ready = time.monotonic()
                    elif kind == "exit":
                        exit_message = message
            if proc.poll() is not None:
                break
        if t_ready is None:
            raise BenchError(f"the guest did not say ready by hand (QEMU exit status "
                             f"{proc.poll()}, log: {tail(Path(paths.log), 5)})")
        out.update({
            "img_create": _ms(t_img - t0),
            "spawn_to_running": _ms(t_run - t_img),
            "running_to_ready": _ms(t_ready - t_run),
            "total": _ms(t_ready - t0),
            "exit": exit_message,
            "console_bytes": console_bytes,
            "command": args,
        })
        # The guest powers itself off after its exit message (-no-reboot: QEMU exits).
        try:
            proc.wait(min(30.0, max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(BenchError, OSError):
                qmp_execute(qmp, "quit", time.monotonic() + 5)
        return out
    finally:
        for channel in channels:
            channel.close()
        if proc is not None:
            stop_process(proc, signal.SIGTERM, 5)
        shutil.rmtree(paths.work_dir, ignore_errors=True)


# -- the bench ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        # Short: QEMU's UNIX socket paths live under it (<= 107 bytes).
        self.tmp = temp_dir("tml-qb-")
        self.settings = QemuSettings.from_values(
            {"qemu.accel": args.accel, "qemu.memory": args.memory},
            state_dir=str(self.tmp / "supervisor"))
        self.db: Postgres | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.port = 0
        self.url = ""
        self.token = ""
        self.digest = ""
        self.image: fmt.TreadmillImage | None = None
        self.size = 0
        self.work = self.tmp / "q"
        self.hand_work = self.tmp / "h"
        self.load = Load(self._roots)
        self.sup_log_offset = 0

    def _roots(self) -> list[int]:
        postmaster = self.db.postmaster_pid() if self.db is not None else None
        return [os.getpid()] + ([postmaster] if postmaster else [])

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, name: str, plugin: str, config: Path, health: str | None,
              logger: str = "text", level: str = "info") -> None:
        log = self.tmp / f"{name}.log"
        cmd = twistd(plugin, "--config", str(config),
                     logger=f"treadmill.common.logging.{logger}")
        self.procs[name] = start_daemon(cmd, log, health, name, level=level, interval=0.1)
        say(f"{name} running (pid {self.procs[name].pid}), log {log}")

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def start_daemons(self) -> None:
        assert self.db is not None
        self.port = free_port()
        store_port, logs_port = free_port(), free_port()
        self.url = url = f"http://127.0.0.1:{self.port}"
        self.store_url = f"http://127.0.0.1:{store_port}"
        logs_url = f"http://127.0.0.1:{logs_port}"
        keys_url = f"{url}/.well-known/treadmill/capability-keys"
        dsn = self.db.dsn
        sb = self.write("switchboard.toml",
                        f'listen = ["tcp:{self.port}:interface=127.0.0.1"]\n'
                        'instance = "bench"\n'
                        f"[database]\ndsn = {json.dumps(dsn)}\n"
                        "[capabilities]\n"
                        f"signing_key = {json.dumps(str(self.tmp / 'capability-key.pem'))}\n"
                        + (f"[logs]\nservers = [{json.dumps(logs_url)}]\nreplicas = 1\n"
                           if not self.args.no_logserver else ""))
        self.start("switchboard", "treadmill-switchboard", sb, url + "/healthz")
        self.token = bootstrap("--config", str(sb))
        self.tml_config = self.write("tml.toml", f"url = {json.dumps(url)}\n"
                                                 f"token = {json.dumps(self.token)}\n")
        self.tml_config.chmod(0o600)
        store = self.write("imagestore.toml",
                           f'listen = ["tcp:{store_port}:interface=127.0.0.1"]\n'
                           f"root = {json.dumps(str(self.tmp / 'images'))}\n"
                           "[auth]\n"
                           f"realm = {json.dumps(url + '/api/v1/registry/token')}\n"
                           f"keys_url = {json.dumps(keys_url)}\n"
                           f"keys_file = {json.dumps(str(self.tmp / 'store-keys.json'))}\n")
        self.start("imagestore", "treadmill-imagestore", store, self.store_url + "/healthz")
        # Only a registered store gets pushes from tml and fetches from supervisors.
        status, body = http("POST", url + "/api/v1/stores", self.token, {
            "url": self.store_url, "service": "treadmill-imagestore", "description": "bench"})
        if status != 201:
            raise BenchError(f"registering the image store: {status} {body}")
        if not self.args.no_logserver:
            logs = self.write("logserver.toml",
                              f'listen = ["tcp:{logs_port}:interface=127.0.0.1"]\n'
                              f"root = {json.dumps(str(self.tmp / 'logs-data'))}\n"
                              "[auth]\n"
                              f"keys_url = {json.dumps(keys_url)}\n"
                              f"keys_file = {json.dumps(str(self.tmp / 'logs-keys.json'))}\n")
            self.start("logserver", "treadmill-logserver", logs, logs_url + "/healthz")
        # The QEMU host.
        status, body = http("POST", url + "/api/v1/hosts", self.token,
                            {"name": HOST, "tags": ["qemu"], "description": "bench"})
        if status != 201 or not isinstance(body, dict):
            raise BenchError(f"registering {HOST}: {status} {body}")
        http("POST", f"{url}/api/v1/hosts/{HOST}/grants", self.token,
             {"user": "*", "privilege": "start"})
        token_file = self.write(f"{HOST}.token", body["token"] + "\n")
        token_file.chmod(0o600)
        self.work.mkdir(mode=0o700)
        self.hand_work.mkdir(mode=0o700)
        s = self.settings
        sup = self.write("supervisor.toml",
                         f"state_dir = {json.dumps(str(self.tmp / 'supervisor'))}\n"
                         'driver = "qemu"\n'
                         f'[switchboard]\nurl = "ws://127.0.0.1:{self.port}"\n'
                         f"token_file = {json.dumps(str(token_file))}\n"
                         "[reconnect]\ninitial = 0.5\nmax = 10.0\n"
                         "[qemu]\n"
                         f"work_dir = {json.dumps(str(self.work))}\n"
                         f'accel = "{s.accel}"\nmemory = {s.memory}\n'
                         "shutdown_timeout = 10.0\n")
        self.start("supervisor", "treadmill-supervisor", sup, None, logger="json")
        deadline = time.monotonic() + 60
        while True:
            status, body = http("GET", f"{url}/api/v1/hosts/{HOST}", self.token)
            if status == 200 and isinstance(body, dict) and body.get("connected"):
                break
            if self.procs["supervisor"].poll() is not None or time.monotonic() > deadline:
                raise BenchError("the supervisor did not connect:\n"
                                 + tail(self.tmp / "supervisor.log"))
            time.sleep(0.2)
        say(f"{HOST} connected")

    def push_image(self) -> None:
        tool = ROOT / "tools" / "build-test-image"
        cache = Path(self.args.image_cache).expanduser()
        env = {**os.environ, "TREADMILL_CONFIG": str(self.tml_config),
               "PATH": f"{ROOT / '.venv/bin'}:{os.environ.get('PATH', '')}"}
        say(f"building (cached in {cache}) and pushing the test image as {IMAGE_NAME!r}")
        proc = subprocess.run([sys.executable, str(tool), "--cache", str(cache), "--json",
                               "--push", IMAGE_NAME, "--store", self.store_url],
                              capture_output=True, text=True, env=env, timeout=900,
                              check=False)
        if proc.returncode != 0:
            raise BenchError(f"tools/build-test-image failed: {proc.stderr.strip()[-800:]}")
        info = json.loads(proc.stdout[proc.stdout.index("{"):])
        self.digest = info["digest"]
        manifest = Path(info["manifest"]).read_bytes()
        self.image = fmt.parse_image(json.loads(manifest))
        out = subprocess.run([self.settings.img_binary, "info", "--output=json", "-f",
                              "qcow2", info["qcow2"][-1]], capture_output=True, text=True,
                             check=True)
        self.size = int(json.loads(out.stdout)["virtual-size"])
        say(f"image {self.digest}")

    def cleanup(self) -> None:
        for name in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                stop_process(self.procs[name])
        # A QEMU left behind (there should be none): its command line names our directory.
        binaries = {os.path.basename(self.settings.binary),
                    os.path.basename(self.settings.img_binary)}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if (os.path.basename(os.fsdecode(argv[0])) in binaries
                            and any(str(self.tmp).encode() in a for a in argv)):
                        say(f"killing a leftover {os.fsdecode(argv[0])} (pid {pid})")
                        os.kill(int(pid), signal.SIGKILL)
        if self.db is not None:
            self.db.stop()
        remove_temp(self.tmp, self.args.keep_temp, say)

    # -- runs ------------------------------------------------------------------------

    def supervisor_events(self) -> list[dict[str, Any]]:
        """New JSON lines of the supervisor's log since the last call."""
        path = self.tmp / "supervisor.log"
        with path.open("rb") as f:
            f.seek(self.sup_log_offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.sup_log_offset += end
        out = []
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def treadmill_job(self) -> dict[str, Any]:
        env = {**os.environ, "TREADMILL_CONFIG": str(self.tml_config)}
        params = [a for k, v in PARAMS.items() for a in ("--param", f"{k}={v}")]
        load0 = self.load.begin()
        sup = self.procs["supervisor"].pid
        sup0 = cpu_ticks(sup)
        proc = subprocess.run([str(ROOT / ".venv/bin/tml"), "job", "submit", IMAGE_NAME,
                               "--tag", "qemu", *params], capture_output=True, text=True,
                              env=env, timeout=60, check=False)
        if proc.returncode != 0:
            raise BenchError(f"tml job submit failed: {proc.stderr.strip()}")
        job = proc.stdout.strip().splitlines()[-1].strip()
        deadline = time.monotonic() + self.args.timeout
        while True:
            status, body = http("GET", f"{self.url}/api/v1/jobs/{job}", self.token)
            if status == 200 and isinstance(body, dict) and body.get("state") == "terminated":
                break
            if time.monotonic() > deadline:
                raise BenchError(f"job {job} did not terminate within {self.args.timeout} s")
            time.sleep(0.2)
        sup1 = cpu_ticks(sup)
        load = self.load.end(load0)
        status, body = http("GET", f"{self.url}/api/v1/jobs/{job}/events", self.token)
        if status != 200 or not isinstance(body, dict):
            raise BenchError(f"events of {job}: {status} {body}")
        events = body["events"]
        at: dict[str, float] = {}
        order: list[str] = []
        for e in events:
            key = e["stage"] if e["state"] == "initializing" else e["state"]
            if key not in at:
                at[key] = parse_time(e["at"])
                order.append(key)
        if "ready" not in at:
            raise BenchError(f"job {job} never became ready: {events}")
        result: dict[str, Any] = {
            "job": job, "end": events[-1].get("reason"),
            "exit_status": events[-1].get("exit_status"),
            "events": [[e["at"], e["state"], e["stage"]] for e in events]}
        for i, key in enumerate(order):
            if key in ("ready", "terminating", "terminated"):
                break
            result[key] = _ms(at[order[i + 1]] - at[key])
        result["total"] = _ms(at["ready"] - at["queued"])
        # The supervisor's log splits booting: QEMU spawned, the guest runs (after cont).
        spawned = running = None
        for rec in self.supervisor_events():
            fields = rec.get("fields") or {}
            if fields.get("job") != job:
                continue
            message = rec.get("message", "")
            if ": starting QEMU (" in message:
                spawned = parse_time(rec["time"])
                result["logged_command"] = fields.get("args")
            elif ": the guest runs" in message:
                running = parse_time(rec["time"])
                result["ssh_port"] = fields.get("port")
        if spawned and running and "booting" in at:
            result["boot_to_spawn"] = _ms(spawned - at["booting"])
            result["spawn_to_running"] = _ms(running - spawned)
            result["running_to_ready"] = _ms(at["ready"] - running)
        if sup0 is not None and sup1 is not None:
            result["supervisor_cpu_ms"] = round((sup1 - sup0) / CLK_TCK * 1000)
        result["load"] = load
        return result

    def check_command(self, job: dict[str, Any]) -> bool | None:
        """Is the supervisor's logged command the one ``qemu_command`` rebuilds?"""
        logged = job.get("logged_command")
        if not logged or not job.get("ssh_port") or self.image is None:
            return None
        blobs = str(self.tmp / "supervisor" / "images")
        rebuilt = qemu_command(
            self.settings, job_id=job["job"], image=self.image,
            path_of=lambda d: blob_path(blobs, d.digest), paths=Paths(str(self.work / job["job"])),
            accel=self.settings.accel, ssh_port=int(job["ssh_port"]))
        return " ".join(rebuilt) == logged

    def by_hand(self) -> dict[str, Any]:
        assert self.image is not None
        load0 = self.load.begin()
        result = run_by_hand(self.settings, self.image, str(self.tmp / "supervisor" / "images"),
                             self.size, self.hand_work, self.args.timeout, self.args.retry)
        result["load"] = self.load.end(load0)
        return result

    def run(self) -> dict[str, Any]:
        quiet = None
        if self.args.quiet_wait:
            quiet = round(wait_quiet(0.15, 5, self.args.quiet_wait, say), 3)
        self.db = Postgres(self.tmp / "pg", say)
        results: dict[str, Any] = {
            "started_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine_info(self.settings, self.db),
            "idle_before": quiet,
            "settings": {"accel": self.settings.accel, "memory": self.settings.memory,
                         "cpus": self.settings.cpus, "machine": self.settings.machine,
                         "cpu": self.settings.cpu, "jobs": self.args.jobs,
                         "logserver": not self.args.no_logserver, "params": PARAMS},
            "treadmill": [], "by_hand": []}
        self.start_daemons()
        self.push_image()
        results["image"] = self.digest
        for i in range(self.args.jobs):
            job = self.treadmill_job()
            job["cold"] = i == 0
            results["treadmill"].append(job)
            say(f"treadmill job {i + 1}/{self.args.jobs}{' (cold)' if i == 0 else ''}: "
                f"enqueue -> ready {job['total']:.0f} ms, {job['end']} "
                f"(other load {job['load']['other']})")
            if i == 0:
                same = self.check_command(job)
                results["same_command"] = same
                if same is False:
                    say("WARNING: the rebuilt QEMU command differs from the supervisor's")
            hand = self.by_hand()
            results["by_hand"].append(hand)
            say(f"by hand {i + 1}/{self.args.jobs}: qemu-img + QEMU -> ready "
                f"{hand['total']:.0f} ms (other load {hand['load']['other']})")
        results["by_hand_command"] = results["by_hand"][-1].pop("command")
        for hand in results["by_hand"]:
            hand.pop("command", None)
        for job in results["treadmill"]:
            job.pop("logged_command", None)
        results["summary"] = summarize(results)
        return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    warm = [j for j in results["treadmill"] if not j["cold"]]
    cold = [j for j in results["treadmill"] if j["cold"]]
    hand = results["by_hand"]

    def p50s(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
        return {k: median([r[k] for r in rows if r.get(k) is not None]) for k in keys}

    tm_keys = (*(k for k, _ in PHASES + BOOT_SPLIT), "boot_to_spawn", "supervisor_cpu_ms")
    out: dict[str, Any] = {
        "warm_p50": p50s(warm, tm_keys),
        "cold": p50s(cold, tm_keys) if cold else None,
        "by_hand_p50": p50s(hand, tuple(k for k, _ in HAND_PHASES)),
        "other_load_max": max([r["load"]["other"] or 0 for r in warm + cold + hand] or [0]),
    }
    tm, bh = out["warm_p50"]["total"], out["by_hand_p50"]["total"]
    if tm is not None and bh:
        out["overhead"] = round((tm - bh) / bh, 3)
        out["overhead_ms"] = round(tm - bh, 1)
        out["target"] = TARGET_OVERHEAD
        out["met"] = out["overhead"] < TARGET_OVERHEAD
    return out


def _f(value: Any) -> str:
    return cell(value, ".0f")


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    s = results["summary"]
    lines = [f"QEMU boot, accel {results['settings']['accel']}, "
             f"{results['settings']['memory']} MiB, {m['nproc']} CPUs ({m['cpu_model']}), "
             f"{m['qemu']}, revision {m['revision']}, started {results['started_utc']}",
             "", "treadmill jobs (ms, from the job events; booting = booting -> ready):"]
    heads = [h for _, h in PHASES] + [h for _, h in BOOT_SPLIT] + ["sup CPU", "other"]
    lines.append(f"{'job':<10}" + "".join(f"{h:>13}" for h in heads))

    def row(name: str, r: dict[str, Any], other: Any) -> str:
        cells = [_f(r.get(k)) for k, _ in PHASES + BOOT_SPLIT] + [_f(r.get("supervisor_cpu_ms"))]
        cells.append("-" if other is None else f"{other:.0%}")
        return f"{name:<10}" + "".join(f"{c:>13}" for c in cells)

    for i, job in enumerate(results["treadmill"]):
        lines.append(row(f"{i + 1}{' cold' if job['cold'] else ''}", job, job["load"]["other"]))
    lines.append(row("warm p50", s["warm_p50"], None))
    lines += ["", "by hand: the same qemu-img create + QEMU command, agent answered by the "
              "script (ms):"]
    lines.append(f"{'run':<10}" + "".join(f"{h:>13}" for _, h in HAND_PHASES)
                 + f"{'other':>13}")
    for i, hand in enumerate(results["by_hand"]):
        lines.append(f"{i + 1:<10}" + "".join(f"{_f(hand.get(k)):>13}" for k, _ in HAND_PHASES)
                     + f"{hand['load']['other']:>13.0%}")
    lines.append(f"{'p50':<10}" + "".join(f"{_f(s['by_hand_p50'].get(k)):>13}"
                                          for k, _ in HAND_PHASES))
    lines.append("")
    if "overhead" in s:
        lines.append(f"supervisor overhead: ({s['warm_p50']['total']:.0f} - "
                     f"{s['by_hand_p50']['total']:.0f}) / {s['by_hand_p50']['total']:.0f} = "
                     f"{s['overhead']:.1%} (target < {TARGET_OVERHEAD:.0%}): "
                     f"{'met' if s['met'] else 'MISSED'}")
    lines.append(f"same QEMU command as the supervisor's: {results.get('same_command')}")
    lines.append(f"largest other load in a run: {s['other_load_max']:.0%}; "
                 f"load average at start {' '.join(m['loadavg'])}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser("qemu_boot.py", __doc__,
                          "Target: supervisor overhead on enqueue -> ready < 10 % of the same QEMU "
                          "run by hand.")
    parser.add_argument("--jobs", type=int, default=5,
                        help="treadmill jobs (the first is cold) and as many runs by hand")
    parser.add_argument("--accel", choices=("tcg", "kvm"), default="tcg",
                        help="qemu.accel, fixed so that the run by hand uses the same "
                             "(not auto: its KVM probe hangs on this machine's /dev/kvm)")
    options(parser, (
        ("--memory", int, QemuSettings.memory,
         "qemu.memory in MiB (default: the driver's default)"),
        ("--timeout", float, 120.0, "seconds a job or a run by hand may take"),
        ("--retry", float, 0.01, "seconds between socket connection attempts by hand"),
    ))
    parser.add_argument("--image-cache", default="~/.cache/treadmill/test-image",
                        help="tools/build-test-image --cache")
    parser.add_argument("--no-logserver", action="store_true",
                        help="no log server (the supervisor ships no console)")
    quiet_wait_option(parser, 0.15)
    output_options(parser, keep_help="keep the temporary directory (logs, cluster) for "
                   "inspection")
    args = parser.parse_args(argv)
    if not 2 <= args.jobs <= 100:
        parser.error("--jobs must be in [2, 100] (the first is cold)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if missing("qemu_boot", "qemu-system-x86_64", "qemu-img", "busybox"):
        return 2
    errors = (BenchError, ClusterError, OSError, subprocess.SubprocessError, ValueError)
    return run(Bench(args), args, table, errors, say)


if __name__ == "__main__":
    sys.exit(main())
