#!/usr/bin/env python3
"""Benchmark of the switchboard API on a real switchboard and PostgreSQL.

    .venv/bin/python tools/bench/switchboard_api.py [--duration 10] [--connections 16] [--json]

Starts a private PostgreSQL cluster (``treadmill.dev.pgcluster``, durable)
in a temporary directory, the real switchboard as its own process
(``twistd treadmill-switchboard``, as the systemd unit runs it), bootstraps
an admin token, enqueues one job and registers one host that never connects
(so that the scheduler leaves queued jobs alone), then measures:

  A  ``GET /api/v1/jobs/{id}`` at maximum throughput (wrk, closed loop),
  B  ``POST /api/v1/jobs`` (enqueue) at maximum throughput (wrk + Lua),
  C  latency at half the target rates (500 GET/s, 100 enqueues/s) with an
     open-loop fixed-rate generator (``tools/bench/openloop.py``, which
     measures from each request's scheduled time, so no coordinated omission),

with the switchboard's HTTP access log off and on (``--access-log``), and
samples the switchboard's RSS (VmRSS, VmHWM) and CPU time, and the CPU time
of the PostgreSQL server processes, through every phase. As a reference it
serves a static file of the same size as the job from nginx (one worker) with
the same wrk parameters. ``--py-spy DIR`` samples the switchboard with py-spy
during phases A and B (which perturbs them) for a profile.

Needs ``wrk`` (``apt-get install wrk``); nginx (``apt-get install nginx``) is
optional. Installs nothing. Every phase has a fixed duration, everything it
starts is stopped at the end (also on Ctrl-C), and all traffic goes to
127.0.0.1. Progress goes to standard error, the summary (or ``--json``) to
standard output. Results are recorded in ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import benchkit  # noqa: E402
from benchkit import first_line, host_info, machine_ticks, revision  # noqa: E402

from treadmill.dev.pgcluster import Cluster, ClusterError  # noqa: E402

# Targets of the issue, on a 2-core machine.
TARGET_GET_RPS = 1000.0
TARGET_ENQUEUE_RPS = 200.0
TARGET_P99_MS = 50.0
TARGET_RSS_MB = 150.0

DATABASE = "treadmill_bench"
ADMIN = "bench"
IMAGE = "sha256:" + "ab" * 32
CLK_TCK = os.sysconf("SC_CLK_TCK")
KB_MB = 1 / 1024  # VmRSS and VmHWM are in kB

# wrk's done() hook prints one machine-readable line; the text report is parsed too.
WRK_REPORT_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"connect":%.0f,"read":%.0f,' ..
    '"write":%.0f,"status":%.0f,"timeout":%.0f,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,' ..
    '"max_us":%.0f,"mean_us":%.3f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""

WRK_ENQUEUE_LUA = r"""
wrk.method = "POST"
wrk.body = '{"image": "%s", "label": "bench"}'
wrk.headers["Content-Type"] = "application/json"
""" % IMAGE + WRK_REPORT_LUA


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# -- machine ---------------------------------------------------------------------


def machine_info(cluster: Cluster | None) -> dict[str, Any]:
    postgres = "unknown"
    if cluster is not None:
        postgres = first_line([str(cluster.bindir / "postgres"), "--version"])
    return {
        **host_info(),
        "postgresql": postgres,
        "wrk": first_line(["wrk", "-v"]),
        "nginx": first_line(["nginx", "-v"]) if shutil.which("nginx") else "absent",
    }


# -- process sampling -------------------------------------------------------------


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(utime + stime, ppid) of ``pid``."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12]), int(fields[1])


def _runqueue_wait_ns(pid: int) -> int:
    """Nanoseconds the main thread of ``pid`` was runnable but waited for a CPU."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _tree_ticks(root_pid: int) -> dict[int, int]:
    """CPU ticks of ``root_pid`` and its direct children (PostgreSQL's backends)."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        info = _cpu_ticks(int(entry))
        if info is not None and (int(entry) == root_pid or info[1] == root_pid):
            found[int(entry)] = info[0]
    return found


class Monitor:
    """Samples a server's CPU time (and memory), and PostgreSQL's CPU time, through a phase.

    The server's CPU time includes its direct children (nginx's worker); its
    memory and run-queue wait are those of the process itself (the
    switchboard's reactor thread).
    """

    def __init__(self, pid: int, postmaster: int | None, memory: bool = True,
                 interval: float = 0.1):
        self.pid = pid
        self.postmaster = postmaster
        self.memory = memory
        self.interval = interval
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._start: dict[str, Any] = {}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _status_kb(self.pid, "VmRSS")
            if rss is not None:
                with self._lock:
                    self._peak = max(self._peak, rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def begin(self) -> None:
        with self._lock:
            self._peak = _status_kb(self.pid, "VmRSS") or 0
        self._start = {
            "time": time.monotonic(),
            "server": _tree_ticks(self.pid),
            "runq": _runqueue_wait_ns(self.pid),
            "machine": machine_ticks(),
            "pg": _tree_ticks(self.postmaster) if self.postmaster else {},
            "children": resource.getrusage(resource.RUSAGE_CHILDREN),
        }

    def end(self) -> dict[str, Any]:
        wall = time.monotonic() - self._start["time"]

        def delta(before: dict[int, int], after: dict[int, int]) -> float:
            return sum(t - before.get(pid, 0) for pid, t in after.items()) / CLK_TCK

        server_cpu = delta(self._start["server"], _tree_ticks(self.pid))
        runq = (_runqueue_wait_ns(self.pid) - self._start["runq"]) / 1e9
        pg_cpu = delta(self._start["pg"], _tree_ticks(self.postmaster)) \
            if self.postmaster else 0.0
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = self._start["children"]
        # The load generator is the only child of ours reaped during a phase.
        loadgen = children.ru_utime + children.ru_stime - start.ru_utime - start.ru_stime
        busy, total = machine_ticks()
        busy0, total0 = self._start["machine"]
        machine = (busy - busy0) / (total - total0) if total > total0 else None
        other = None
        if machine is not None:
            cores = len(os.sched_getaffinity(0))
            other = max(0.0, machine - (server_cpu + pg_cpu + loadgen) / (cores * wall))
        result: dict[str, Any] = {
            "wall_s": round(wall, 3),
            "server_cpu_s": round(server_cpu, 3),
            # Time the server's main (reactor) thread was ready to run but no core was free.
            "server_runq_wait_s": round(runq, 3),
            "postgres_cpu_s": round(pg_cpu, 3) if self.postmaster else None,
            "loadgen_cpu_s": round(loadgen, 3),
            # Share of all the machine's cores that were busy (any process).
            "machine_cpu_busy": None if machine is None else round(machine, 3),
            # Share of the cores used by anything but the server, PostgreSQL and the
            # load generator (other work on the machine): it skews the figures.
            "other_cpu_busy": None if other is None else round(other, 3),
        }
        if self.memory:
            rss = _status_kb(self.pid, "VmRSS") or 0
            with self._lock:
                peak = max(self._peak, rss)
            result.update({
                "rss_mb_end": round(rss * KB_MB, 1),
                "rss_mb_peak": round(peak * KB_MB, 1),
                "hwm_mb": round((_status_kb(self.pid, "VmHWM") or 0) * KB_MB, 1),
            })
        return result


# -- helpers ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, token: str | None = None, body: Any = None,
         timeout: float = 10.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, log: Path,
              timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}; see its log:\n"
                             + _tail(log))
        with contextlib.suppress(OSError):
            if http("GET", url, timeout=2)[0] == 200:
                return
        time.sleep(0.2)
    raise BenchError(f"{what} did not answer {url} within {timeout:.0f} s:\n" + _tail(log))


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
                 timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s and latency percentiles from wrk's report (and its done() line)."""
    result: dict[str, Any] = {}
    match = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if match:
        result["rps"] = float(match.group(1))
    for pct in ("50", "90", "99"):
        match = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", output, re.M)
        if match:
            result[f"p{pct}_ms"] = _ms(match.group(1))
    match = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", output, re.M)
    if match:
        result["max_ms"] = _ms(match.group(1))
    match = re.search(r"^\s+(\d+) requests in", output, re.M)
    if match:
        result["requests"] = int(match.group(1))
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["non_2xx"] = int(match.group(1)) if match else 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      output)
    result["socket_errors"] = sum(int(g) for g in match.groups()) if match else 0
    # The done() hook has exact figures; prefer them.
    match = re.search(r"^WRKJSON (\{.*\})$", output, re.M)
    if match:
        raw = json.loads(match.group(1))
        seconds = raw["duration_us"] / 1e6
        result.update({
            "requests": int(raw["requests"]),
            "rps": round(raw["requests"] / seconds, 2) if seconds else 0.0,
            "p50_ms": raw["p50_us"] / 1e3, "p90_ms": raw["p90_us"] / 1e3,
            "p99_ms": raw["p99_us"] / 1e3, "max_ms": raw["max_us"] / 1e3,
            "non_2xx": int(raw["status"]),
            "socket_errors": int(raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]),
        })
    if "rps" not in result:
        raise BenchError("could not parse wrk's output:\n" + output)
    result["ok_rps"] = round(result["rps"] * (1 - result["non_2xx"] / result["requests"]), 2) \
        if result.get("requests") else 0.0
    return result


# -- the benchmark -------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="tml-bench-"))
        os.chmod(self.tmp, 0o755)  # the postgres user must traverse it
        self.cluster: Cluster | None = None
        self.dsn = ""
        self.switchboard: subprocess.Popen[bytes] | None = None
        self.nginx: subprocess.Popen[bytes] | None = None
        self.token = ""
        self.job_id = ""
        self.job_body = b""
        self.results: dict[str, Any] = {"phases": []}
        self.get_lua = self.tmp / "report.lua"
        self.get_lua.write_text(WRK_REPORT_LUA)
        self.enqueue_lua = self.tmp / "enqueue.lua"
        self.enqueue_lua.write_text(WRK_ENQUEUE_LUA)

    # -- lifecycle ----------------------------------------------------------

    def start_database(self) -> None:
        say(f"starting PostgreSQL in {self.tmp / 'pg'}")
        self.cluster = Cluster(self.tmp / "pg", durable=True)
        self.cluster.start()
        self.cluster.create_database(DATABASE)
        self.dsn = self.cluster.dsn(DATABASE)

    def postmaster_pid(self) -> int | None:
        assert self.cluster is not None
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.cluster.data / "postmaster.pid").read_text().splitlines()[0])
        return None

    def start_switchboard(self, access_log: bool) -> str:
        port = free_port()
        log = self.tmp / f"switchboard-accesslog-{'on' if access_log else 'off'}.log"
        cmd = [str(ROOT / ".venv/bin/twistd"), "--nodaemon", "--pidfile="]
        if self.args.logger:
            cmd.append(f"--logger={self.args.logger}")
        cmd += ["treadmill-switchboard", "--database-dsn", self.dsn,
                "--capabilities-signing-key", str(self.tmp / "key.pem"),
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--http-access-log", "true" if access_log else "false",
                *self.args.switchboard_arg]
        say(f"starting the switchboard (access log {'on' if access_log else 'off'}) "
            f"on 127.0.0.1:{port}")
        with log.open("wb") as out:
            self.switchboard = subprocess.Popen(
                cmd, cwd=self.tmp, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", self.switchboard, "the switchboard", log)
        return url

    def stop_switchboard(self) -> None:
        stop_process(self.switchboard)
        self.switchboard = None

    def bootstrap(self, url: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "treadmill.switchboard.bootstrap", "--database-dsn", self.dsn,
             "--admin", ADMIN], capture_output=True, text=True, timeout=60, cwd=ROOT,
            check=False)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise BenchError(f"bootstrap failed ({proc.returncode}): {proc.stderr.strip()}")
        self.token = lines[-1].strip()
        status, body = http("POST", url + "/api/v1/jobs", self.token, {"image": IMAGE})
        if status != 201:
            raise BenchError(f"enqueue answered {status}: {body[:300]!r}")
        self.job_id = json.loads(body)["id"]
        say(f"enqueued job {self.job_id}")
        # A registered host that never connects: queued jobs are then runnable in
        # principle, so the scheduler leaves them queued instead of expiring them
        # as unrunnable (scheduler.unrunnable_grace) in the middle of a phase.
        status, body = http("POST", url + "/api/v1/hosts", self.token,
                            {"name": "bench-offline", "description": "never connects"})
        if status != 201:
            raise BenchError(f"creating a host answered {status}: {body[:300]!r}")

    def check(self, url: str) -> None:
        status, body = http("GET", f"{url}/api/v1/jobs/{self.job_id}", self.token)
        if status != 200:
            raise BenchError(f"GET job answered {status}: {body[:300]!r}")
        self.job_body = body

    def start_nginx(self) -> str | None:
        if self.args.no_nginx:
            say("nginx reference skipped (--no-nginx)")
            return None
        binary = shutil.which("nginx")
        if binary is None:
            say("nginx not found: the reference was skipped (apt-get install nginx)")
            return None
        base = self.tmp / "nginx"
        www = base / "www"
        target = www / "api/v1/jobs" / self.job_id
        target.parent.mkdir(parents=True)
        target.write_bytes(self.job_body)  # the same bytes as the job's GET response
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (base / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        port = free_port()
        conf = base / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type application/json;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {base}/tmp/body;
    proxy_temp_path {base}/tmp/proxy;
    fastcgi_temp_path {base}/tmp/fastcgi;
    uwsgi_temp_path {base}/tmp/uwsgi;
    scgi_temp_path {base}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {www};
        location / {{ add_header Cache-Control no-store; }}
    }}
}}
""")
        log = base / "nginx.out"
        say(f"starting nginx (1 worker) on 127.0.0.1:{port}")
        with log.open("wb") as out:
            self.nginx = subprocess.Popen(
                [binary, "-p", str(base), "-e", str(base / "error.log"), "-c", str(conf),
                 "-g", "daemon off;"], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/api/v1/jobs/{self.job_id}", self.nginx, "nginx", base / "error.log",
                  timeout=20)
        return url

    def stop_nginx(self) -> None:
        stop_process(self.nginx, signal.SIGQUIT)
        self.nginx = None

    def cleanup(self) -> None:
        for step in (self.stop_switchboard, self.stop_nginx):
            with contextlib.suppress(Exception):
                step()
        if self.cluster is not None:
            try:
                self.cluster.stop()
            except ClusterError as e:
                say(f"could not stop PostgreSQL: {e}")
        if self.args.keep_temp:
            say(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- phases ---------------------------------------------------------------

    def wrk(self, url: str, lua: Path, duration: float) -> dict[str, Any]:
        a = self.args
        cmd = ["wrk", f"-t{a.threads}", f"-c{a.connections}", f"-d{duration:g}s", "--latency",
               "--timeout", "10s", "-s", str(lua), "-H", f"Authorization: Bearer {self.token}",
               url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60,
                              check=False, start_new_session=True)
        if proc.returncode != 0:
            raise BenchError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()}")
        return parse_wrk(proc.stdout)

    def openloop(self, url: str, rate: float, body: str | None) -> dict[str, Any]:
        a = self.args
        cmd = [sys.executable, str(BENCH / "openloop.py"), "--url", url, "--rate", f"{rate:g}",
               "--duration", f"{a.duration:g}", "--connections", str(a.openloop_connections),
               "-H", f"Authorization: Bearer {self.token}"]
        if body is not None:
            cmd += ["--method", "POST", "--body", body]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.duration + 60,
                              check=False, start_new_session=True)
        if proc.returncode != 0:
            raise BenchError(f"openloop failed ({proc.returncode}): {proc.stderr.strip()}")
        raw = json.loads(proc.stdout)
        lat = raw["latency_ms"]
        return {"rps": raw["rate_achieved"], "ok_rps": raw["rate_achieved"],
                "requests": raw["completed"], "p50_ms": lat["p50"], "p90_ms": lat["p90"],
                "p99_ms": lat["p99"], "max_ms": lat["max"],
                "non_2xx": raw["completed"] - raw["ok"],
                "socket_errors": sum(raw["errors"].values()) + raw["unfinished"],
                "openloop": raw}

    def profile(self, server: str, kind: str, pid: int | None
                ) -> subprocess.Popen[bytes] | None:
        """With ``--py-spy DIR``: sample the switchboard through a max-throughput phase."""
        a = self.args
        if not a.py_spy or pid is None or not kind.endswith("_max"):
            return None
        py_spy = shutil.which("py-spy") or str(ROOT / ".venv/bin/py-spy")
        if not Path(py_spy).exists():
            raise BenchError("--py-spy needs py-spy (pip install py-spy)")
        out = Path(a.py_spy).absolute()
        out.mkdir(parents=True, exist_ok=True)
        name = f"{kind}-accesslog-{server.rsplit(' ', 1)[-1]}"
        self.results.setdefault("profiles", []).append(str(out / f"{name}.txt"))
        return subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
             "--duration", f"{a.duration:.0f}", "--output", str(out / f"{name}.txt")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(out / f"{name}.log").open("wb"), start_new_session=True)

    def phase(self, server: str, name: str, kind: str, run: Any, pid: int | None,
              postmaster: int | None) -> dict[str, Any]:
        say(f"{server}: {name} ...")
        memory = server.startswith("switchboard")
        monitor = Monitor(pid, postmaster, memory) if pid is not None else None
        profiler = self.profile(server, kind, pid)
        try:
            if monitor:
                monitor.begin()
            result = run()
            usage = monitor.end() if monitor else {}
        finally:
            if monitor:
                monitor.stop()
            if profiler is not None:
                stop_process(profiler, signal.SIGINT, timeout=30)
        requests = result.get("requests") or 0
        ok = requests - (result.get("non_2xx") or 0)
        if usage and ok:
            # CPU seconds per 1000 requests = CPU milliseconds per request.
            usage["server_cpu_s_per_1k"] = round(usage["server_cpu_s"] / ok * 1000, 3)
            if usage.get("postgres_cpu_s") is not None:
                usage["postgres_cpu_s_per_1k"] = round(usage["postgres_cpu_s"] / ok * 1000, 3)
        entry = {"server": server, "phase": name, "kind": kind, **result, **usage}
        say(f"  {entry['rps']:.0f} req/s, p50 {entry['p50_ms']:.2f} ms, "
            f"p99 {entry['p99_ms']:.2f} ms, errors {entry['non_2xx'] + entry['socket_errors']}"
            + (f", server CPU {usage['server_cpu_s']:.1f} s" if usage else "")
            + (f", RSS peak {usage['rss_mb_peak']:.1f} MB" if "rss_mb_peak" in usage else ""))
        self.results["phases"].append(entry)
        return entry

    def run_switchboard(self, access_log: bool) -> None:
        a = self.args
        url = self.start_switchboard(access_log)
        server = f"switchboard, access log {'on' if access_log else 'off'}"
        try:
            if not self.token:
                self.bootstrap(url)
            self.check(url)
            assert self.switchboard is not None
            pid, pg = self.switchboard.pid, self.postmaster_pid()
            job_url = f"{url}/api/v1/jobs/{self.job_id}"
            if a.warmup > 0:
                say(f"{server}: warm-up {a.warmup:g} s")
                self.wrk(job_url, self.get_lua, a.warmup)
            self.phase(server, "A GET max", "get_max",
                       lambda: self.wrk(job_url, self.get_lua, a.duration), pid, pg)
            self.phase(server, "B enqueue max", "enqueue_max",
                       lambda: self.wrk(f"{url}/api/v1/jobs", self.enqueue_lua, a.duration),
                       pid, pg)
            if not a.no_openloop:
                self.phase(server, f"C GET @{a.get_rate:g}/s", "get_rate",
                           lambda: self.openloop(job_url, a.get_rate, None), pid, pg)
                self.phase(server, f"C enqueue @{a.enqueue_rate:g}/s", "enqueue_rate",
                           lambda: self.openloop(f"{url}/api/v1/jobs", a.enqueue_rate,
                                                 json.dumps({"image": IMAGE, "label": "bench"})),
                           pid, pg)
            hwm = _status_kb(pid, "VmHWM") or 0
            self.results.setdefault("switchboard_hwm_mb", {})[
                "on" if access_log else "off"] = round(hwm * KB_MB, 1)
        finally:
            self.stop_switchboard()

    def run_nginx(self) -> None:
        a = self.args
        url = self.start_nginx()
        if url is None:
            return
        try:
            job_url = f"{url}/api/v1/jobs/{self.job_id}"
            if a.warmup > 0:
                self.wrk(job_url, self.get_lua, a.warmup)
            assert self.nginx is not None
            pid = self.nginx.pid
            self.phase("nginx static file", "A GET max", "get_max",
                       lambda: self.wrk(job_url, self.get_lua, a.duration), pid, None)
            if not a.no_openloop:
                self.phase("nginx static file", f"C GET @{a.get_rate:g}/s", "get_rate",
                           lambda: self.openloop(job_url, a.get_rate, None), pid, None)
        finally:
            self.stop_nginx()

    def run(self) -> dict[str, Any]:
        a = self.args
        busy0, total0 = machine_ticks()
        time.sleep(2)
        busy1, total1 = machine_ticks()
        ambient = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        self.results["ambient_cpu_busy"] = round(ambient, 3)
        if ambient > 0.1:
            say(f"warning: the machine was {ambient:.0%} busy before the benchmark started; "
                "other load skews the figures")
        self.start_database()
        self.results["machine"] = machine_info(self.cluster)
        self.results["parameters"] = {
            "duration_s": a.duration, "connections": a.connections, "threads": a.threads,
            "warmup_s": a.warmup, "get_rate": a.get_rate, "enqueue_rate": a.enqueue_rate,
            "openloop_connections": a.openloop_connections, "logger": a.logger,
            "switchboard_args": a.switchboard_arg, "postgresql_durable": True}
        self.results["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.results["revision"] = revision(ROOT)
        variants = {"off": [False], "on": [True], "both": [False, True]}[a.access_log]
        for access_log in variants:
            self.run_switchboard(access_log)
        self.results["job_response_bytes"] = len(self.job_body)
        self.run_nginx()
        self.results["verdicts"] = verdicts(self.results)
        return self.results


# -- report ----------------------------------------------------------------------------


def _find(results: dict[str, Any], server: str, kind: str) -> dict[str, Any] | None:
    for entry in results["phases"]:
        if entry["server"] == server and entry["kind"] == kind:
            return entry
    return None


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    servers = sorted({e["server"] for e in results["phases"] if e["server"].startswith("switch")})
    for server in servers:
        checks = [
            ("get_max", "ok_rps", ">=", TARGET_GET_RPS, "authenticated GETs/s"),
            ("enqueue_max", "ok_rps", ">=", TARGET_ENQUEUE_RPS, "enqueues/s"),
            ("get_rate", "p99_ms", "<", TARGET_P99_MS, "GET p99 ms at 500/s"),
            ("enqueue_rate", "p99_ms", "<", TARGET_P99_MS, "enqueue p99 ms at 100/s"),
        ]
        for kind, key, op, target, what in checks:
            entry = _find(results, server, kind)
            if entry is None or entry.get(key) is None:
                continue
            value = entry[key]
            met = value >= target if op == ">=" else value < target
            if kind.endswith("_rate") and entry.get("openloop"):
                # A latency target only counts if the rate was actually sustained.
                met = met and entry["ok_rps"] >= 0.95 * entry["openloop"]["rate_target"]
            out.append({"server": server, "target": f"{what} {op} {target:g}",
                        "value": value, "met": met})
        hwm = results.get("switchboard_hwm_mb", {}).get(server.rsplit(" ", 1)[-1])
        if hwm is not None:
            out.append({"server": server, "target": f"peak RSS MB < {TARGET_RSS_MB:g}",
                        "value": hwm, "met": hwm < TARGET_RSS_MB})
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        width = re.match(r"\d*", spec).group()  # type: ignore[union-attr]
        return "-".rjust(int(width or 0))
    return format(value, spec)


def table(results: dict[str, Any]) -> str:
    p = results["parameters"]
    m = results["machine"]
    lines = [
        f"Switchboard API benchmark: {m['nproc']} cores ({m['cpu_model']}), "
        f"{m['postgresql']}, Python {m['python']}; revision {results.get('revision')}, "
        f"started {results.get('started')}",
        f"wrk -t{p['threads']} -c{p['connections']} -d{p['duration_s']:g}s; open loop: "
        f"{p['openloop_connections']} connections, {p['duration_s']:g} s; "
        f"job response {results.get('job_response_bytes')} bytes; machine "
        f"{results.get('ambient_cpu_busy', 0):.0%} busy before the start",
        "",
    ]
    header = (f"{'server':<31} {'phase':<18} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'max ms':>7} {'errors':>6} {'srvCPU':>6} {'pg CPU':>6} {'sb on':>5} "
              f"{'sb':>5} {'CPUs':>5} {'other':>5} {'RSS':>6}")
    units = (f"{'':<31} {'':<18} {'':>7} {'':>7} {'':>7} {'':>7} {'':>6} {'ms/req':>6} "
             f"{'ms/req':>6} {'CPU':>5} {'runq':>5} {'busy':>5} {'load':>5} {'MB':>6}")
    lines += [header, units, "-" * len(header)]
    for e in results["phases"]:
        wall = e.get("wall_s")
        sb = e["server"].startswith("switchboard")
        on_cpu = e["server_cpu_s"] / wall if wall and sb else None
        runq = e["server_runq_wait_s"] / wall if wall and sb else None
        lines.append(
            f"{e['server']:<31} {e['phase']:<18} {e['ok_rps']:>7.0f} {_fmt(e['p50_ms'], '7.2f')} "
            f"{_fmt(e['p99_ms'], '7.2f')} {_fmt(e['max_ms'], '7.1f')} "
            f"{e['non_2xx'] + e['socket_errors']:>6} "
            f"{_fmt(e.get('server_cpu_s_per_1k'), '6.3f')} "
            f"{_fmt(e.get('postgres_cpu_s_per_1k'), '6.3f')} "
            f"{_fmt(on_cpu, '5.0%')} {_fmt(runq, '5.0%')} "
            f"{_fmt(e.get('machine_cpu_busy'), '5.0%')} {_fmt(e.get('other_cpu_busy'), '5.0%')} "
            f"{_fmt(e.get('rss_mb_peak'), '6.1f')}")
    lines += [
        "",
        "srvCPU / pg CPU: CPU time of the server (the switchboard, or nginx's master and "
        "worker) /",
        "of PostgreSQL's processes, per successful request (= CPU s per 1000 requests). "
        "sb on CPU, sb runq: share of",
        "the phase the switchboard's reactor thread ran / waited for a free core. "
        "CPUs busy: the whole machine.",
        "other load: share of the cores used by anything but the server, PostgreSQL and the "
        "load generator",
        "(other processes, and kernel time charged to no process, e.g. loopback softirqs).",
    ]
    for e in results["phases"]:
        if (e.get("other_cpu_busy") or 0) > 0.15:
            lines.append(f"warning: {e['server']}, {e['phase']}: other processes used "
                         f"{e['other_cpu_busy']:.0%} of the machine; these figures are skewed")
        lag = e.get("openloop", {}).get("dispatch_lag_ms", {}).get("p99")
        if lag is not None and lag > 5:
            lines.append(f"warning: {e['server']}, {e['phase']}: the load generator itself "
                         f"was late (dispatch lag p99 {lag:.1f} ms)")
    lines.append("")
    ours = [e for e in results["phases"] if e["kind"] == "get_max"
            and e["server"].startswith("switchboard")]
    ref = _find(results, "nginx static file", "get_max")
    if ref and ref["ok_rps"]:
        for e in ours:
            lines.append(f"GET req/s, {e['server']} / nginx: {e['ok_rps'] / ref['ok_rps']:.3f} "
                         f"({e['ok_rps']:.0f} / {ref['ok_rps']:.0f})")
    else:
        lines.append("nginx reference: skipped")
    for server, hwm in sorted(results.get("switchboard_hwm_mb", {}).items()):
        lines.append(f"switchboard peak RSS (VmHWM), access log {server}: {hwm:.1f} MB")
    lines += ["", "Targets (2-core machine):"]
    for v in results["verdicts"]:
        lines.append(f"  {'met   ' if v['met'] else 'MISSED'}  {v['server']:<31} "
                     f"{v['target']:<28} measured {v['value']:g}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/bench/switchboard_api.py", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Targets on 2 cores: >= 1000 GET/s, >= 200 enqueues/s, p99 < 50 ms at "
               "500 GET/s and 100 enqueues/s, RSS < 150 MB.")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of unrecorded load before phase A (0: none)")
    parser.add_argument("--get-rate", type=float, default=TARGET_GET_RPS / 2,
                        help="GET/s of the open-loop phase")
    parser.add_argument("--enqueue-rate", type=float, default=TARGET_ENQUEUE_RPS / 2,
                        help="enqueues/s of the open-loop phase")
    parser.add_argument("--openloop-connections", type=int, default=16)
    parser.add_argument("--access-log", choices=("off", "on", "both"), default="both",
                        help="run the switchboard with its HTTP access log off, on, or both")
    parser.add_argument("--logger", default="treadmill.common.logging.text",
                        help="twistd --logger, as in the systemd unit ('' for twistd's default)")
    parser.add_argument("--switchboard-arg", action="append", default=[],
                        help="extra option for treadmill-switchboard (repeatable), "
                             "e.g. --switchboard-arg=--database-pool-size=8")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx reference")
    parser.add_argument("--no-openloop", action="store_true", help="skip phase C")
    parser.add_argument("--py-spy", metavar="DIR",
                        help="sample the switchboard with py-spy (collapsed stacks in DIR) "
                             "during phases A and B; the sampling perturbs those figures")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--json-out", metavar="FILE",
                        help="also write the JSON results to FILE")
    parser.add_argument("--keep-temp", action="store_true",
                        help="keep the temporary directory (logs, cluster) for inspection")
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 300 and 0 <= args.warmup <= 60):
        parser.error("--duration must be in (0, 300] and --warmup in [0, 60]")
    if not (1 <= args.connections <= 1000 and 1 <= args.threads <= args.connections):
        parser.error("--connections must be in [1, 1000], --threads in [1, connections]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("switchboard_api: wrk is not installed; install it with: apt-get install wrk",
              file=sys.stderr)
        return 2
    if not (ROOT / ".venv/bin/twistd").exists():
        print("switchboard_api: .venv/bin/twistd not found; run tools/setup-env first",
              file=sys.stderr)
        return 2

    errors = (BenchError, ClusterError, OSError, subprocess.SubprocessError)
    return benchkit.run(Bench(args), args, table, errors, say)


if __name__ == "__main__":
    sys.exit(main())
