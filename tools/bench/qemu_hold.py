#!/usr/bin/env python3
"""Benchmark of holding a failed QEMU job's VM (``hold_on_failure``), beside a failed job
that is not held.

    .venv/bin/python tools/bench/qemu_hold.py [--rounds 3] [--shutdown-timeout 2] [--json]

What it starts, measures and prints, and its options: ``tools/bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from benchkit.cli import BenchError, bench_parser, output_options, run, sayer
from benchkit.host import host_info, revision
from benchkit.procs import ROOT
from benchkit.report import cell

say = sayer("qemu_hold")
EXIT_LINE = b'"type":"exit"'
COLUMNS = (("ref_exit_to_end", "ref: exit->ended"), ("exit_to_held", "exit->held"),
           ("readopt", "restart->services"), ("release", "release->torn down"))


class Reporter:
    """An ``IJobReporter`` that stamps what matters here with the reactor's clock."""

    def __init__(self, reactor: Any):
        from twisted.internet.defer import Deferred

        self.reactor = reactor
        self.console_data = b""
        self.exit_at: float | None = None
        self.ended: Deferred[tuple[str, tuple[Any, ...]]] = Deferred()
        self.ended_at: float | None = None
        self.offered: Deferred[float] = Deferred()

    def console(self, data: bytes) -> None:
        self.console_data += data
        if self.exit_at is None and EXIT_LINE in self.console_data:
            self.exit_at = self.reactor.seconds()

    def services(self, services: dict[str, Any]) -> None:
        if "ssh" in services and not self.offered.called:
            self.offered.callback(self.reactor.seconds())

    def _end(self, what: str, *args: Any) -> None:
        if not self.ended.called:
            self.ended_at = self.reactor.seconds()
            self.ended.callback((what, args))

    def exited(self, status: int, message: str = "") -> None:
        self._end("exited", status, message)

    def failed(self, reason: str, message: str = "") -> None:
        self._end("failed", reason, message)

    def stopped(self, reason: str, message: str = "") -> None:
        self._end("stopped", reason, message)

    def stage(self, name: str) -> None: ...
    def ready(self) -> None: ...
    def terminating(self, reason: str | None = None) -> None: ...
    def result(self, message: dict[str, Any]) -> None: ...
    def ssh_host_keys(self, keys: list[str]) -> None: ...


def qemu_processes(job_id: str) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if f"treadmill-{job_id}".encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    count += 1
            except OSError:
                pass
    return count


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="tqh-", dir="/tmp")

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.work + "-kept", ignore_errors=True)

    def run(self) -> dict[str, Any]:
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred

        built = subprocess.run([sys.executable, str(ROOT / "tools" / "build-test-image"),
                                "--json", *(["--cache", self.args.cache] if self.args.cache
                                            else [])], capture_output=True, text=True)
        if built.returncode != 0:
            raise BenchError(f"tools/build-test-image failed: {built.stderr[-500:]}")
        image = json.loads(built.stdout)
        results: dict[str, Any] = {"machine": {**host_info(), "revision": revision(ROOT),
                                               "loadavg": os.getloadavg()},
                                   "options": vars(self.args), "rounds": []}

        async def main() -> None:
            for number in range(self.args.rounds):
                say(f"round {number + 1} of {self.args.rounds}")
                results["rounds"].append(await self.round(reactor, image))
            results["machine"]["loadavg_after"] = os.getloadavg()

        done = Deferred.fromCoroutine(main())
        outcome: list[Any] = []
        done.addBoth(outcome.append).addBoth(lambda _: reactor.stop())
        reactor.run()
        if outcome and hasattr(outcome[0], "raiseException"):
            outcome[0].raiseException()
        return results

    async def round(self, reactor: Any, image: dict[str, Any]) -> dict[str, float]:
        from treadmill.images import format as fmt
        from treadmill.supervisor.drivers.qemu import QemuDriver, QemuSettings
        from treadmill.supervisor.fetch import FetchedImage

        manifest = Path(image["manifest"]).read_bytes()
        parsed = fmt.parse_image(fmt.load_manifest(manifest))
        paths = {d.digest: os.path.join(image["dir"], name) for name, d in parsed.files()}

        class Fetcher:
            async def fetch(self, _image: Any) -> FetchedImage:
                return FetchedImage(fmt.digest_of(manifest), "demo", parsed, manifest, paths)

            def can_fetch(self, _image: Any) -> bool:
                return True

            def release(self, _fetched: Any) -> None: ...
            def pin(self, _digests: Any, image: Any = None) -> None: ...
            def release_digests(self, _digests: Any) -> None: ...

        settings = QemuSettings(accel=self.args.accel, memory=256, work_dir=self.work,
                                shutdown_timeout=self.args.shutdown_timeout)

        def spec(hold: float | None) -> dict[str, Any]:
            job: dict[str, Any] = {"id": str(uuid.uuid4()), "image": {"digest": "x"},
                                   "parameters": {"exit_status": {"value": "3"}}}
            if hold is not None:
                job["hold_on_failure"] = hold
            return job

        out: dict[str, float] = {}
        driver = QemuDriver(reactor, settings, fetcher=Fetcher())  # type: ignore[arg-type]
        reference, reporter = spec(None), Reporter(reactor)
        await driver.start(reference, reporter)
        what, _ = await reporter.ended
        assert what == "exited" and reporter.exit_at is not None and reporter.ended_at
        out["ref_exit_to_end"] = reporter.ended_at - reporter.exit_at

        held, reporter = spec(600.0), Reporter(reactor)
        await driver.start(held, reporter)
        what, _ = await reporter.ended
        assert what == "exited" and reporter.exit_at is not None and reporter.ended_at
        out["exit_to_held"] = reporter.ended_at - reporter.exit_at
        if qemu_processes(held["id"]) != 1:
            raise BenchError("the held VM is not running")
        await driver.shutdown()  # a supervisor restart: the held VM lives on
        began = reactor.seconds()
        again, reporter = QemuDriver(reactor, settings, fetcher=Fetcher()), Reporter(reactor)
        if not again.adopt_held(held, reporter):  # type: ignore[arg-type]
            raise BenchError("the held VM was not re-adopted")
        out["readopt"] = await reporter.offered - began
        began = reactor.seconds()
        await again.stop(held["id"], "user_terminated")
        what, _ = await reporter.ended
        assert what == "stopped" and reporter.ended_at is not None
        out["release"] = reporter.ended_at - began
        if qemu_processes(held["id"]):
            raise BenchError("the released VM is still running")
        await again.shutdown()
        return out


def table(results: dict[str, Any]) -> str:
    rounds = results["rounds"]
    lines = ["| | " + " | ".join(h for _, h in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for number, row in enumerate(rounds, 1):
        lines.append(f"| round {number} | " + " | ".join(cell(row[k], ".3f") for k, _ in COLUMNS)
                     + " |")
    for name, pick in (("median", lambda v: sorted(v)[len(v) // 2]), ("max", max)):
        lines.append(f"| {name} | " + " | ".join(
            cell(pick([r[k] for r in rounds]), ".3f") for k, _ in COLUMNS) + " |")
    machine = results["machine"]
    lines.append(f"\nrevision {machine['revision']}, load average {machine['loadavg']} "
                 f"(after: {machine.get('loadavg_after')})")
    return "\n".join(lines)


def main() -> int:
    parser = bench_parser("qemu_hold.py", __doc__ or "", "See tools/bench/README.md.")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--accel", default="tcg", help="qemu.accel (default tcg)")
    parser.add_argument("--shutdown-timeout", type=float, default=2.0,
                        help="qemu.shutdown_timeout: the test image ignores the power "
                             "button, so a release waits this long, then quits (default 2)")
    parser.add_argument("--cache", help="tools/build-test-image's cache (default its own)")
    output_options(parser)
    args = parser.parse_args()
    if not shutil.which("qemu-system-x86_64"):
        say("qemu-system-x86_64 is not installed")
        return 1
    return run(Bench(args), args, table, (BenchError,), say)


if __name__ == "__main__":
    sys.exit(main())
