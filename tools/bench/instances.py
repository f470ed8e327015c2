#!/usr/bin/env python3
"""Benchmark: several switchboard instances on one database, behind HAProxy.

    .venv/bin/python tools/bench/instances.py [--supervisors 200] [--instances 3] [--json]

What it starts, measures and prints, and its options: ``tools/bench/README.md``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Any

from benchkit import balancer
from benchkit.api import APIError, Client, epoch, metric
from benchkit.balancer import HAPROXY
from benchkit.cli import BenchError, output_options, run, sayer
from benchkit.daemons import Postgres, bootstrap, remove_temp, start_daemon, temp_dir
from benchkit.host import first_line, host_info, revision
from benchkit.procs import ROOT, VENV, free_port, spawn, stop_process
from benchkit.procs import wait_until as wait

from treadmill.dev.pgcluster import ClusterError

IMAGE = "sha256:" + "ab" * 32


say = sayer("instances")


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = temp_dir("treadmill-instances-")
        self.db: Postgres | None = None
        self.names = [chr(ord("a") + i) for i in range(args.instances)]
        self.ports = {name: free_port() for name in self.names}
        self.metrics = {name: free_port() for name in self.names}
        self.procs: dict[str, subprocess.Popen[bytes] | None] = {}
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.fleet: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client: Client | None = None

    # -- processes -----------------------------------------------------------------

    def start_instance(self, name: str) -> None:
        assert self.db is not None
        cmd = balancer.instance_cmd(
            self.db.dsn, name, self.tmp / "key.pem", self.ports[name], self.metrics[name],
            "--supervisors-ping-interval", "2", "--supervisors-ping-timeout", "4",
            "--instances-rebalance-interval", "2")
        self.procs[name] = start_daemon(cmd, self.tmp / f"{name}.log",
                                        f"http://127.0.0.1:{self.ports[name]}/healthz",
                                        f"instance {name}", level="warn", interval=0.1)

    def start_haproxy(self) -> None:
        self.haproxy = balancer.start(self.tmp, "haproxy", self.port, self.ports,
                                      self.args.supervisors, self.args.check_timeout)

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)

    # -- observations ----------------------------------------------------------------

    def xacts(self) -> int:
        assert self.db is not None
        out = subprocess.run(
            [str(VENV / "python"), "-c",
             "import psycopg2, sys; c = psycopg2.connect(sys.argv[1]); k = c.cursor(); "
             "k.execute(\"SELECT xact_commit + xact_rollback FROM pg_stat_database "
             "WHERE datname = current_database()\"); print(k.fetchone()[0])", self.db.dsn],
            capture_output=True, text=True, timeout=30, check=True)
        return int(out.stdout)

    def scrape(self, name: str, sample: str) -> float:
        return metric(self.metrics[name], sample)

    def passes(self) -> float:
        return sum(self.scrape(n, "treadmill_scheduler_passes_total")
                   + self.scrape(n, "treadmill_scheduler_lock_busy_total") for n in self.names
                   if self.procs.get(n) is not None and self.procs[n].poll() is None)

    def holders(self) -> dict[str, int]:
        assert self.client is not None
        counts: dict[str, int] = {}
        for host in self.client.get("/api/v1/hosts")["hosts"]:
            if host["connected"]:
                counts[host["instance"]] = counts.get(host["instance"], 0) + 1
        return counts

    def job(self, tags: list[str], run_time: float | None = 0.2) -> str:
        assert self.client is not None
        body: dict[str, Any] = {"image": IMAGE, "tags": tags}
        if run_time is not None:
            body["parameters"] = {"mock.run_time": {"value": str(run_time)}}
        status, answer = self.client.request("POST", "/api/v1/jobs", body, retries=3)
        if status != 201:
            raise BenchError(f"enqueue answered {status}: {answer}")
        return answer["id"]

    def state(self, job_id: str) -> dict[str, Any]:
        assert self.client is not None
        return self.client.get(f"/api/v1/jobs/{job_id}")

    # -- phases ----------------------------------------------------------------------

    def txn(self, label: str) -> dict[str, Any]:
        """Transactions per job: one job a second (each ends within it), no polling,
        less the rate of the same setup idle just before."""
        time.sleep(3.0)  # Let connections and rebalancing settle.
        idle0, t0 = self.xacts(), time.monotonic()
        time.sleep(self.args.jobs / 2)
        idle_rate = (self.xacts() - idle0) / (time.monotonic() - t0)
        x0, p0, t0 = self.xacts(), self.passes(), time.monotonic()
        jobs = []
        for _ in range(self.args.jobs):
            jobs.append(self.job(["mock"]))
            time.sleep(1.0)
        took = time.monotonic() - t0
        used = self.xacts() - x0 - idle_rate * took
        passes = self.passes() - p0
        ended = [self.state(job_id)["state"] for job_id in jobs]
        if ended != ["terminated"] * len(jobs):
            raise BenchError(f"jobs still running after 1 s each: {ended}")
        result = {"instances": label, "jobs": self.args.jobs,
                  "transactions_per_job": round(used / self.args.jobs, 1),
                  "idle_transactions_per_s": round(idle_rate, 1),
                  "scheduling_passes_per_job": round(passes / self.args.jobs, 2)}
        say(f"txn ({label}): {result}")
        return result

    def run(self) -> dict[str, Any]:
        args = self.args
        results: dict[str, Any] = {"machine": host_info(), "revision": revision(ROOT),
                                   "haproxy": first_line([HAPROXY, "-v"]),
                                   "supervisors": args.supervisors,
                                   "instances": args.instances}
        self.db = Postgres(self.tmp / "pg", say, durable=False, port=free_port())
        say("starting the first instance and HAProxy")
        self.start_instance(self.names[0])
        self.start_haproxy()
        token = bootstrap("--database-dsn", self.db.dsn)
        self.client = Client(self.url, token)
        token_file = self.tmp / "admin-token"
        token_file.touch(mode=0o600)
        token_file.write_text(token + "\n")
        self.fleet = spawn(
            [str(VENV / "python"), "-m", "treadmill.dev.fleet", "--url", self.url,
             "--admin-token-file", str(token_file), "--count", str(args.supervisors),
             "--tag", "mock",
             "--state", str(self.tmp / "fleet"), "--no-fsync", "--reconnect-initial", "0.5",
             "--reconnect-max", "5", "--heartbeat-interval", "2", "--heartbeat-timeout", "4",
             "--report-interval", "0"],
            self.tmp / "fleet.log", cwd=self.tmp)
        wait(lambda: sum(self.holders().values()) == args.supervisors,
             max(120.0, args.supervisors / 25), "fleet connect",
             0.5)
        results["txn"] = [self.txn("1")]
        say("starting the other instances")
        for name in self.names[1:]:
            self.start_instance(name)
        balance: dict[str, Any] = {}
        share = -(-args.supervisors // args.instances) + 1
        balanced = lambda: (len(self.holders()) == args.instances  # noqa: E731
                            and max(self.holders().values()) <= share)
        balance["join_s"] = round(wait(balanced, 300, "balance after joining", 0.5), 1)
        balance["after_join"] = self.holders()
        results["txn"].append(self.txn(str(args.instances)))
        victim = max(self.holders().items(), key=lambda kv: kv[1])[0]
        say(f"killing instance {victim}")
        self.signal(victim, signal.SIGKILL)
        others = lambda: (victim not in self.holders()  # noqa: E731
                          and sum(self.holders().values()) == args.supervisors)
        balance["failover_s"] = round(wait(others, 120, "failover", 0.25), 1)
        balance["after_kill"] = self.holders()
        self.start_instance(victim)
        balance["rejoin_s"] = round(wait(balanced, 300, "balance after restart", 0.5), 1)
        balance["after_restart"] = self.holders()
        results["balance"] = balance
        say(f"balance: {balance}")
        # A queue that no host can run, and one job that one can.
        assert self.client is not None
        for _ in range(614):
            self.job(["nowhere"], run_time=None)
        latencies = []
        for _ in range(5):
            job_id = self.job(["mock"])
            wait(lambda j=job_id: self.state(j)["assigned_at"] is not None, 60, "assignment",
                 0.02)
            body = self.state(job_id)
            latencies.append(round(epoch(body["assigned_at"]) - epoch(body["created_at"]), 3))
        results["queue"] = {"unrunnable_queued": 614, "assign_latency_s": latencies}
        say(f"queue: {results['queue']}")
        # The leader frozen.
        leader = next(n for n in self.names if self.scrape(n, "treadmill_instance_leader"))
        say(f"freezing the leader, instance {leader}")
        self.signal(leader, signal.SIGSTOP)
        t0 = time.monotonic()
        job_id = self.job(["mock"], run_time=None)
        doomed = self.job(["nowhere"], run_time=None)
        c0 = time.monotonic()
        status, _ = self.client.request("POST", f"/api/v1/jobs/{doomed}/terminate", retries=3)
        cancel = time.monotonic() - c0
        wait(lambda: self.state(job_id)["assigned_at"] is not None, 60, "frozen assignment",
             0.05)
        results["frozen"] = {"assign_after_freeze_s": round(time.monotonic() - t0, 2),
                             "cancel_s": round(cancel, 3), "cancel_status": status}
        self.signal(leader, signal.SIGCONT)
        say(f"frozen: {results['frozen']}")
        return results

    def cleanup(self) -> None:
        for name in self.names:
            self.signal(name, signal.SIGCONT)
        stop_process(self.fleet, timeout=30)
        for proc in self.procs.values():
            stop_process(proc, timeout=30)
        stop_process(self.haproxy, timeout=30)
        if self.client is not None:
            self.client.close()
        if self.db is not None:
            self.db.stop()
        remove_temp(self.tmp, self.args.keep, say)


def table(r: dict[str, Any]) -> str:
    lines = [f"revision {r['revision']}, {r['machine']['nproc']} CPUs "
             f"({r['machine']['cpu_model']}), {r['haproxy']}",
             f"{r['supervisors']} mock supervisors, {r['instances']} instances", "",
             "| instances | transactions per job | idle transactions/s | passes per job |",
             "| ---: | ---: | ---: | ---: |"]
    for t in r["txn"]:
        lines.append(f"| {t['instances']} | {t['transactions_per_job']} | "
                     f"{t['idle_transactions_per_s']} | {t['scheduling_passes_per_job']} |")
    b = r["balance"]
    lines += ["", f"links after joining ({b['join_s']} s): {b['after_join']}",
              f"after a kill -9 ({b['failover_s']} s): {b['after_kill']}",
              f"after its restart ({b['rejoin_s']} s): {b['after_restart']}",
              f"behind {r['queue']['unrunnable_queued']} unrunnable jobs, enqueue to "
              f"assignment: {r['queue']['assign_latency_s']} s",
              f"leader frozen: assigned after {r['frozen']['assign_after_freeze_s']} s, "
              f"cancel {r['frozen']['cancel_s']} s ({r['frozen']['cancel_status']})"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--supervisors", type=int, default=200)
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--jobs", type=int, default=20, help="jobs per txn phase [20]")
    p.add_argument("--check-timeout", default="",
                   help="HAProxy's 'timeout check' (e.g. 5s) [the example's 500ms]")
    output_options(p, "--keep", "keep the temporary directory", "print JSON instead of a table")
    args = p.parse_args(argv)
    if args.instances < 2:
        p.error("--instances must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.access(HAPROXY, os.X_OK):
        say("haproxy is not installed (tools/setup-env installs it)")
        return 1
    return run(Bench(args), args, table,
                        (BenchError, APIError, ClusterError, subprocess.SubprocessError,
                         OSError), say)


if __name__ == "__main__":
    sys.exit(main())
