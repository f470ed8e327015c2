#!/usr/bin/env python3
"""Benchmark: CPU time per supervisor link accepted, in the switchboard, the fleet and PostgreSQL.

    .venv/bin/python tools/bench/linkcpu.py [--supervisors 1000] [--rounds 3] [--json]

A fleet of mock supervisors (``treadmill.dev.fleet``) links to one switchboard
(``twistd``) through HAProxy, on a private PostgreSQL. Each round kills HAProxy
(SIGKILL) and starts it again: every link closes at once and every supervisor
links again to the same, warm switchboard. CPU time is read from ``/proc`` for
each process (not wall time, so other work on the machine skews it little);
the idle rate measured just before the round (pings, metrics polling) is taken
off. The switchboard and the fleet run this checkout's ``treadmill`` (``PYTHONPATH``).
What it prints and its options: ``tools/bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from benchkit import balancer, procfs
from benchkit.api import metric
from benchkit.cli import BenchError, bench_parser, missing, options, output_options, run, sayer
from benchkit.daemons import Postgres, bootstrap, remove_temp, start_daemon, temp_dir
from benchkit.host import host_info, stamp
from benchkit.procs import ROOT, Profiler, free_port, spawn, stop_process, wait_until

from treadmill.dev.pgcluster import ClusterError

LINKS = "treadmill_supervisor_links"
TICK = os.sysconf("SC_CLK_TCK")

say = sayer(clock=True)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.n = args.supervisors
        self.tmp = temp_dir("tml-linkcpu-")
        self.python = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() \
            else sys.executable
        self.db: Postgres | None = None
        self.port, self.metrics_port, self.lb_port = free_port(), free_port(), free_port()
        self.switchboard: subprocess.Popen[bytes] | None = None
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.fleet: subprocess.Popen[bytes] | None = None
        self.connected = -1
        self.results: dict[str, Any] = {}
        self.profiler = Profiler(args.py_spy, self.results)

    # -- processes ----------------------------------------------------------------------

    def start(self) -> None:
        self.db = Postgres(self.tmp / "pg", say)
        cmd = balancer.instance_cmd(self.db.dsn, "swb-1", self.tmp / "key.pem", self.port,
                                    self.metrics_port, *self.args.switchboard_arg)
        self.switchboard = start_daemon(cmd, self.tmp / "switchboard.log",
                                        f"http://127.0.0.1:{self.port}/healthz",
                                        "the switchboard", level="warn", interval=0.1)
        token = bootstrap("--database-dsn", self.db.dsn)
        self.start_haproxy()
        a = self.args
        cmd = [self.python, "-m", "treadmill.dev.fleet", "--url",
               f"http://127.0.0.1:{self.lb_port}", "--count", str(self.n),
               "--state", str(self.tmp / "fleet"), "--report-interval", "0.25", "--no-fsync",
               "--reconnect-initial", f"{a.reconnect:g}", "--reconnect-max", f"{a.reconnect:g}",
               *a.fleet_arg]
        self.fleet = spawn(cmd, self.tmp / "fleet.log", cwd=self.tmp,
                           env=dict(os.environ, TREADMILL_TOKEN=token), stdout_pipe=True)
        threading.Thread(target=self._read_fleet, daemon=True, name="fleet-reader").start()

    def start_haproxy(self) -> None:
        self.haproxy = balancer.start(self.tmp, "haproxy", self.lb_port, {"swb-1": self.port},
                                      self.n, "2s")

    def _read_fleet(self) -> None:
        assert self.fleet is not None and self.fleet.stdout is not None
        with (self.tmp / "fleet.log").open("ab") as out:
            for raw in self.fleet.stdout:
                out.write(raw)
                for word in raw.decode("utf-8", "replace").split():
                    key, _, value = word.partition("=")
                    if key == "connected" and value.isdigit():
                        self.connected = int(value)

    def cleanup(self) -> None:
        self.profiler.stop_all()
        for proc in (self.fleet, self.haproxy, self.switchboard):
            with contextlib.suppress(Exception):
                stop_process(proc, signal.SIGTERM, timeout=30)
        if self.db is not None:
            self.db.stop()
        remove_temp(self.tmp, self.args.keep_temp, say)

    # -- readings -----------------------------------------------------------------------

    def links(self) -> int:
        return int(metric(self.metrics_port, LINKS))

    def xacts(self) -> int:
        """Transactions the database committed or rolled back so far (statistics are
        flushed by each backend within about a second of going idle)."""
        import psycopg2

        assert self.db is not None
        with contextlib.closing(psycopg2.connect(self.db.dsn)) as conn, conn.cursor() as cur:
            cur.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                        "WHERE datname = current_database()")
            return int(cur.fetchone()[0])

    def reading(self) -> dict[str, float]:
        """CPU seconds so far of each process, transactions, and the time."""
        assert self.db is not None and self.switchboard and self.fleet
        pg = procfs.tree_ticks(self.db.postmaster_pid())
        return {"t": time.monotonic(),
                "switchboard": (procfs.cpu_ticks(self.switchboard.pid) or 0) / TICK,
                "fleet": (procfs.cpu_ticks(self.fleet.pid) or 0) / TICK,
                "_pg": pg, "xacts": self.xacts()}

    @staticmethod
    def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
        out = {k: after[k] - before[k] for k in ("t", "switchboard", "fleet", "xacts")}
        out["postgres"] = procfs.ticks_delta(before["_pg"], after["_pg"])
        return out

    def watch(self, seconds: float) -> None:
        """Poll the link gauge for ``seconds`` as the rounds do (the same polling cost)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.links()
            time.sleep(self.args.poll)

    # -- phases -------------------------------------------------------------------------

    def round(self, number: int) -> dict[str, Any]:
        a = self.args
        idle0 = self.reading()
        self.watch(a.idle)
        start = self.reading()
        idle = self.delta(idle0, start)
        t0 = time.monotonic()
        os.kill(self.haproxy.pid, signal.SIGKILL)  # type: ignore[union-attr]
        self.haproxy.wait(10)  # type: ignore[union-attr]
        wait_until(lambda: self.links() == 0, 30, "every link closed", interval=a.poll)
        self.start_haproxy()
        back = wait_until(lambda: self.links() == self.n and self.connected == self.n,
                          a.timeout, f"all {self.n} links back", interval=a.poll)
        self.watch(a.settle)
        end = self.reading()
        moved = self.delta(start, end)
        rate = {k: idle[k] / max(idle["t"], 1e-6) for k in ("switchboard", "fleet", "postgres",
                                                              "xacts")}
        per = {k: (moved[k] - rate[k] * moved["t"]) / self.n for k in rate}
        result = {
            "round": number, "back_s": round(time.monotonic() - t0 - a.settle, 2),
            "wait_links_s": round(back, 2),
            "cpu_ms_per_link": {k: round(1000 * per[k], 3)
                                for k in ("switchboard", "fleet", "postgres")},
            "xacts_per_link": round(per["xacts"], 2),
            "idle_cpu_pct": {k: round(100 * rate[k], 1)
                             for k in ("switchboard", "fleet", "postgres")},
        }
        result["cpu_ms_per_link"]["total"] = round(sum(result["cpu_ms_per_link"].values()), 3)
        c = result["cpu_ms_per_link"]
        say(f"  round {number}: switchboard {c['switchboard']} ms, fleet {c['fleet']} ms, "
            f"PostgreSQL {c['postgres']} ms per link; {result['xacts_per_link']} "
            f"transactions per link; back in {result['back_s']} s")
        return result

    def run(self) -> dict[str, Any]:
        a = self.args
        stamp(self.results, host_info(), vars(a), ROOT)
        self.start()
        assert self.db is not None
        self.results["machine"]["postgresql"] = self.db.version()
        self.results["machine"]["haproxy"] = balancer.first_version()
        say(f"waiting for {self.n} links")
        wait_until(lambda: self.links() == self.n and self.connected == self.n,
                   120 + self.n / 20, f"all {self.n} links", interval=a.poll)
        self.watch(a.warmup)
        for name, proc in (("switchboard", self.switchboard), ("fleet", self.fleet)):
            self.profiler.start(proc.pid if proc else None, name, "--rate", "200",
                                "--nonblocking")
        rounds = [self.round(i + 1) for i in range(a.rounds)]
        self.profiler.stop_all()
        self.results["rounds"] = rounds
        self.results["median"] = {
            "cpu_ms_per_link": {k: round(statistics.median(r["cpu_ms_per_link"][k]
                                                           for r in rounds), 3)
                                for k in ("switchboard", "fleet", "postgres", "total")},
            "xacts_per_link": round(statistics.median(r["xacts_per_link"] for r in rounds), 2)}
        return self.results


def table(results: dict[str, Any]) -> str:
    rows = [("round", "switchboard ms", "fleet ms", "PostgreSQL ms", "total ms", "xacts",
             "back s")]
    for r in results["rounds"]:
        c = r["cpu_ms_per_link"]
        rows.append((str(r["round"]), f"{c['switchboard']:.3f}", f"{c['fleet']:.3f}",
                     f"{c['postgres']:.3f}", f"{c['total']:.3f}", f"{r['xacts_per_link']:.2f}",
                     f"{r['back_s']:.2f}"))
    m = results["median"]
    c = m["cpu_ms_per_link"]
    rows.append(("median", f"{c['switchboard']:.3f}", f"{c['fleet']:.3f}",
                 f"{c['postgres']:.3f}", f"{c['total']:.3f}", f"{m['xacts_per_link']:.2f}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return (f"CPU per link accepted ({results['parameters']['supervisors']} supervisors, "
            f"revision {results['revision']}):\n" + "\n".join(lines))


def main() -> int:
    p = bench_parser("linkcpu.py", __doc__ or "", "")
    options(p, (
        ("--supervisors", int, 1000, "mock supervisors (links) [1000]"),
        ("--rounds", int, 3, "times every link is closed and accepted again [3]"),
        ("--idle", float, 3.0, "seconds of idle reading before each round [3]"),
        ("--settle", float, 2.0, "seconds after the last link before the reading [2]"),
        ("--warmup", float, 3.0, "seconds after the first links, before round 1 [3]"),
        ("--reconnect", float, 0.5, "the fleet's reconnect delay (initial and max) [0.5]"),
        ("--poll", float, 0.25, "seconds between polls of the link gauge [0.25]"),
        ("--timeout", float, 120.0, "seconds for the links to come back [120]"),
    ))
    p.add_argument("--switchboard-arg", action="append", default=[], metavar="ARG",
                   help="extra switchboard option (repeatable)")
    p.add_argument("--fleet-arg", action="append", default=[], metavar="ARG",
                   help="extra treadmill.dev.fleet option (repeatable)")
    p.add_argument("--py-spy", metavar="DIR",
                   help="sample the switchboard and the fleet during the rounds (raw stacks "
                        "in DIR); it perturbs the figures")
    output_options(p)
    args = p.parse_args()
    if (code := missing("linkcpu.py", "haproxy")) is not None:
        return code
    # The processes measured run this checkout's code (the .venv may name another).
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return run(Bench(args), args, table, (BenchError, ClusterError, OSError,
                                          subprocess.SubprocessError), say)


if __name__ == "__main__":
    sys.exit(main())
