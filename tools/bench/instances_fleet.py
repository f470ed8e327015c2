#!/usr/bin/env python3
"""Benchmark: a large fleet (10,000 mock supervisors) across switchboard instances.

    .venv/bin/python tools/bench/instances_fleet.py [--supervisors 10000] [--instances 3] \
        [--haproxies 3] [--rate 50] [--duration 30] [--quiet-wait 600] [--json]

Every instance is started before the fleet connects, so links spread from the
start. One HAProxy process cannot hold 10,000 links here (about two
descriptors per connection, ``RLIMIT_NOFILE``), so ``--haproxies`` processes
each take a share of the fleet (one ``python -m treadmill.dev.fleet`` process
each) and balance every instance. Measured: the time for the whole fleet to
connect, RSS per instance, enqueue → start-job at ``--rate`` jobs/s through the
balancers, and after kill -9 of one instance the time until every link is on
the others (the failover), with its curve. What it starts and prints:
``tools/bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg2
from benchkit import balancer, procfs
from benchkit.api import ACTIVE_STATES, APIError, Client, epoch, job_body, list_jobs, metric
from benchkit.cli import BenchError, output_options, run, sayer
from benchkit.daemons import Postgres, bootstrap, remove_temp, start_daemon, temp_dir
from benchkit.host import host_info, quiet_wait_option, revision, wait_quiet
from benchkit.procs import ROOT, VENV, free_port, spawn, stop_process
from benchkit.procs import wait_until as wait
from benchkit.report import percentiles

from treadmill.dev.pgcluster import ClusterError

BENCH = Path(__file__).resolve().parent
IMAGE = "sha256:" + "ef" * 32
TARGET_DISPATCH_P99_MS = 100.0
TARGET_FAILOVER_S = 5.0

say = sayer("instances-fleet", clock=True)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = temp_dir("treadmill-instances-fleet-")
        self.db: Postgres | None = None
        self.conn: Any = None
        self.names = [chr(ord("a") + i) for i in range(args.instances)]
        self.ports = {name: free_port() for name in self.names}
        self.metrics = {name: free_port() for name in self.names}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.balancers: list[subprocess.Popen[bytes]] = []
        self.balancer_ports = [free_port() for _ in range(args.haproxies)]
        self.fleets: list[subprocess.Popen[bytes]] = []
        self.token = ""
        self.client: Client | None = None
        self.idle: dict[str, Any] = {}

    # -- processes -------------------------------------------------------------------

    def start_instance(self, name: str) -> None:
        assert self.db is not None
        cmd = balancer.instance_cmd(self.db.dsn, name, self.tmp / "key.pem", self.ports[name],
                                    self.metrics[name], *self.args.switchboard_arg)
        if self.args.profile:  # cProfile, written when the instance stops (not if killed)
            at = cmd.index("treadmill-switchboard")
            cmd[at:at] = [f"--profile={self.tmp / f'{name}.prof'}", "--profiler=cprofile",
                          "--savestats"]
        self.procs[name] = start_daemon(cmd, self.tmp / f"{name}.log",
                                        f"http://127.0.0.1:{self.ports[name]}/healthz",
                                        f"instance {name}", level="warn", interval=0.1)

    def shares(self) -> list[tuple[int, int]]:
        """(first host number, count) of each fleet process: process ``i`` of ``k`` runs
        hosts ``i``, ``i + k``, ``i + 2k`` … (``--stride k``), so the hosts the scheduler
        picks first (lowest names) and their jobs are shared by every fleet process, not
        all run by the first."""
        n, k = self.args.supervisors, self.args.haproxies
        return [(i, len(range(i, n, k))) for i in range(k)]

    def start_fleets(self) -> None:
        a = self.args
        token_file = self.tmp / "admin-token"
        token_file.touch(mode=0o600)
        token_file.write_text(self.token + "\n")
        for i, (first, count) in enumerate(self.shares()):
            cmd = [str(VENV / "python"), "-m", "treadmill.dev.fleet",
                   "--url", f"http://127.0.0.1:{self.balancer_ports[i]}",
                   "--admin-token-file", str(token_file), "--count", str(count),
                   "--first", str(first), "--stride", str(a.haproxies),
                   "--tag", "mock", "--state", str(self.tmp / "fleet"),
                   "--no-fsync", "--report-interval", "5", "--mock-run-time", f"{a.run_time:g}"]
            for stage in ("starting", "fetching-image", "allocating", "provisioning",
                          "booting"):
                cmd += [f"--mock-stages-{stage}", "0.01"]
            self.fleets.append(spawn([*cmd, *a.fleet_arg], self.tmp / f"fleet-{i}.log",
                                     cwd=self.tmp))

    # -- observations ----------------------------------------------------------------

    def links(self) -> dict[str, int]:
        """Links per instance name, as the database records them."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT instance, count(*) FROM hosts WHERE session IS NOT NULL "
                        "GROUP BY instance")
            return {name: count for name, count in cur.fetchall()}

    def memory(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, proc in self.procs.items():
            if proc.poll() is None:
                out[f"instance {name}"] = {"rss_mb": _mb(procfs.status_kb(proc.pid, "VmRSS")),
                                           "hwm_mb": _mb(procfs.status_kb(proc.pid, "VmHWM"))}
        for kind, procs in (("haproxy", self.balancers), ("fleet", self.fleets)):
            for i, proc in enumerate(procs):
                out[f"{kind} {i}"] = {"rss_mb": _mb(procfs.status_kb(proc.pid, "VmRSS"))}
        return out

    def cpu(self) -> dict[str, dict[int, int]]:
        """CPU ticks so far of each kind of process (instances, balancers, fleets, the
        PostgreSQL server with its backends), by pid."""
        assert self.db is not None
        out: dict[str, dict[int, int]] = {"postgres": procfs.tree_ticks(self.db.postmaster_pid())}
        for kind, procs in (("instances", list(self.procs.values())),
                            ("haproxy", self.balancers), ("fleets", self.fleets)):
            out[kind] = {proc.pid: procfs.cpu_ticks(proc.pid) or 0 for proc in procs
                         if proc.poll() is None}
        return out

    def runq(self) -> dict[str, dict[int, int]]:
        """Nanoseconds the reactor (main) thread of each instance and fleet process waited
        for a CPU while runnable (``/proc/PID/schedstat``), by kind and pid."""
        return {kind: {proc.pid: procfs.runq_wait_ns(proc.pid) or 0 for proc in procs
                       if proc.poll() is None}
                for kind, procs in (("instances", list(self.procs.values())),
                                    ("fleets", self.fleets))}

    def phase_idle(self) -> dict[str, Any]:
        """CPU of every kind of process with the fleet linked and no job: the floor the
        steady phase's per-job figures are taken off (pings, touches, reconciliations)."""
        seconds = self.args.idle_window
        cpu0, runq0, t0 = self.cpu(), self.runq(), time.monotonic()
        time.sleep(seconds)
        span = time.monotonic() - t0
        return {"seconds": round(span, 1),
                "cpu_percent": self.cpu_used(cpu0, self.cpu(), span),
                "runq_percent": self.cpu_used(_as_ticks(runq0), _as_ticks(self.runq()), span)}

    def gate(self, name: str) -> dict[str, float]:
        """Instance ``name``'s handshake gate counters: upgrades that waited in its
        queue, were refused (503), and the pauses of the queue (its reactor late)."""
        prefix = "treadmill_supervisor_link_handshake"
        return {"queued": metric(self.metrics[name], f"{prefix}s_queued_total"),
                "refused": metric(self.metrics[name], f"{prefix}s_refused_total"),
                "paused": metric(self.metrics[name], f"{prefix}_queue_pauses_total")}

    @staticmethod
    def cpu_used(before: dict[str, dict[int, int]], after: dict[str, dict[int, int]],
                 seconds: float) -> dict[str, float]:
        """Per kind, the share of one core used between two :meth:`cpu` snapshots (%)."""
        return {kind: round(100 * procfs.ticks_delta(before.get(kind, {}), ticks)
                            / max(seconds, 1e-9), 1) for kind, ticks in after.items()}

    def curve(self, count: Any, target: int, timeout: float, interval: float
              ) -> dict[str, Any]:
        """Poll ``count()`` until it reaches ``target``: when it passed 50/90/99/100 %."""
        t0 = time.monotonic()
        marks: dict[str, float | None] = {"50%": None, "90%": None, "99%": None,
                                          "100%": None}
        points = []
        while True:
            value = count()
            now = time.monotonic() - t0
            points.append((round(now, 2), value))
            for mark, share in (("50%", 0.5), ("90%", 0.9), ("99%", 0.99), ("100%", 1.0)):
                if marks[mark] is None and value >= share * target:
                    marks[mark] = round(now, 2)
            if value >= target or now > timeout:
                break
            time.sleep(interval)
        step = max(1, len(points) // 60)
        return {"after_s": marks, "at_end": points[-1][1], "curve": points[::step]}

    # -- phases ----------------------------------------------------------------------

    def phase_connect(self) -> dict[str, Any]:
        n = self.args.supervisors
        say(f"starting {len(self.fleets) or self.args.haproxies} fleet processes, "
            f"{n} supervisors")
        self.start_fleets()
        result = self.curve(lambda: sum(self.links().values()), n,
                            self.args.connect_timeout, 0.5)
        if result["after_s"]["100%"] is None:
            raise BenchError(f"only {result['at_end']} of {n} links within "
                             f"{self.args.connect_timeout:g} s; see {self.tmp}")
        result["links"] = self.links()
        result["memory"] = self.memory()
        say(f"  connected in {result['after_s']['100%']} s: {result['links']}")
        return result

    def phase_steady(self) -> dict[str, Any]:
        a = self.args
        assert self.client is not None
        say(f"steady: {a.rate:g} jobs/s for {a.duration:g} s")
        body = json.dumps(job_body("steady", ["mock"], IMAGE))
        t0 = time.time()
        load0 = os.getloadavg()[0]
        cpu0, m0 = self.cpu(), time.monotonic()
        procs = []
        # One open-loop generator per balancer, each a share of the rate.
        for port in self.balancer_ports:
            cmd = [str(VENV / "python"), str(BENCH / "openloop.py"),
                   "--url", f"http://127.0.0.1:{port}/api/v1/jobs",
                   "--rate", f"{a.rate / len(self.balancer_ports):g}",
                   "--duration", f"{a.duration:g}", "--connections", "2", "--method", "POST",
                   "--body", body, "--drain", "30", "-H", f"Authorization: Bearer {self.token}"]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True))
        runq0 = self.runq()
        enqueue = []
        for proc in procs:
            out, err = proc.communicate(timeout=a.duration + 90)
            if proc.returncode != 0:
                raise BenchError(f"openloop failed ({proc.returncode}): {err.strip()}")
            enqueue.append(json.loads(out))
        cpu = self.cpu_used(cpu0, self.cpu(), time.monotonic() - m0)
        wait(lambda: not list_jobs(self.client, states=ACTIVE_STATES), 120, "jobs to end", 0.5)
        span = time.monotonic() - m0  # the enqueues and every job's run to its end
        used = self.cpu_used(cpu0, self.cpu(), span)
        runq = self.cpu_used(_as_ticks(runq0), _as_ticks(self.runq()), span)
        jobs = [j for j in list_jobs(self.client, since=t0 - 1) if j["label"] == "steady"]
        to_assigned, to_starting = [], []
        for job in jobs:
            created = epoch(job["created_at"])
            if created is not None and job["assigned_at"]:
                to_assigned.append(epoch(job["assigned_at"]) - created)
            if created is not None and job["started_at"]:
                to_starting.append(epoch(job["started_at"]) - created)
        outcomes: dict[str, int] = {}
        for job in jobs:
            key = (job["termination"] or {}).get("reason") or job["state"]
            outcomes[key] = outcomes.get(key, 0) + 1
        result = {"jobs": len(jobs), "outcomes": outcomes,
                  "rate_achieved": round(sum(e["rate_achieved"] for e in enqueue), 1),
                  "enqueue_errors": sum(sum(e["errors"].values()) for e in enqueue),
                  "post_ms_p99": max((e["latency_ms"]["p99"] or 0) for e in enqueue),
                  "created_to_assigned_ms": percentiles(to_assigned),
                  "created_to_starting_ms": percentiles(to_starting),
                  "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
                  "cpu_percent": cpu, "memory": self.memory(),
                  "until_ended_s": round(span, 1), "cpu_percent_until_ended": used,
                  "runq_percent_until_ended": runq}
        idle = self.idle.get("cpu_percent", {}) if self.idle else {}
        # CPU a job costs each kind: the CPU until every job ended less the idle floor
        # for as long (10 * (percent of a core) * seconds / jobs = milliseconds).
        result["cpu_ms_per_job"] = {
            kind: round(10 * (pct - idle.get(kind, 0.0)) * span / max(1, len(jobs)), 2)
            for kind, pct in used.items()} if idle else {}
        d = result["created_to_starting_ms"]
        say(f"  {len(jobs)} jobs: enqueue -> start-job p50 {d['p50']} / p99 {d['p99']} ms")
        return result

    def phase_failover(self) -> dict[str, Any]:
        n = self.args.supervisors
        links = self.links()
        victim = max(links.items(), key=lambda kv: kv[1])[0]
        leader = next((m for m in self.names
                       if metric(self.metrics[m], "treadmill_instance_leader")), None)
        rebalanced0 = {m: metric(self.metrics[m], "treadmill_supervisor_links_rebalanced_total")
                       for m in self.names if m != victim}
        gates0 = {m: self.gate(m) for m in self.names if m != victim}
        say(f"kill -9 of instance {victim} ({links[victim]} links; leader {leader})")
        load0 = os.getloadavg()[0]
        cpu0, t0 = self.cpu(), time.monotonic()
        os.kill(self.procs[victim].pid, signal.SIGKILL)

        stayed = n - links[victim]

        def moved() -> int:
            """The victim's links now held by another instance."""
            return sum(count for name, count in self.links().items() if name != victim) - stayed
        result = self.curve(moved, links[victim], self.args.failover_timeout, 0.1)
        result["cpu_percent"] = self.cpu_used(cpu0, self.cpu(), time.monotonic() - t0)
        result.update({
            "victim": victim, "victim_links": links[victim], "leader": leader,
            "links": self.links(), "load_before": round(load0, 2),
            "rebalanced_by_survivors": {m: metric(
                self.metrics[m], "treadmill_supervisor_links_rebalanced_total") - r0
                for m, r0 in rebalanced0.items()},
            "handshakes_by_survivors": {m: {k: v - g0[k] for k, v in self.gate(m).items()}
                                        for m, g0 in gates0.items()}})
        say(f"  failover: {result['after_s']} -> {result['links']}; rebalanced "
            f"{result['rebalanced_by_survivors']}")
        return result

    def run(self) -> dict[str, Any]:
        a = self.args
        results: dict[str, Any] = {"machine": host_info(), "revision": revision(ROOT),
                                   "haproxy": balancer.first_version(),
                                   "supervisors": a.supervisors, "instances": a.instances,
                                   "haproxies": a.haproxies, "rate": a.rate,
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                            time.gmtime())}
        for _, count in self.shares():
            balancer.check_descriptors(count)
        if a.quiet_wait:
            results["busy_before"] = round(wait_quiet(0.10, 5.0, a.quiet_wait, say), 3)
        results["load_at_start"] = [round(x, 2) for x in os.getloadavg()]
        self.db = Postgres(self.tmp / "pg", say, durable=False, port=free_port())
        self.conn = psycopg2.connect(self.db.dsn)
        self.conn.autocommit = True
        say(f"starting {a.instances} instances and {a.haproxies} HAProxy processes")
        for name in self.names:
            self.start_instance(name)
        share = max(count for _, count in self.shares())
        for i, port in enumerate(self.balancer_ports):
            self.balancers.append(balancer.start(self.tmp, f"haproxy-{i}", port, self.ports,
                                                 share, a.check_timeout))
        self.token = bootstrap("--database-dsn", self.db.dsn)
        self.client = Client(f"http://127.0.0.1:{self.balancer_ports[0]}", self.token,
                             timeout=60)
        results["memory_idle"] = self.memory()
        results["connect"] = self.phase_connect()
        time.sleep(a.settle)
        if a.idle_window > 0:
            results["idle"] = self.idle = self.phase_idle()
            say(f"  idle: CPU (% of a core) {self.idle['cpu_percent']}")
        if a.rate > 0:
            results["steady"] = self.phase_steady()
        results["failover"] = self.phase_failover()
        results["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
        return results

    def cleanup(self) -> None:
        for proc in self.fleets:
            stop_process(proc, timeout=60)
        for proc in self.procs.values():
            stop_process(proc, timeout=30)
        for proc in self.balancers:
            stop_process(proc, timeout=30)
        if self.client is not None:
            self.client.close()
        if self.conn is not None:
            self.conn.close()
        if self.db is not None:
            self.db.stop()
        remove_temp(self.tmp, self.args.keep_temp, say)


def _as_ticks(ns: dict[str, dict[int, int]]) -> dict[str, dict[int, int]]:
    """Nanoseconds as clock ticks (what :meth:`Bench.cpu_used` divides)."""
    return {kind: {pid: v * procfs.CLK_TCK // 1_000_000_000 for pid, v in by_pid.items()}
            for kind, by_pid in ns.items()}


def _mb(kb: int | None) -> float | None:
    return round(kb / 1024, 1) if kb is not None else None


def table(r: dict[str, Any]) -> str:
    c, f = r["connect"], r["failover"]
    lines = [f"revision {r['revision']}, {r['machine']['nproc']} CPUs "
             f"({r['machine']['cpu_model']}), {r['haproxy']}, started {r['started']}, "
             f"load {r['load_at_start']}",
             f"{r['supervisors']} mock supervisors, {r['instances']} instances, "
             f"{r['haproxies']} HAProxy and fleet processes", "",
             f"connect (fleet start to every link): {c['after_s']} -> {c['links']}",
             "memory after connecting: " + ", ".join(
                 f"{k} {v['rss_mb']} MB" for k, v in c["memory"].items())]
    if "steady" in r:
        s = r["steady"]
        d, e = s["created_to_starting_ms"], s["created_to_assigned_ms"]
        verdict = "met" if (d["p99"] or 1e9) < TARGET_DISPATCH_P99_MS else "missed"
        lines += [f"steady {r['rate']:g} jobs/s ({s['rate_achieved']} achieved, load "
                  f"{s['load_before']} -> {s['load_after']}): {s['jobs']} jobs {s['outcomes']}",
                  f"  enqueue -> assigned p50 {e['p50']} / p99 {e['p99']} ms",
                  f"  enqueue -> start-job p50 {d['p50']} / p99 {d['p99']} / max {d['max']} ms "
                  f"(target < {TARGET_DISPATCH_P99_MS:g} ms: {verdict})",
                  f"  CPU (% of a core) during the enqueues: {s['cpu_percent']}",
                  f"  until every job ended ({s['until_ended_s']} s): CPU "
                  f"{s['cpu_percent_until_ended']}, reactors waiting for a CPU (% of the "
                  f"time, summed) {s['runq_percent_until_ended']}"]
        if "idle" in r:
            lines += [f"  idle before ({r['idle']['seconds']} s): CPU {r['idle']['cpu_percent']}"
                      f", waiting for a CPU {r['idle']['runq_percent']}",
                      f"  CPU per job above idle (ms): {s['cpu_ms_per_job']}"]
    settle = f["after_s"]["100%"]
    verdict = "met" if settle is not None and settle < TARGET_FAILOVER_S else "missed"
    lines += [f"failover after kill -9 of {f['victim']} ({f['victim_links']} links, leader "
              f"{f['leader']}): {f['after_s']} (target < {TARGET_FAILOVER_S:g} s: {verdict})",
              f"  links after: {f['links']}; closed by the survivors' rebalancing: "
              f"{f['rebalanced_by_survivors']}",
              f"  CPU (% of a core) until settled: {f['cpu_percent']}; load average before "
              f"{f['load_before']}",
              f"  survivors' handshake gates meanwhile: {f['handshakes_by_survivors']}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--supervisors", type=int, default=10000)
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--haproxies", type=int, default=3,
                   help="HAProxy processes, each with its own fleet process [3]")
    p.add_argument("--rate", type=float, default=50.0, help="jobs/s, 0: no steady phase [50]")
    p.add_argument("--duration", type=float, default=30.0, help="steady phase, seconds [30]")
    p.add_argument("--run-time", type=float, default=2.0, help="mock workload seconds [2]")
    p.add_argument("--settle", type=float, default=10.0,
                   help="seconds between the fleet connected and the steady phase [10]")
    p.add_argument("--idle-window", type=float, default=10.0,
                   help="seconds of idle CPU measured before the steady phase (0: none) [10]")
    p.add_argument("--connect-timeout", type=float, default=600.0)
    p.add_argument("--failover-timeout", type=float, default=120.0)
    p.add_argument("--check-timeout", default="",
                   help="HAProxy's 'timeout check' (e.g. 5s) [the example's 500ms]")
    quiet_wait_option(p, 0.10)
    p.add_argument("--profile", action="store_true",
                   help="run the instances under cProfile (twistd --profile): NAME.prof in the "
                        "temporary directory, written when they stop; use with --keep-temp")
    p.add_argument("--switchboard-arg", action="append", default=[],
                   help="extra treadmill-switchboard option (repeatable)")
    p.add_argument("--fleet-arg", action="append", default=[],
                   help="extra treadmill.dev.fleet option (repeatable)")
    output_options(p)
    args = p.parse_args(argv)
    if args.instances < 2 or args.haproxies < 1:
        p.error("--instances must be at least 2 and --haproxies at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.access(balancer.HAPROXY, os.X_OK):
        say("haproxy is not installed (tools/setup-env installs it)")
        return 1
    return run(Bench(args), args, table,
               (BenchError, APIError, ClusterError, psycopg2.Error,
                subprocess.SubprocessError, OSError), say)


if __name__ == "__main__":
    sys.exit(main())
