#!/usr/bin/env python3
"""Benchmark: several switchboard instances on one database, behind HAProxy.

    .venv/bin/python tools/bench/instances.py [--supervisors 200] [--instances 3] [--json]

Starts a private PostgreSQL cluster (``treadmill.dev.pgcluster``) in a
temporary directory, ``--instances`` switchboards as their own processes
(``twistd treadmill-switchboard``, access log off, ``TREADMILL_LOG_LEVEL=warn``,
one key file for all), HAProxy with ``etc/haproxy/haproxy.cfg`` (its bind and
server lines replaced) and ``--supervisors`` mock supervisors in one more
process (``python -m treadmill.dev.fleet``) connected through the
balancer. The figures of fault-tolerance issue 13:

  txn       database transactions per job (``pg_stat_database``: commits and
            rollbacks, less the idle rate of the same setup just before) and
            scheduling passes per job, timer passes included (the instances'
            ``/metrics``): ``--jobs`` jobs, one a second, each run to its end
            within it (the bench does not poll meanwhile); with one instance
            running, then with all;
  balance   links per instance after the others joined (rebalancing), after
            one instance is killed (SIGKILL), and after it is back, with the
            time each took;
  queue     614 jobs that no host can run, then one that a host can: its
            enqueue-to-assignment latency (five times);
  frozen    the leader frozen with SIGSTOP: enqueue-to-assignment of a job and
            the latency of a cancel while it is frozen.

Everything listens on 127.0.0.1 only, every wait is bounded, and everything
started is stopped at the end (also on Ctrl-C or an error). Progress goes to
standard error, the summary (or ``--json``) to standard output. Results are
recorded in ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH = Path(__file__).resolve().parent
for _path in (str(ROOT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import benchkit  # noqa: E402
from fleet_client import APIError, Client, epoch  # noqa: E402
from fleet_proc import free_port, spawn, stop_process  # noqa: E402

from treadmill.dev.pgcluster import Cluster, ClusterError  # noqa: E402

VENV = ROOT / ".venv" / "bin"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
IMAGE = "sha256:" + "ab" * 32


def say(message: str) -> None:
    print(f"[instances] {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


def wait(check: Any, timeout: float, what: str, interval: float = 0.1) -> float:
    """Seconds until ``check()`` is true; :class:`BenchError` after ``timeout``."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)
    return time.monotonic() - t0


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="treadmill-instances-"))
        os.chmod(self.tmp, 0o755)  # The postgres user must reach its data directory.
        self.cluster: Cluster | None = None
        self.names = [chr(ord("a") + i) for i in range(args.instances)]
        self.ports = {name: free_port() for name in self.names}
        self.metrics = {name: free_port() for name in self.names}
        self.procs: dict[str, subprocess.Popen[bytes] | None] = {}
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.fleet: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client: Client | None = None
        self.dsn = ""

    # -- processes -----------------------------------------------------------------

    def start_instance(self, name: str) -> None:
        cmd = [str(VENV / "twistd"), "--nodaemon", "--pidfile=",
               "--logger=treadmill.common.logging.text", "treadmill-switchboard",
               "--database-dsn", self.dsn, "--instance", name,
               "--capabilities-signing-key", str(self.tmp / "key.pem"),
               "--listen", f"tcp:{self.ports[name]}:interface=127.0.0.1",
               "--metrics-listen", f"tcp:{self.metrics[name]}:interface=127.0.0.1",
               "--http-access-log", "false", "--supervisors-ping-interval", "2",
               "--supervisors-ping-timeout", "4", "--instances-rebalance-interval", "2"]
        env = {**os.environ, "TREADMILL_LOG_LEVEL": "warn"}
        self.procs[name] = spawn(cmd, self.tmp / f"{name}.log", cwd=self.tmp, env=env)
        wait(lambda: self._healthy(self.ports[name]), 60, f"instance {name} start")

    def _healthy(self, port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start_haproxy(self) -> None:
        text = (ROOT / "etc" / "haproxy" / "haproxy.cfg").read_text()
        text = re.sub(r"^    bind .*\n", f"    bind 127.0.0.1:{self.port}\n", text, flags=re.M)
        # Two connections per supervisor: the example's maxconn 4000 holds about 1,990.
        maxconn = max(4000, 2 * self.args.supervisors + 1000)
        # HAProxy wants about 2 * maxconn descriptors and cannot go over the hard limit.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and 2 * maxconn + 100 > hard:
            raise BenchError(f"{self.args.supervisors} supervisors need HAProxy's maxconn "
                             f"{maxconn}, about {2 * maxconn + 100} descriptors: over "
                             f"RLIMIT_NOFILE {hard}")
        text = re.sub(r"^    maxconn .*\n", f"    maxconn {maxconn}\n", text, flags=re.M)
        if self.args.check_timeout:
            text = re.sub(r"^    timeout check .*\n",
                          f"    timeout check {self.args.check_timeout}\n", text, flags=re.M)
        text = re.sub(r"^    server .*\n", "", text, flags=re.M).rstrip("\n") + "\n"
        text += "".join(f"    server {n} 127.0.0.1:{p} check\n" for n, p in self.ports.items())
        config = self.tmp / "haproxy.cfg"
        config.write_text(text)
        self.haproxy = spawn([HAPROXY, "-db", "-f", str(config)], self.tmp / "haproxy.log",
                             cwd=self.tmp)
        wait(lambda: self._healthy(self.port), 30, "haproxy start")

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)

    # -- observations ----------------------------------------------------------------

    def xacts(self) -> int:
        out = subprocess.run(
            [str(VENV / "python"), "-c",
             "import psycopg2, sys; c = psycopg2.connect(sys.argv[1]); k = c.cursor(); "
             "k.execute(\"SELECT xact_commit + xact_rollback FROM pg_stat_database "
             "WHERE datname = current_database()\"); print(k.fetchone()[0])", self.dsn],
            capture_output=True, text=True, timeout=30, check=True)
        return int(out.stdout)

    def scrape(self, name: str, metric: str) -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics[name]}/metrics",
                                        timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        found = re.search(rf"^{metric} ([0-9.e+]+)$", text, flags=re.M)
        return float(found.group(1)) if found else 0.0

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
        results: dict[str, Any] = {"machine": benchkit.host_info(),
                                   "revision": benchkit.revision(ROOT),
                                   "haproxy": benchkit.first_line([HAPROXY, "-v"]),
                                   "supervisors": args.supervisors,
                                   "instances": args.instances}
        self.cluster = Cluster(self.tmp / "pg", port=free_port(), durable=False)
        self.cluster.init()
        self.cluster.start()
        self.cluster.create_database("treadmill_bench")
        self.dsn = self.cluster.dsn("treadmill_bench")
        say("starting the first instance and HAProxy")
        self.start_instance(self.names[0])
        self.start_haproxy()
        out = subprocess.run([str(VENV / "python"), "-m", "treadmill.switchboard.bootstrap",
                              "--database-dsn", self.dsn, "--admin", "bench"],
                             capture_output=True, text=True, timeout=60, check=True)
        token = out.stdout.strip()
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
        stop_process(self.fleet)
        for proc in self.procs.values():
            stop_process(proc)
        stop_process(self.haproxy)
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            try:
                self.cluster.stop()
            except ClusterError as e:
                say(f"stopping PostgreSQL: {e}")
        if self.args.keep:
            say(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


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
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--json-out", help="also write the JSON to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.instances < 2:
        p.error("--instances must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.access(HAPROXY, os.X_OK):
        say("haproxy is not installed (tools/setup-env installs it)")
        return 1
    bench = Bench(args)
    return benchkit.run(bench, args, table,
                        (BenchError, APIError, ClusterError, subprocess.SubprocessError,
                         OSError), say)


if __name__ == "__main__":
    sys.exit(main())
