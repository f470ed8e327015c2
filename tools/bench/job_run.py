#!/usr/bin/env python3
"""Benchmark: the wall time of ``tml job run`` from its start to its exit (issue 14), and of
a failing VM job held for debugging: ``tml job run`` to its exit, then ``tml job cancel``
to the end of ``tml job logs --follow`` of the held console (issue 15).

    .venv/bin/python tools/bench/job_run.py [--runs 5] [--json]

What it starts, measures and prints, and its options: ``tools/bench/README.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from benchkit.cli import BenchError, output_options, run, sayer
from benchkit.daemons import remove_temp, temp_dir
from benchkit.host import first_line, host_info, machine_ticks, revision
from benchkit.procs import ROOT, VENV, free_range

say = sayer(clock=True)


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


EXPECTED = {"demo-fails": 4, "demo-held": 4}
"""The exit status of a run that went as it should, where it is not 0 (the workload failed)."""


class JobRunBench:
    """One devstack, then each command ``runs`` times."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = temp_dir("tml-jobrun-bench-")
        self.state = self.root / "stack"
        self.port = args.port or free_range(30)
        self.started = False

    def devstack(self, *argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """``python -m treadmill.dev.devstack ARGV --state … --port …``."""
        return subprocess.run(
            [str(VENV / "python"), "-m", "treadmill.dev.devstack", *argv,
             "--state", str(self.state), "--port", str(self.port)],
            cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)

    def release(self, env: dict[str, str], output: str, into: list[float]) -> None:
        """A held job's run said how to release its host: follow its console
        (``tml job logs --follow``), cancel it, and add to ``into`` the seconds from the
        cancel's start to the follower's exit (the hold's end closing the stream)."""
        found = re.search(r"tml: job (\S+) failed; its host", output)
        if found is None:
            raise BenchError(f"the held run did not say its job: {output[-800:]}")
        job = found.group(1)
        follower = subprocess.Popen([str(VENV / "tml"), "job", "logs", job, "--follow"],
                                    env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # following
        t0 = time.monotonic()
        subprocess.run([str(VENV / "tml"), "job", "cancel", job], env=env, check=True,
                       capture_output=True, timeout=self.args.run_timeout)
        follower.wait(timeout=self.args.run_timeout)
        into.append(time.monotonic() - t0)
        say(f"released {job}: tml job logs --follow ended {into[-1]:.2f} s after the cancel")

    def series(self, name: str, argv: list[str]) -> dict[str, Any]:
        """Run ``tml ARGV`` ``runs`` times; wall times, exit codes, load (a held run's
        host is released after it: see :meth:`release`)."""
        env = {**os.environ, "TREADMILL_CONFIG": str(self.state / "tml.toml")}
        times: list[float] = []
        codes: list[int] = []
        released: list[float] = []
        load_before = os.getloadavg()[0]
        busy0, total0 = machine_ticks()
        for i in range(self.args.runs):
            artifacts = self.root / f"artifacts-{name}-{i}"
            cmd = [str(VENV / "tml"), *[a.replace("{ART}", str(artifacts)) for a in argv]]
            t0 = time.monotonic()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=self.args.run_timeout, check=False)
            elapsed = time.monotonic() - t0
            times.append(elapsed)
            codes.append(proc.returncode)
            say(f"{name} #{i + 1}: {elapsed:.2f} s, exit {proc.returncode}")
            if "--hold-on-failure" in argv:
                self.release(env, proc.stderr, released)
            elif proc.returncode != EXPECTED.get(name, 0):
                say(f"{name} #{i + 1} output: {(proc.stdout + proc.stderr)[-800:]}")
        busy1, total1 = machine_ticks()
        expected = EXPECTED.get(name, 0)
        ok = [t for t, c in zip(times, codes, strict=True) if c == expected]
        held = {"release_to_logs_end_s": [round(t, 3) for t in released],
                "release_median_s": round(statistics.median(released), 3)} if released else {}
        return {
            "command": "tml " + " ".join(argv).replace("{ART}", "DIR"),
            "times_s": [round(t, 3) for t in times],
            "exit_codes": codes,
            "failed": sum(1 for c in codes if c != expected),
            "cold_s": round(times[0], 3) if times else None,
            "min_s": round(min(ok), 3) if ok else None,
            "median_s": round(statistics.median(ok), 3) if ok else None,
            "p90_s": round(quantile(ok, 0.9), 3) if ok else None,
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
            "cpus_busy": round((busy1 - busy0) / (total1 - total0), 3) if total1 > total0 else None,
            **held,
        }

    def run(self) -> dict[str, Any]:
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "host": host_info(),
            "revision": revision(ROOT),
            "qemu": first_line(["qemu-system-x86_64", "--version"]),
            "load_at_start": [round(v, 2) for v in os.getloadavg()],
            "runs": self.args.runs,
        }
        say(f"starting the devstack (--serial-sim) in {self.state} on port {self.port}")
        t0 = time.monotonic()
        self.started = True
        up = self.devstack("--detach", "--serial-sim", timeout=600)
        if up.returncode != 0:
            raise BenchError(f"devstack up failed: {(up.stdout + up.stderr)[-1500:]}")
        results["devstack_up_s"] = round(time.monotonic() - t0, 2)
        if "tml job submit demo --follow" not in up.stdout:
            raise BenchError("the devstack has no QEMU host or no demo image:\n"
                             + (up.stdout + up.stderr)[-1500:])
        series = {"whoami": ["whoami"],
                  "board": ["job", "run", "board-demo", "--tag", "serial", "--artifacts", "{ART}"],
                  "demo": ["job", "run", "demo", "--artifacts", "{ART}"],
                  "demo-fails": ["job", "run", "demo", "--param", "exit_status=3"],
                  "demo-held": ["job", "run", "demo", "--param", "exit_status=3",
                                "--hold-on-failure", "10m"]}
        results["series"] = {name: self.series(name, argv) for name, argv in series.items()
                             if name in self.args.only}
        return results

    def cleanup(self) -> None:
        if self.started:
            say("stopping the devstack")
            try:
                stop = self.devstack("stop", timeout=180)
                if stop.returncode != 0:
                    say(f"devstack stop: {(stop.stdout + stop.stderr)[-800:]}")
            except subprocess.TimeoutExpired:
                say(f"devstack stop timed out; state kept in {self.root}")
                return
        remove_temp(self.root, self.args.keep_temp, say)


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    host = results["host"]
    lines = [
        f"{results['date']}, revision {results['revision']}, {host['nproc']} CPUs "
        f"({host['cpu_model']}), {host['memory_gib']} GiB, kernel {host['kernel']}, "
        f"Python {host['python']}, {results['qemu']}",
        f"load average at start {results['load_at_start']}; devstack up in "
        f"{results['devstack_up_s']} s",
        "",
        "| command | runs (failed) | cold (1st) s | min s | median s | p90 s "
        "| load before/after | CPUs busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in results["series"].values():
        busy = f"{s['cpus_busy'] * 100:.0f} %" if s["cpus_busy"] is not None else "-"
        lines.append(
            f"| `{s['command']}` | {len(s['times_s'])} ({s['failed']}) | {s['cold_s']} "
            f"| {s['min_s']} | {s['median_s']} | {s['p90_s']} "
            f"| {s['load_before']} / {s['load_after']} | {busy} |")
    for s in results["series"].values():
        if "release_median_s" in s:
            lines.append(f"\n`tml job cancel` to the end of `tml job logs --follow` of the held "
                         f"job: median {s['release_median_s']} s ({s['release_to_logs_end_s']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each command [5]")
    parser.add_argument("--port", type=int, default=0,
                        help="the devstack's first port (it uses 30) [a free range]")
    parser.add_argument("--only", default="whoami,board,demo",
                        help="series to run, comma-separated, of whoami, board, demo, "
                        "demo-fails, demo-held [whoami,board,demo]")
    parser.add_argument("--run-timeout", type=float, default=300.0,
                        help="seconds allowed per tml command [300]")
    output_options(parser, keep_help="keep the state directory")
    args = parser.parse_args(argv)
    args.only = set(args.only.split(","))
    return run(JobRunBench(args), args, table,
                        (BenchError, subprocess.TimeoutExpired, OSError), say)


if __name__ == "__main__":
    sys.exit(main())
