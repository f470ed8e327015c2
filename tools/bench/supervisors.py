#!/usr/bin/env python3
"""Benchmark: a fleet of mock supervisors on one switchboard, and its reconnect storm.

    .venv/bin/python tools/bench/supervisors.py [--supervisors 1000] [--rate 20] \
        [--duration 60] [--json]

What it starts, measures and prints, and its options: ``tools/bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from benchkit import procfs
from benchkit.api import (
    ACTIVE_STATES,
    APIError,
    Client,
    PacedEnqueuer,
    enqueue_many,
    epoch,
    hosts,
    job_body,
    job_events,
    list_jobs,
    metric,
)
from benchkit.cli import BenchError, bench_parser, missing, options, output_options, run, sayer
from benchkit.daemons import Postgres, bootstrap, remove_temp, start_daemon, temp_dir, twistd
from benchkit.host import host_info, machine_ticks, quiet_wait_option, revision, wait_quiet
from benchkit.procs import ROOT, Profiler, free_port, py_spy, spawn, stop_process
from benchkit.report import cell as _f
from benchkit.report import percentiles

from treadmill.dev.pgcluster import ClusterError

BENCH = Path(__file__).resolve().parent

# Targets of the issue (reference deployment: one switchboard on a 256 MB machine).
TARGET_SUPERVISORS = 1000
TARGET_RATE = 20.0
TARGET_RSS_MB = 256.0
TARGET_DISPATCH_P99_MS = 100.0
TARGET_STORM_S = 30.0

IMAGE = "sha256:" + "cd" * 32
TAGS = ["mock"]
PREFIX = "fleet-"
PHASES = ("steady", "burst", "kill", "term")


say = sayer(clock=True)


def since(t0: float) -> float:
    return round(time.time() - t0, 2)


class Span:
    """CPU of PostgreSQL, of the machine and of this process (and its children) over a phase."""

    def __init__(self, bench: Bench):
        self.bench = bench
        self.t0 = time.time()
        self.pg0 = procfs.tree_ticks(bench.postmaster_pid())
        self.machine0 = machine_ticks()
        self.self0 = _rusage()

    def end(self, t1: float | None = None) -> dict[str, Any]:
        t1 = t1 if t1 is not None else time.time()
        wall = max(1e-6, time.time() - self.t0)
        pg = procfs.ticks_delta(self.pg0, procfs.tree_ticks(self.bench.postmaster_pid()))
        busy, total = machine_ticks()
        busy0, total0 = self.machine0
        sampler = self.bench.sampler
        assert sampler is not None
        out = {
            "wall_s": round(t1 - self.t0, 2),
            "switchboard": sampler.window("switchboard", self.t0, t1),
            "fleet": sampler.window("fleet", self.t0, t1),
            "postgres_cpu_pct": round(100 * pg / wall, 1),
            "bench_cpu_pct": round(100 * (_rusage() - self.self0) / wall, 1),
            # Share of all the machine's cores busy with anything (100 = every core).
            "machine_busy_pct": round(100 * (busy - busy0) / (total - total0), 1)
            if total > total0 else None,
        }
        # Cores used by anything else (other processes, interrupts), in % of one core.
        if out["machine_busy_pct"] is not None:
            ours = sum(x or 0 for x in (out["switchboard"]["cpu_pct"], out["fleet"]["cpu_pct"],
                                        out["postgres_cpu_pct"], out["bench_cpu_pct"]))
            cores = len(os.sched_getaffinity(0))
            out["other_cpu_pct"] = round(max(0.0, out["machine_busy_pct"] * cores - ours), 1)
        return out


def _rusage() -> float:
    import resource

    return procfs.rusage_cpu() + procfs.rusage_cpu(resource.RUSAGE_CHILDREN)


def nofile_limits() -> dict[str, int]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft": soft, "hard": hard}


def machine_info(db: Postgres) -> dict[str, Any]:
    somaxconn = None
    with contextlib.suppress(OSError, ValueError):
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    return {**host_info(), "postgresql": db.version(), "somaxconn": somaxconn,
            "nofile": nofile_limits()}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.n = args.supervisors
        self.tmp = temp_dir("tml-fleet-bench-")
        self.python = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() \
            else sys.executable
        self.db: Postgres | None = None
        self.port = free_port()
        self.metrics_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.switchboard: subprocess.Popen[bytes] | None = None
        self.switchboard_starts = 0
        self.fleet: subprocess.Popen[bytes] | None = None
        self.fleet_reports: list[tuple[float, dict[str, int]]] = []
        self.fleet_provisioned: float | None = None
        self._fleet_lock = threading.Lock()
        self.token = ""
        self.client: Client | None = None
        self.sampler: procfs.Sampler | None = None
        self.pg_memory: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self.profiler = Profiler(args.py_spy, self.results)
        self.keep = False

    # -- processes ----------------------------------------------------------------------

    def passes(self) -> float:
        """Scheduling passes the switchboard ran so far, with or without the lock."""
        return (metric(self.metrics_port, "treadmill_scheduler_passes_total")
                + metric(self.metrics_port, "treadmill_scheduler_lock_busy_total"))

    def postmaster_pid(self) -> int | None:
        return self.db.postmaster_pid() if self.db is not None else None

    def listen_endpoint(self) -> str:
        endpoint = f"tcp:{self.port}:interface=127.0.0.1"
        if self.args.backlog:
            endpoint += f":backlog={self.args.backlog}"
        return endpoint

    def switchboard_cmd(self) -> list[str]:
        assert self.db is not None
        return twistd("treadmill-switchboard", "--database-dsn", self.db.dsn,
                      "--capabilities-signing-key", str(self.tmp / "key.pem"),
                      "--listen", self.listen_endpoint(), "--http-access-log", "false",
                      "--metrics-listen", f"tcp:{self.metrics_port}:interface=127.0.0.1",
                      *self.args.switchboard_arg)

    def start_switchboard(self) -> tuple[float, float]:
        """Start the switchboard; (spawn time, time /healthz first answered)."""
        self.switchboard_starts += 1
        log = self.tmp / f"switchboard-{self.switchboard_starts}.log"
        spawned = time.time()
        self.switchboard = start_daemon(self.switchboard_cmd(), log, self.url + "/healthz",
                                        "the switchboard",
                                        level=self.args.switchboard_log_level, interval=0.05)
        return spawned, time.time()

    def bootstrap(self) -> None:
        assert self.db is not None
        self.token = bootstrap("--database-dsn", self.db.dsn)
        self.client = Client(self.url, self.token)

    def start_fleet(self) -> None:
        a = self.args
        runner = [str(BENCH / "fleet_nodelay.py")] if a.what_if_nodelay else \
            ["-m", "treadmill.dev.fleet"]
        tags = [arg for tag in TAGS for arg in ("--tag", tag)]
        cmd = [self.python, *runner, "--url", self.url,
               "--count", str(self.n), "--prefix", PREFIX, *tags,
               "--state", str(self.tmp / "fleet"), "--report-interval", "1",
               "--mock-run-time", f"{a.run_time:g}"]
        for stage in ("starting", "fetching-image", "allocating", "provisioning", "booting"):
            cmd += [f"--mock-stages-{stage}", f"{a.stage_time:g}"]
        if not a.fleet_fsync:
            cmd.append("--no-fsync")
        cmd += a.fleet_arg
        env = dict(os.environ, TREADMILL_TOKEN=self.token)
        log = self.tmp / "fleet.log"
        self.fleet = spawn(cmd, log, cwd=self.tmp, env=env, stdout_pipe=True)
        threading.Thread(target=self._read_fleet, args=(self.fleet, log), daemon=True,
                         name="fleet-reader").start()

    def _read_fleet(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        assert proc.stdout is not None
        with log.open("ab") as out:
            for raw in proc.stdout:
                out.write(raw)
                out.flush()
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("fleet:"):
                    continue
                if "Ctrl-C stops" in line:  # printed once every host is provisioned
                    self.fleet_provisioned = time.time()
                    continue
                fields = {}
                for word in line.split():
                    key, sep, value = word.partition("=")
                    if sep and value.isdigit():
                        fields[key] = int(value)
                with self._fleet_lock:
                    self.fleet_reports.append((time.time(), fields))

    def fleet_first(self, t0: float, key: str, value: int) -> float | None:
        """The first fleet report after t0 with ``key >= value``."""
        with self._fleet_lock:
            for t, fields in self.fleet_reports:
                if t >= t0 and fields.get(key, -1) >= value:
                    return t
        return None

    def profile(self, name: str, duration: float) -> None:
        """With --py-spy DIR: sample the switchboard for ``duration`` s."""
        if self.args.py_spy and py_spy() is None:
            say("py-spy is not installed (.venv/bin/pip install py-spy): no profile")
            return
        self.profiler.start(self.switchboard.pid if self.switchboard else None, name,
                            "--rate", "100", "--nonblocking", "--duration", f"{duration:.0f}",
                            attach=0)

    def dump_stacks(self, name: str) -> str | None:
        """py-spy dump of the switchboard (if py-spy is installed); the file name."""
        binary = py_spy()
        if self.switchboard is None or binary is None:
            return None
        out = Path(self.args.py_spy or self.tmp).absolute()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.txt"
        with path.open("wb") as f:
            subprocess.run([binary, "dump", "--pid", str(self.switchboard.pid), "--locals"],
                           stdout=f, stderr=subprocess.STDOUT, timeout=60, check=False)
        return str(path)

    def cleanup(self) -> None:
        self.profiler.stop_all()
        if self.client is not None:
            self.client.close()
        with contextlib.suppress(Exception):
            stop_process(self.fleet, signal.SIGTERM, timeout=60)
        with contextlib.suppress(Exception):
            stop_process(self.switchboard, signal.SIGTERM, timeout=30)
        if self.sampler is not None:
            self.sampler.stop()
        if self.db is not None:
            self.db.stop()
        if self.keep and not self.args.keep_temp:
            say("anomalies: the logs and database are evidence")
        remove_temp(self.tmp, self.args.keep_temp or self.keep, say)

    # -- waiting ----------------------------------------------------------------------------

    def wait_connected(self, t_ref: float, after: float | None, timeout: float
                       ) -> dict[str, Any]:
        """Poll the hosts until all N are connected (to a process started at ``after``).

        After a SIGKILL the database still names the dead instance, so the API
        shows ``connected: true`` for every host at once; a host counts as back
        only when its ``last_seen_at`` (set when a link is accepted) is later
        than ``after``.
        """
        assert self.client is not None
        deadline = time.monotonic() + timeout
        curve: list[tuple[float, int]] = []
        marks: dict[str, float | None] = {"50%": None, "90%": None, "99%": None, "100%": None}
        while True:
            try:
                count = sum(1 for h in hosts(self.client)
                            if h["name"].startswith(PREFIX) and h["connected"] and (
                                after is None or (epoch(h["last_seen_at"]) or 0) >= after))
            except APIError as e:
                say(f"  GET /api/v1/hosts failed: {e}")
                count = -1
            now = time.time()
            curve.append((round(now - t_ref, 2), count))
            for mark, share in (("50%", 0.5), ("90%", 0.9), ("99%", 0.99), ("100%", 1.0)):
                if marks[mark] is None and count >= share * self.n:
                    marks[mark] = round(now - t_ref, 2)
            if count >= self.n:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(self.args.poll)
        return {"after_s": marks, "connected_at_end": curve[-1][1],
                "curve": curve if len(curve) <= 200 else curve[::max(1, len(curve) // 200)]}

    def wait_idle(self, timeout: float, before: float | None = None) -> float | None:
        """Wait until no job (created before ``before``) is active; when that was, or None."""
        assert self.client is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                active = [j for j in list_jobs(self.client, states=ACTIVE_STATES)
                          if before is None or (epoch(j["created_at"]) or 0) <= before]
            except APIError as e:
                say(f"  listing active jobs failed: {e}")
                active = [None]  # type: ignore[list-item]
            if not active:
                return time.time()
            time.sleep(self.args.poll)
        return None

    # -- phases -----------------------------------------------------------------------------

    def phase_connect(self) -> None:
        say(f"starting the fleet of {self.n} mock supervisors")
        span = Span(self)
        t0 = time.time()
        self.start_fleet()
        timeout = self.args.connect_timeout or (120 + self.n / 20)
        result = self.wait_connected(t0, None, timeout)
        fleet_up = None
        for _ in range(30):  # the fleet reports once a second
            fleet_up = self.fleet_first(t0, "connected", self.n)
            if fleet_up is not None:
                break
            time.sleep(0.1)
        result.update({
            # The fleet creates (or re-tokens) its hosts through the API first.
            "provisioned_s": round(self.fleet_provisioned - t0, 2)
            if self.fleet_provisioned else None,
            "fleet_view_all_connected_s": round(fleet_up - t0, 2) if fleet_up else None,
            "usage": span.end(),
        })
        with self._fleet_lock:
            first = next((t for t, f in self.fleet_reports if t >= t0), None)
        if first is not None:
            result["first_fleet_report_s"] = round(first - t0, 2)
        self.results["connect"] = result
        all_s = result["after_s"]["100%"]
        if all_s is None:
            raise BenchError(f"only {result['connected_at_end']} of {self.n} hosts connected "
                             f"within {timeout:.0f} s; see {self.tmp / 'fleet.log'}")
        say(f"  all {self.n} hosts connected {all_s:.1f} s after the fleet started")

    def phase_steady(self) -> None:
        a = self.args
        assert self.client is not None and self.switchboard is not None
        say(f"steady: {a.rate:g} jobs/s for {a.duration:g} s")
        body = json.dumps(job_body("steady", TAGS, IMAGE))
        self.profile("steady", a.duration)
        passes = self.passes()
        span = Span(self)
        cmd = [self.python, str(BENCH / "openloop.py"), "--url", f"{self.url}/api/v1/jobs",
               "--rate", f"{a.rate:g}", "--duration", f"{a.duration:g}", "--connections", "4",
               "--method", "POST", "--body", body, "--drain", "30",
               "-H", f"Authorization: Bearer {self.token}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.duration + 90,
                              check=False, start_new_session=True)
        if proc.returncode != 0:
            raise BenchError(f"openloop failed ({proc.returncode}): {proc.stderr.strip()}")
        enqueue = json.loads(proc.stdout)
        usage = span.end()
        self.pg_memory.append({"after": "steady", **procfs.tree_memory_mb(self.postmaster_pid())})
        idle = self.wait_idle(60 + a.run_time * 3)
        passes = self.passes() - passes
        jobs = [j for j in list_jobs(self.client, since=span.t0 - 1) if j["label"] == "steady"]
        result = {"enqueue": {k: enqueue[k] for k in (
            "rate_target", "rate_achieved", "scheduled", "ok", "statuses", "errors",
            "unfinished", "latency_ms", "dispatch_lag_ms")},
            "idle_after_s": round(idle - span.t0, 2) if idle else None,
            **self.dispatch(jobs), "usage": usage}
        result["distinct_hosts"] = len({j["host"] for j in jobs if j["host"]})
        result["scheduling_passes"] = passes
        self.results["steady"] = result
        d = result["dispatch_ms"]["created_to_starting"]
        say(f"  {len(jobs)} jobs, enqueue -> starting p50 {d['p50']} ms, p99 {d['p99']} ms, "
            f"max {d['max']} ms; switchboard CPU {usage['switchboard']['cpu_pct']} %, "
            f"RSS {usage['switchboard']['rss_peak_mb']} MB")

    @staticmethod
    def dispatch(jobs: list[dict[str, Any]]) -> dict[str, Any]:
        """Dispatch latency and outcome of a list of jobs."""
        to_assigned, to_starting, to_ready, assigned_to_starting = [], [], [], []
        for job in jobs:
            created = epoch(job["created_at"])
            assigned, started = epoch(job["assigned_at"]), epoch(job["started_at"])
            ready = epoch(job["ready_at"])
            if created is None:
                continue
            if assigned is not None:
                to_assigned.append(assigned - created)
            if started is not None:
                to_starting.append(started - created)
                if assigned is not None:
                    assigned_to_starting.append(started - assigned)
            if ready is not None:
                to_ready.append(ready - created)
        reasons = Counter((j["termination"] or {}).get("reason") or j["state"] for j in jobs)
        return {
            "jobs": len(jobs),
            "outcomes": dict(reasons),
            "dispatch_ms": {
                "created_to_assigned": percentiles(to_assigned),
                "created_to_starting": percentiles(to_starting),
                "assigned_to_starting": percentiles(assigned_to_starting),
                "created_to_ready": percentiles(to_ready),
            },
        }

    @staticmethod
    def handovers(jobs: list[dict[str, Any]]) -> dict[str, Any]:
        """Per host: terminated_at of a job -> assigned_at/started_at of the next one,
        when the next one was already waiting (created before the first ended)."""
        by_host: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for job in jobs:
            if job["host"] and job["assigned_at"]:
                by_host[job["host"]].append(job)
        to_assigned, to_starting = [], []
        skipped = 0
        for runs in by_host.values():
            runs.sort(key=lambda j: epoch(j["assigned_at"]) or 0)
            for first, second in itertools.pairwise(runs):
                ended = epoch(first["terminated_at"])
                if ended is None:
                    continue
                if (epoch(second["created_at"]) or 0) >= ended:
                    skipped += 1  # The queue was empty: the host waited for work.
                    continue
                to_assigned.append((epoch(second["assigned_at"]) or 0) - ended)
                if second["started_at"]:
                    to_starting.append((epoch(second["started_at"]) or 0) - ended)
        return {"terminated_to_assigned_ms": percentiles(to_assigned),
                "terminated_to_starting_ms": percentiles(to_starting),
                "handovers_without_waiting_job": skipped}

    def phase_burst(self) -> None:
        a = self.args
        assert self.client is not None
        waiting = a.burst_wait if a.burst_wait is not None else max(10, self.n // 2)
        total = self.n + waiting
        say(f"burst: {self.n} jobs that hold every host until all {total} are enqueued, then "
            f"{waiting} that wait for a host")
        holds: list[float] = []

        def body(i: int, done: int, elapsed: float) -> dict[str, Any]:
            if i >= self.n:
                return job_body("burst-wait", TAGS, IMAGE)
            if a.burst_hold is not None:
                hold = a.burst_hold
            else:
                # Hold the host until well after the last job is enqueued, at the
                # enqueue rate seen so far (the switchboard slows down as jobs start).
                rate = done / elapsed if done >= 10 and elapsed > 0 else 50.0
                hold = min(300.0, 5.0 + 2.0 * (total - done) / max(rate, 1.0))
            holds.append(hold)
            return job_body("burst-hold", TAGS, IMAGE, round(hold, 1))

        span = Span(self)
        enqueued = enqueue_many(self.client, body, total, a.enqueue_concurrency)
        t_enqueued = time.time()
        say(f"  enqueued {enqueued['ok']} jobs in {enqueued['elapsed_s']:.1f} s "
            f"({enqueued['rate']}/s); hold times {min(holds):.1f} .. {max(holds):.1f} s")
        idle = self.wait_idle(max(holds) + 120 + total / 20)
        usage = span.end()
        self.pg_memory.append({"after": "burst", **procfs.tree_memory_mb(self.postmaster_pid())})
        jobs = [j for j in list_jobs(self.client, since=span.t0 - 1)
                if j["label"] in ("burst-hold", "burst-wait")]
        hold_jobs = [j for j in jobs if j["label"] == "burst-hold"]
        busy = sum(1 for j in hold_jobs
                   if (epoch(j["assigned_at"]) or 1e99) <= t_enqueued
                   < (epoch(j["terminated_at"]) or 1e99))
        result = {
            "jobs": enqueued, "hold_jobs": len(hold_jobs), "waiting_jobs": waiting,
            "hold_s": {"min": round(min(holds), 1), "max": round(max(holds), 1)},
            # Hold jobs running when the last job had been enqueued: the later
            # jobs waited for hosts only if this is (nearly) every host.
            "hosts_busy_when_enqueued": busy,
            "idle_after_s": round(idle - span.t0, 2) if idle else None,
            **self.handovers(jobs),
            "hold_dispatch_ms": self.dispatch(hold_jobs)["dispatch_ms"],
            "outcomes": dict(Counter((j["termination"] or {}).get("reason") or j["state"]
                                     for j in jobs)),
            "usage": usage,
        }
        self.results["burst"] = result
        g = result["terminated_to_starting_ms"]
        say(f"  job-end -> next starting p50 {g['p50']} ms, p99 {g['p99']} ms over "
            f"{g['count']} handovers; {busy}/{self.n} hosts busy when the last job was enqueued")

    def phase_storm(self, variant: str) -> None:
        a = self.args
        assert self.client is not None and self.switchboard is not None
        sig = signal.SIGKILL if variant == "kill" else signal.SIGTERM
        delay = a.restart_delay_kill if variant == "kill" else a.restart_delay_term
        batch = a.storm_batch if a.storm_batch is not None else max(10, self.n // 2)
        label = f"storm-{variant}"
        say(f"storm ({sig.name}): {batch} jobs of {a.storm_run_time:g} s and "
            f"{a.rate:g} jobs/s, then {sig.name}, restart after {delay:g} s")
        t_phase = time.time()
        flow = PacedEnqueuer(self.client, job_body(f"{label}-flow", TAGS, IMAGE), a.rate)
        flow.start()
        batched = enqueue_many(self.client, job_body(f"{label}-batch", TAGS, IMAGE,
                                                     a.storm_run_time), batch,
                               a.enqueue_concurrency)
        time.sleep(a.storm_lead)
        before = Counter(j["state"] for j in list_jobs(self.client, states=ACTIVE_STATES))
        flowed = flow.stop()
        self.client.close()
        old_pid = self.switchboard.pid
        old_hwm = self.sampler.window("switchboard", t_phase, time.time())["hwm_mb"] \
            if self.sampler else None
        overflows0 = procfs.listen_overflows()
        t_kill = time.time()
        hung = None
        proc = self.switchboard
        proc.send_signal(sig)
        try:
            proc.wait(a.stop_timeout)
        except subprocess.TimeoutExpired:
            # As systemd does after TimeoutStopSec: note where it hangs, then SIGKILL.
            hung = self.dump_stacks(f"storm-{variant}-hang")
            say(f"  the switchboard did not exit within {a.stop_timeout:g} s of {sig.name}; "
                "SIGKILL")
            proc.kill()
            proc.wait(10)
        t_exit = time.time()
        stop_s = t_exit - t_kill
        say(f"  {sig.name} to {old_pid} with jobs {dict(before)}; it exited after "
            f"{stop_s:.2f} s")
        time.sleep(delay)
        span = Span(self)
        spawned, listening = self.start_switchboard()
        self.profile(f"storm-{variant}", 30)
        say(f"  restarted: listening {listening - t_kill:.2f} s after the {sig.name}")
        connected = self.wait_connected(t_kill, spawned, a.storm_timeout)
        t_connected = t_kill + connected["after_s"]["100%"] \
            if connected["after_s"]["100%"] is not None else None
        say(f"  hosts back: 50% {connected['after_s']['50%']} s, 90% "
            f"{connected['after_s']['90%']} s, 100% {connected['after_s']['100%']} s "
            f"after the {sig.name}")
        remaining = max(5.0, a.storm_timeout - (time.time() - t_kill))
        t_accounted = self.wait_idle(remaining, before=t_kill)
        t_end = time.time()
        usage = span.end()
        overflows1 = procfs.listen_overflows()
        self.pg_memory.append({"after": label, **procfs.tree_memory_mb(self.postmaster_pid())})
        jobs = [j for j in list_jobs(self.client, since=t_phase - 1)
                if j["label"].startswith(label) and (epoch(j["created_at"]) or 0) <= t_kill]
        outcomes = Counter((j["termination"] or {}).get("reason") or j["state"] for j in jobs)
        lost = [j["id"] for j in jobs if j["state"] != "terminated"]
        events = job_events(self.client, [j["id"] for j in jobs], a.enqueue_concurrency)
        twice = [job_id for job_id, evs in events.items()
                 if sum(1 for e in evs if e["state"] == "ready") > 1]
        unclean = [j["id"] for j in jobs if j["state"] == "terminated"
                   and (j["termination"] or {}).get("reason") != "workload_exited"]
        odd = {j["id"]: j for j in jobs if j["id"] in set(lost) | set(twice) | set(unclean)}
        evidence = [{"id": job_id, "host": job["host"], "state": job["state"],
                     "termination": job["termination"], "events": events.get(job_id, [])}
                    for job_id, job in list(odd.items())[:10]]
        if odd or hung:
            self.keep = True  # keep the logs and the database for a post-mortem
        fleet_back = self.fleet_first(spawned, "connected", self.n)
        settled = None
        if t_connected is not None and t_accounted is not None:
            settled = round(max(t_connected, t_accounted) - t_kill, 2)
        result = {
            "signal": sig.name, "restart_delay_s": delay, "batch": batched,
            "flow": flowed, "active_at_kill": dict(before),
            "stop_s": round(stop_s, 2),
            "stop_timed_out": hung is not None, "hang_stacks": hung,
            "exit_after_s": round(t_exit - t_kill, 2),
            "listening_after_s": round(listening - t_kill, 2),
            "hosts_connected": connected,
            "fleet_view_all_connected_s": round(fleet_back - t_kill, 2) if fleet_back else None,
            "jobs_accounted_after_s": round(t_accounted - t_kill, 2) if t_accounted else None,
            "settled_after_s": settled,
            "jobs_before_kill": len(jobs), "outcomes": dict(outcomes),
            "lost": len(lost), "lost_ids": lost[:20],
            "ran_twice": len(twice), "ran_twice_ids": twice[:20],
            "not_workload_exited": len(unclean), "not_workload_exited_ids": unclean[:20],
            "anomalies": evidence,
            "old_switchboard_hwm_mb": old_hwm,
            # Connections the kernel refused because the listen queue was full
            # (whole network namespace, so other programs could add to them).
            "listen_overflows": {k: overflows1.get(k, 0) - v for k, v in overflows0.items()},
            "usage": usage,
            "switchboard_series": self.sampler.series("switchboard", t_kill, t_end)
            if self.sampler else [],
        }
        self.results.setdefault("storms", []).append(result)
        say(f"  settled after {settled} s; {len(jobs)} jobs: {dict(outcomes)}; lost "
            f"{len(lost)}, ran twice {len(twice)}; switchboard CPU "
            f"{usage['switchboard']['cpu_pct']} %, RSS peak {usage['switchboard']['rss_peak_mb']}"
            " MB")
        # Let the fleet's pings and reconciliations settle before the next phase.
        time.sleep(2)

    # -- the whole run ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        a = self.args
        ambient = wait_quiet(0.1, 2, a.quiet_wait, say)
        self.results["ambient_busy_pct"] = round(100 * ambient, 1)
        if ambient > 0.1:
            say(f"warning: the machine was {ambient:.0%} busy before the start; other load "
                "skews the figures")
        self.db = Postgres(self.tmp / "pg", say)
        self.results["machine"] = machine_info(self.db)
        self.results["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.results["revision"] = revision(ROOT)
        self.results["parameters"] = {
            "supervisors": self.n, "rate": a.rate, "duration_s": a.duration,
            "stage_time_s": a.stage_time, "run_time_s": a.run_time,
            "listen": self.listen_endpoint(), "phases": a.phases,
            "fleet_fsync": a.fleet_fsync, "switchboard_args": a.switchboard_arg,
            "fleet_args": a.fleet_arg, "restart_delay_kill_s": a.restart_delay_kill,
            "restart_delay_term_s": a.restart_delay_term, "storm_run_time_s": a.storm_run_time,
            "storm_lead_s": a.storm_lead, "postgresql_durable": True,
            "what_if_nodelay": a.what_if_nodelay,
            "bench_nofile": nofile_limits(),
        }
        self.sampler = procfs.Sampler({
            "switchboard": lambda: self.switchboard.pid
            if self.switchboard is not None and self.switchboard.poll() is None else None,
            "fleet": lambda: self.fleet.pid
            if self.fleet is not None and self.fleet.poll() is None else None,
        })
        self.sampler.start()
        t_start = time.time()
        say(f"starting the switchboard on {self.url} ({self.listen_endpoint()})")
        self.start_switchboard()
        self.bootstrap()
        idle_hwm = self.sampler.window("switchboard", t_start, time.time())
        self.results["switchboard_idle_rss_mb"] = idle_hwm["rss_end_mb"]
        self.phase_connect()
        self.results["switchboard_connected_rss_mb"] = self.sampler.window(
            "switchboard", time.time() - 2, time.time())["rss_end_mb"]
        if a.settle > 0:
            say(f"idle: {self.n} links, no jobs, for {a.settle:g} s")
            span = Span(self)
            time.sleep(a.settle)
            self.results["idle"] = {"usage": span.end()}
        for phase in a.phases:
            if phase == "steady":
                self.phase_steady()
            elif phase == "burst":
                self.phase_burst()
            else:
                self.phase_storm(phase)
        assert self.client is not None
        leftover = list_jobs(self.client, states=ACTIVE_STATES)
        self.results["active_jobs_at_end"] = len(leftover)
        self.results["all_jobs"] = dict(Counter(
            (j["termination"] or {}).get("reason") or j["state"]
            for j in list_jobs(self.client)))
        self.sampler.sample()
        whole = {name: self.sampler.window(name, t_start, time.time())
                 for name in ("switchboard", "fleet")}
        fleet_peak = whole["fleet"]["hwm_mb"] or 0
        self.results["memory"] = {
            "switchboard_hwm_mb": whole["switchboard"]["hwm_mb"],
            "fleet_hwm_mb": whole["fleet"]["hwm_mb"],
            "fleet_kb_per_supervisor": round(fleet_peak * 1024 / self.n, 1),
            "postgres": self.pg_memory,
        }
        self.results["verdicts"] = verdicts(self.results)
        return self.results


# -- report ---------------------------------------------------------------------------------


def verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    p = r["parameters"]
    out = []
    hwm = r["memory"]["switchboard_hwm_mb"]
    out.append({"target": f"switchboard peak RSS with {p['supervisors']} supervisors "
                          f"< {TARGET_RSS_MB:g} MB",
                "value": hwm, "unit": "MB", "met": hwm is not None and hwm < TARGET_RSS_MB})
    steady = r.get("steady")
    if steady:
        p99 = steady["dispatch_ms"]["created_to_starting"]["p99"]
        sustained = steady["enqueue"]["rate_achieved"] >= 0.95 * p["rate"]
        out.append({"target": f"p99 enqueue -> start-job < {TARGET_DISPATCH_P99_MS:g} ms at "
                              f"{p['rate']:g} jobs/s",
                    "value": p99, "unit": "ms",
                    "met": p99 is not None and p99 < TARGET_DISPATCH_P99_MS and sustained})
    for storm in r.get("storms", []):
        sig = storm["signal"]
        settled = storm["settled_after_s"]
        out.append({"target": f"reconnect storm after {sig} settles < {TARGET_STORM_S:g} s",
                    "value": settled, "unit": "s",
                    "met": settled is not None and settled < TARGET_STORM_S})
        bad = storm["lost"] + storm["ran_twice"] + storm["not_workload_exited"]
        out.append({"target": f"{sig}: no job lost, run twice or failed "
                              f"(of {storm['jobs_before_kill']})",
                    "value": bad, "unit": "jobs", "met": bad == 0})
    full = p["supervisors"] >= TARGET_SUPERVISORS and p["rate"] >= TARGET_RATE
    for v in out:
        v["full_scale"] = full
    return out


def _latency_row(name: str, v: dict[str, Any]) -> str:
    return (f"  {name:<24} p50 {_f(v['p50']):>7} ms  p90 {_f(v['p90']):>7} ms  "
            f"p99 {_f(v['p99']):>7} ms  max {_f(v['max']):>7} ms  (n={v['count']})")


def table(r: dict[str, Any]) -> str:
    m, p = r["machine"], r["parameters"]
    lines = [
        f"Supervisor fleet benchmark: {p['supervisors']} mock supervisors, {p['rate']:g} jobs/s "
        f"for {p['duration_s']:g} s; {m['nproc']} cores ({m['cpu_model']}), "
        f"{m['memory_gib']} GiB, {m['postgresql']}, Python {m['python']}",
        f"revision {r.get('revision')}, started {r.get('started')}; listen "
        f"{p['listen']}; mock stages {p['stage_time_s']:g} s, run time {p['run_time_s']:g} s; "
        f"machine {r.get('ambient_busy_pct')} % busy before the start",
        "",
    ]
    c = r.get("connect")
    if c:
        u = c["usage"]
        lines.append(
            f"connect      hosts provisioned after {_f(c.get('provisioned_s'))} s; all "
            f"{p['supervisors']} connected after "
            f"{_f(c['after_s']['100%'])} s (50% {_f(c['after_s']['50%'])} s, 90% "
            f"{_f(c['after_s']['90%'])} s; fleet's own view {_f(c['fleet_view_all_connected_s'])}"
            f" s); switchboard RSS idle {_f(r.get('switchboard_idle_rss_mb'))} MB -> "
            f"{_f(r.get('switchboard_connected_rss_mb'))} MB connected, CPU "
            f"{_f(u['switchboard']['cpu_pct'])} %")
    if r.get("idle"):
        u = r["idle"]["usage"]
        lines.append(
            f"idle         {p['supervisors']} links, no jobs, {u['wall_s']:g} s: CPU (% of one "
            f"core) switchboard {_f(u['switchboard']['cpu_pct'])}, fleet "
            f"{_f(u['fleet']['cpu_pct'])}, PostgreSQL {_f(u['postgres_cpu_pct'])}")
    s = r.get("steady")
    if s:
        e, d, u = s["enqueue"], s["dispatch_ms"], s["usage"]
        lines += [
            f"steady       {e['ok']} jobs enqueued at {e['rate_achieved']:g}/s (target "
            f"{e['rate_target']:g}), enqueue HTTP p50 {_f(e['latency_ms']['p50'])} ms p99 "
            f"{_f(e['latency_ms']['p99'])} ms; outcomes {s['outcomes']}; "
            f"{s['distinct_hosts']} hosts used",
        ]
        if s.get("scheduling_passes") is not None:
            lines[-1] += (f"; {_f(s['scheduling_passes'])} scheduling passes "
                          f"({_f(s['scheduling_passes'] / max(s['jobs'], 1))} per job, timer "
                          "passes included)")
        lines += [_latency_row(name, d[key]) for key, name in (
            ("created_to_assigned", "enqueue -> assigned"),
            ("created_to_starting", "enqueue -> start-job"),
            ("assigned_to_starting", "assigned -> start-job"),
            ("created_to_ready", "enqueue -> ready"))]
        lines.append(
            f"  CPU (% of one core): switchboard {_f(u['switchboard']['cpu_pct'])} (its reactor "
            f"waited for a core {_f(u['switchboard']['runq_pct'])} % of the time), fleet "
            f"{_f(u['fleet']['cpu_pct'])}, PostgreSQL {_f(u['postgres_cpu_pct'])}, bench "
            f"{_f(u['bench_cpu_pct'])}, other processes {_f(u.get('other_cpu_pct'))}; machine "
            f"{_f(u['machine_busy_pct'])} % busy; switchboard RSS peak "
            f"{_f(u['switchboard']['rss_peak_mb'])} MB")
    b = r.get("burst")
    if b:
        lines.append(
            f"burst        {b['jobs']['ok']} jobs enqueued at {_f(b['jobs']['rate'])}/s: "
            f"{b['hold_jobs']} holding a host for {b['hold_s']['min']:g}..{b['hold_s']['max']:g}"
            f" s, then {b['waiting_jobs']} waiting; {b['hosts_busy_when_enqueued']} hosts busy "
            f"when the last was enqueued; outcomes {b['outcomes']}")
        lines += [_latency_row(name, b[key]) for key, name in (
            ("terminated_to_assigned_ms", "job-end -> next assigned"),
            ("terminated_to_starting_ms", "job-end -> next start-job"))]
        v = b["hold_dispatch_ms"]["created_to_starting"]
        u = b["usage"]
        lines.append(f"  enqueue -> start-job while enqueueing flat out: p50 {_f(v['p50'])} ms, "
                     f"p99 {_f(v['p99'])} ms; CPU: switchboard {_f(u['switchboard']['cpu_pct'])}"
                     f" (runq {_f(u['switchboard']['runq_pct'])} %), PostgreSQL "
                     f"{_f(u['postgres_cpu_pct'])}, other {_f(u.get('other_cpu_pct'))}")
    for st in r.get("storms", []):
        hc = st["hosts_connected"]["after_s"]
        u = st["usage"]
        lines += [
            f"storm {st['signal']:<7} jobs at the kill {st['active_at_kill']}; exited "
            f"{_f(st['exit_after_s'])} s{' (SIGKILLed: it hung)' if st['stop_timed_out'] else ''}"
            f", restarted after {st['restart_delay_s']:g} s, "
            f"listening at {_f(st['listening_after_s'])} s",
            f"  hosts back (s after the signal): 50% {_f(hc['50%'])}, 90% {_f(hc['90%'])}, "
            f"99% {_f(hc['99%'])}, 100% {_f(hc['100%'])} (fleet's view "
            f"{_f(st['fleet_view_all_connected_s'])}); jobs accounted at "
            f"{_f(st['jobs_accounted_after_s'])} s; settled {_f(st['settled_after_s'])} s; listen "
            f"queue overflows {st.get('listen_overflows')}",
            f"  {st['jobs_before_kill']} jobs enqueued before the kill: {st['outcomes']}; lost "
            f"{st['lost']}, ran twice {st['ran_twice']}, not workload_exited "
            f"{st['not_workload_exited']}",
            f"  new switchboard: CPU {_f(u['switchboard']['cpu_pct'])} % over "
            f"{_f(u['wall_s'])} s, RSS peak {_f(u['switchboard']['rss_peak_mb'])} MB; "
            f"PostgreSQL CPU {_f(u['postgres_cpu_pct'])} %; fleet CPU "
            f"{_f(u['fleet']['cpu_pct'])} %",
        ]
    mem = r["memory"]
    pg = max((x["pss_mb"] for x in mem["postgres"]), default=None)
    lines += [
        f"memory       switchboard VmHWM {_f(mem['switchboard_hwm_mb'])} MB; fleet VmHWM "
        f"{_f(mem['fleet_hwm_mb'])} MB ({_f(mem['fleet_kb_per_supervisor'])} kB per "
        f"supervisor); PostgreSQL PSS {_f(pg)} MB (all its processes)",
        f"all jobs     {r.get('all_jobs')}; still active at the end: "
        f"{r.get('active_jobs_at_end')}",
    ]
    phases = [("connect", r.get("connect")), ("idle", r.get("idle"))] + [
        ("steady", r.get("steady")),
                                                ("burst", r.get("burst"))] + \
        [(f"storm {st['signal']}", st) for st in r.get("storms", [])]
    for name, phase in phases:
        other = (phase or {}).get("usage", {}).get("other_cpu_pct")
        if other is not None and other > 15:
            lines.append(f"warning: during {name}, other processes used {other:g} % of a core: "
                         "the figures are skewed")
    if p.get("what_if_nodelay"):
        lines.append("EXPERIMENT: the fleet ran with TCP_NODELAY (--what-if-nodelay); not the "
                     "product as shipped")
    lines += ["", "Targets (reference: 1000 supervisors, 20 jobs/s, 2 cores):"]
    for v in r["verdicts"]:
        mark = ("PASS" if v["met"] else "MISS") if v["full_scale"] else \
            ("pass" if v["met"] else "miss") + " (not at full scale)"
        lines.append(f"  {mark:<4}  {v['target']:<58} measured {_f(v['value'])} {v['unit']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser("supervisors.py", __doc__,
                          "Targets: 1000 supervisors within 256 MB RSS; p99 enqueue -> "
                          "start-job < 100 ms at 20 jobs/s; the reconnect storm settles in "
                          "< 30 s with no job lost.")
    options(parser, (
        ("--supervisors", int, TARGET_SUPERVISORS, None),
        ("--rate", float, TARGET_RATE, "jobs/s (steady)"),
        ("--duration", float, 60.0, "steady phase, seconds"),
    ))
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)} [all]")
    options(parser, (
        ("--stage-time", float, 0.01, "seconds of each mock initializing stage [0.01]"),
        ("--run-time", float, 2.0, "seconds a mock workload runs [2]"),
        ("--backlog", int, 1024, "listen backlog of the switchboard (0: Twisted's default, 50)"),
        ("--burst-wait", int, None, "jobs that wait for a host in the burst phase [supervisors/2]"),
        ("--burst-hold", float, None,
         "run time of the jobs holding the hosts [3 + 1.5 s per 100 jobs]"),
        ("--enqueue-concurrency", int, 8, "connections for bulk enqueues [8]"),
        ("--storm-batch", int, None, "jobs running when the switchboard is killed [supervisors/2]"),
        ("--storm-run-time", float, 5.0, "run time of those jobs [5]"),
        ("--storm-lead", float, 1.5, "seconds between the batch and the kill [1.5]"),
        ("--restart-delay-kill", float, 2.0,
         "seconds before the restart after SIGKILL (systemd RestartSec) [2]"),
        ("--restart-delay-term", float, 0.0, "seconds before the restart after SIGTERM [0]"),
        ("--stop-timeout", float, 30.0,
         "seconds the switchboard may take to exit after SIGTERM before SIGKILL (systemd "
         "TimeoutStopSec) [30]"),
        ("--storm-timeout", float, 180.0, "longest wait for the storm to settle, seconds [180]"),
        ("--connect-timeout", float, None,
         "longest wait for the fleet to connect [120 + supervisors/20]"),
        ("--settle", float, 10.0,
         "seconds to wait (and measure the idle cost) after the fleet connected [10]"),
        ("--poll", float, 0.5, "API polling interval [0.5]"),
    ))
    parser.add_argument("--fleet-fsync", action="store_true",
                        help="let the supervisors fsync their state files (default: --no-fsync)")
    quiet_wait_option(parser, 0.1)
    parser.add_argument("--what-if-nodelay", action="store_true",
                        help="EXPERIMENT: run the fleet with TCP_NODELAY on the supervisors' "
                             "sockets (fleet_nodelay.py) to measure a suggested fix")
    parser.add_argument("--switchboard-log-level", default="warn")
    parser.add_argument("--switchboard-arg", action="append", default=[],
                        help="extra treadmill-switchboard option (repeatable)")
    parser.add_argument("--fleet-arg", action="append", default=[],
                        help="extra treadmill.dev.fleet option (repeatable)")
    parser.add_argument("--py-spy", metavar="DIR",
                        help="sample the switchboard with py-spy during the steady phase and "
                             "the first 30 s after each restart (collapsed stacks in DIR)")
    output_options(parser)
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if any(p not in PHASES for p in args.phases):
        parser.error(f"--phases: expected names among {', '.join(PHASES)}")
    if not 1 <= args.supervisors <= 10000:
        parser.error("--supervisors must be in [1, 10000]")
    if not (0 < args.rate <= 1000 and 0 < args.duration <= 600):
        parser.error("--rate must be in (0, 1000] and --duration in (0, 600]")
    if not 5 <= args.storm_timeout <= 900:
        parser.error("--storm-timeout must be in [5, 900]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if missing("supervisors"):
        return 2
    errors = (BenchError, ClusterError, APIError, subprocess.TimeoutExpired)
    return run(Bench(args), args, table, errors, say)


if __name__ == "__main__":
    sys.exit(main())
