#!/usr/bin/env python3
"""Benchmark of the switchboard API on a real switchboard and PostgreSQL.

    .venv/bin/python tools/bench/switchboard_api.py [--duration 10] [--connections 16] [--json]

What it starts, measures and prints, and its options: ``tools/bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchkit import cli, daemons
from benchkit.host import ambient, first_line, host_info, stamp
from benchkit.procfs import KB_MB, Monitor, status_kb
from benchkit.procs import ROOT, free_port, http, py_spy_record, stop_process
from benchkit.report import WRK_REPORT_LUA, cell, headline, verdict_lines, wrk

from treadmill.dev.pgcluster import ClusterError

BENCH = Path(__file__).resolve().parent

# Targets of the issue, on a 2-core machine.
TARGET_GET_RPS = 1000.0
TARGET_ENQUEUE_RPS = 200.0
TARGET_P99_MS = 50.0
TARGET_RSS_MB = 150.0

IMAGE = "sha256:" + "ab" * 32

WRK_ENQUEUE_LUA = r"""
wrk.method = "POST"
wrk.body = '{"image": "%s", "label": "bench"}'
wrk.headers["Content-Type"] = "application/json"
""" % IMAGE + WRK_REPORT_LUA


say = cli.sayer()


def machine_info(db: daemons.Postgres | None) -> dict[str, Any]:
    return {
        **host_info(),
        "postgresql": db.version() if db is not None else "unknown",
        "wrk": first_line(["wrk", "-v"]),
        "nginx": first_line(["nginx", "-v"]) if shutil.which("nginx") else "absent",
    }


# -- the benchmark -------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = daemons.temp_dir("tml-bench-")
        self.db: daemons.Postgres | None = None
        self.switchboard: subprocess.Popen[bytes] | None = None
        self.nginx: daemons.Nginx | None = None
        self.token = ""
        self.job_id = ""
        self.job_body = b""
        self.results: dict[str, Any] = {"phases": []}
        self.get_lua = self.tmp / "report.lua"
        self.get_lua.write_text(WRK_REPORT_LUA)
        self.enqueue_lua = self.tmp / "enqueue.lua"
        self.enqueue_lua.write_text(WRK_ENQUEUE_LUA)

    # -- lifecycle ----------------------------------------------------------

    def start_switchboard(self, access_log: bool) -> str:
        assert self.db is not None
        port = free_port()
        on = "on" if access_log else "off"
        cmd = daemons.twistd("treadmill-switchboard", "--database-dsn", self.db.dsn,
                     "--capabilities-signing-key", str(self.tmp / "key.pem"),
                     "--listen", f"tcp:{port}:interface=127.0.0.1",
                     "--http-access-log", "true" if access_log else "false",
                     *self.args.switchboard_arg, logger=self.args.logger)
        say(f"starting the switchboard (access log {on}) on 127.0.0.1:{port}")
        url = f"http://127.0.0.1:{port}"
        self.switchboard = daemons.start_daemon(cmd, self.tmp / f"switchboard-accesslog-{on}.log",
                                        url + "/healthz", "the switchboard")
        return url

    def stop_switchboard(self) -> None:
        stop_process(self.switchboard)
        self.switchboard = None

    def bootstrap(self, url: str) -> None:
        assert self.db is not None
        self.token = daemons.bootstrap("--database-dsn", self.db.dsn)
        status, body = http("POST", url + "/api/v1/jobs", self.token, {"image": IMAGE})
        if status != 201:
            raise cli.BenchError(f"enqueue answered {status}: {body[:300]!r}")
        self.job_id = json.loads(body)["id"]
        say(f"enqueued job {self.job_id}")
        # A registered host that never connects: queued jobs are then runnable in
        # principle, so the scheduler leaves them queued instead of expiring them
        # as unrunnable (scheduler.unrunnable_grace) in the middle of a phase.
        status, body = http("POST", url + "/api/v1/hosts", self.token,
                            {"name": "bench-offline", "description": "never connects"})
        if status != 201:
            raise cli.BenchError(f"creating a host answered {status}: {body[:300]!r}")

    def check(self, url: str) -> None:
        status, body = http("GET", f"{url}/api/v1/jobs/{self.job_id}", self.token)
        if status != 200:
            raise cli.BenchError(f"GET job answered {status}: {body[:300]!r}")
        self.job_body = body

    def start_nginx(self) -> str | None:
        if not daemons.Nginx.available(self.args.no_nginx, say):
            return None
        www = self.tmp / "nginx" / "www"
        target = www / "api/v1/jobs" / self.job_id
        target.parent.mkdir(parents=True)
        target.write_bytes(self.job_body)  # the same bytes as the job's GET response
        self.nginx = daemons.Nginx(self.tmp / "nginx", www, f"/api/v1/jobs/{self.job_id}",
                           "application/json", say)
        return self.nginx.url

    def stop_nginx(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        self.nginx = None

    def cleanup(self) -> None:
        for step in (self.stop_switchboard, self.stop_nginx):
            with contextlib.suppress(Exception):
                step()
        if self.db is not None:
            self.db.stop()
        daemons.remove_temp(self.tmp, self.args.keep_temp, say)

    # -- phases ---------------------------------------------------------------

    def wrk(self, url: str, lua: Path, duration: float) -> dict[str, Any]:
        a = self.args
        return wrk(url, lua, duration, a.threads, a.connections, self.token)

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
            raise cli.BenchError(f"openloop failed ({proc.returncode}): {proc.stderr.strip()}")
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
        proc, out = py_spy_record(pid, a.py_spy, f"{kind}-accesslog-{server.rsplit(' ', 1)[-1]}",
                                  "--rate", "200", "--duration", f"{a.duration:.0f}")
        self.results.setdefault("profiles", []).append(out)
        return proc

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
            assert self.db is not None
            pid, pg = self.switchboard.pid, self.db.postmaster_pid()
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
            hwm = status_kb(pid, "VmHWM") or 0
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
            pid = self.nginx.proc.pid
            self.phase("nginx static file", "A GET max", "get_max",
                       lambda: self.wrk(job_url, self.get_lua, a.duration), pid, None)
            if not a.no_openloop:
                self.phase("nginx static file", f"C GET @{a.get_rate:g}/s", "get_rate",
                           lambda: self.openloop(job_url, a.get_rate, None), pid, None)
        finally:
            self.stop_nginx()

    def run(self) -> dict[str, Any]:
        a = self.args
        self.results["ambient_cpu_busy"] = round(ambient(say), 3)
        self.db = daemons.Postgres(self.tmp / "pg", say)
        stamp(self.results, machine_info(self.db), {
            "duration_s": a.duration, "connections": a.connections, "threads": a.threads,
            "warmup_s": a.warmup, "get_rate": a.get_rate, "enqueue_rate": a.enqueue_rate,
            "openloop_connections": a.openloop_connections, "logger": a.logger,
            "switchboard_args": a.switchboard_arg, "postgresql_durable": True}, ROOT)
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


def table(results: dict[str, Any]) -> str:
    p = results["parameters"]
    lines = [
        headline("Switchboard API benchmark", results, f"{results['machine']['postgresql']}, ",
                 "; "),
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
            f"{e['server']:<31} {e['phase']:<18} {e['ok_rps']:>7.0f} {cell(e['p50_ms'], '7.2f')} "
            f"{cell(e['p99_ms'], '7.2f')} {cell(e['max_ms'], '7.1f')} "
            f"{e['non_2xx'] + e['socket_errors']:>6} "
            f"{cell(e.get('server_cpu_s_per_1k'), '6.3f')} "
            f"{cell(e.get('postgres_cpu_s_per_1k'), '6.3f')} "
            f"{cell(on_cpu, '5.0%')} {cell(runq, '5.0%')} "
            f"{cell(e.get('machine_cpu_busy'), '5.0%')} {cell(e.get('other_cpu_busy'), '5.0%')} "
            f"{cell(e.get('rss_mb_peak'), '6.1f')}")
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
    lines += ["", "Targets (2-core machine):",
              *verdict_lines(results["verdicts"], 28, server=True)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.bench_parser("switchboard_api.py", __doc__,
                          "Targets on 2 cores: >= 1000 GET/s, >= 200 enqueues/s, p99 < 50 ms at "
                          "500 GET/s and 100 enqueues/s, RSS < 150 MB.")
    cli.options(parser, (
        ("--duration", float, 10.0, "seconds per phase"),
        ("--connections", int, 16, "wrk connections"),
        ("--threads", int, 2, "wrk threads"),
        ("--warmup", float, 2.0, "seconds of unrecorded load before phase A (0: none)"),
        ("--get-rate", float, TARGET_GET_RPS / 2, "GET/s of the open-loop phase"),
        ("--enqueue-rate", float, TARGET_ENQUEUE_RPS / 2, "enqueues/s of the open-loop phase"),
        ("--openloop-connections", int, 16, None),
    ))
    parser.add_argument("--access-log", choices=("off", "on", "both"), default="both",
                        help="run the switchboard with its HTTP access log off, on, or both")
    parser.add_argument("--switchboard-arg", action="append", default=[],
                        help="extra option for treadmill-switchboard (repeatable), "
                             "e.g. --switchboard-arg=--database-pool-size=8")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx reference")
    parser.add_argument("--no-openloop", action="store_true", help="skip phase C")
    cli.daemon_options(parser, "the switchboard during phases A and B", tmpdir=False)
    cli.output_options(parser)
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 300 and 0 <= args.warmup <= 60):
        parser.error("--duration must be in (0, 300] and --warmup in [0, 60]")
    if not (1 <= args.connections <= 1000 and 1 <= args.threads <= args.connections):
        parser.error("--connections must be in [1, 1000], --threads in [1, connections]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if cli.missing("switchboard_api", "wrk"):
        return 2
    errors = (cli.BenchError, ClusterError, OSError, subprocess.SubprocessError)
    return cli.run(Bench(args), args, table, errors, say)


if __name__ == "__main__":
    sys.exit(main())
