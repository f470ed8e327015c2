#!/usr/bin/env python3
"""Serial console capture: bytes lost and the capture's CPU cost (docs/performance.md).

What it starts, measures and prints, and its options: ``tools/bench/README.md``.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
import tty
from pathlib import Path
from typing import Any

from benchkit.host import host_info, machine_ticks
from benchkit.procs import ROOT

HERE = Path(__file__).resolve()
LINE_BITS = 10  # 8N1: start bit, 8 data bits, stop bit


def payload(size: int) -> bytes:
    """``size`` bytes of console-like text: numbered lines of a kernel-ish log."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += (f"[{i / 1000:12.6f}] bench: line {i:08d} sensor={i * 7919 % 100000:05d} "
                f"state=ok lorem ipsum dolor sit amet\r\n").encode()
        i += 1
    return bytes(out[:size])


# -- the sender (a board's UART) ----------------------------------------------------------


def sender(rate: float, size: int, tick: float) -> int:
    """Own a pty, print its slave path, wait for ``go`` on stdin, send, report JSON."""
    data = payload(size)
    master, slave = os.openpty()
    tty.setraw(slave)
    print(os.ttyname(slave), flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    cpu0 = time.process_time()
    sent = dropped = writes = 0
    start = time.monotonic()
    if rate <= 0:  # unpaced: as fast as the pty takes it
        view = memoryview(data)
        while sent < size:
            n = os.write(master, view[sent:sent + 65536])
            sent += n
            writes += 1
    else:
        os.set_blocking(master, False)
        next_tick = start
        while sent < size:
            due = min(size, int(rate * (time.monotonic() - start)))
            if due > sent:
                try:
                    n = os.write(master, data[sent:due])
                except OSError as e:
                    if e.errno != errno.EAGAIN:
                        raise
                    n = 0
                writes += 1
                dropped += due - sent - n  # a UART cannot wait: the rest is lost
                sent = due
            next_tick += tick
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    seconds = time.monotonic() - start
    print(json.dumps({"bytes": size, "sha256": hashlib.sha256(data).hexdigest(),
                      "dropped": dropped, "writes": writes, "seconds": seconds,
                      "cpu_seconds": time.process_time() - cpu0}), flush=True)
    sys.stdin.readline()  # keep the pty open until the capture is done
    os.close(master)
    os.close(slave)
    return 0


# -- the capture (the real serial driver) --------------------------------------------------


def capture(device: str, baud: int, size: int, idle: float) -> int:
    """Run the serial driver on ``device`` with a hashing reporter; print JSON at the end."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import LoopingCall, deferLater
    from zope.interface import implementer

    from treadmill.protocol.agent import ConsoleAgentFilter
    from treadmill.supervisor.drivers import IJobReporter
    from treadmill.supervisor.drivers.serial.driver import SerialDriver, _Run
    from treadmill.supervisor.drivers.serial.settings import SerialSettings

    result: dict[str, Any] = {}

    @implementer(IJobReporter)
    class HashingReporter:
        """Hashes and counts the console; ignores the rest."""

        def __init__(self) -> None:
            self.sha = hashlib.sha256()
            self.bytes = 0
            self.calls = 0
            self.first: float | None = None
            self.last = 0.0

        def console(self, data: bytes) -> None:
            now = time.monotonic()
            if self.first is None:
                self.first = now
            self.last = now
            self.sha.update(data)
            self.bytes += len(data)
            self.calls += 1
            if self.bytes >= size:
                finish()

        def stage(self, name: str) -> None: ...
        def ready(self) -> None: ...
        def terminating(self, reason: str | None = None) -> None: ...
        def exited(self, exit_status: int, message: str = "") -> None: ...
        def failed(self, reason: str, message: str = "") -> None: ...
        def stopped(self, reason: str, message: str = "") -> None: ...
        def services(self, services: dict[str, tuple[str, int]]) -> None: ...

    reporter = HashingReporter()
    settings = SerialSettings.from_values({
        "serial.device": device, "serial.baud_rate": baud,
        "serial.flash.command": ["true"], "serial.clean.after": "none"})
    driver = SerialDriver(reactor, settings)
    usage0: list[float] = []

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def finish() -> None:
        if result:
            return
        result.update(bytes=reporter.bytes, sha256=reporter.sha.hexdigest(),
                      cpu_seconds=cpu() - usage0[0], calls=reporter.calls,
                      seconds=(reporter.last - reporter.first) if reporter.first else 0.0)
        reactor.callLater(0, stop)

    def stop() -> None:
        if watchdog.running:
            watchdog.stop()
        d = driver.shutdown()
        d.addBoth(lambda _: reactor.stop())

    def check_idle() -> None:
        if reporter.first is not None and time.monotonic() - reporter.last > idle:
            finish()

    watchdog = LoopingCall(check_idle)

    async def main() -> None:
        while not driver.present:
            if driver.port_error:
                raise SystemExit(f"capture: cannot open {device}: {driver.port_error}")
            await deferLater(reactor, 0.01, lambda: None)
        run = _Run(driver, {"id": "bench", "image": {}}, reporter, {})
        await driver._start_bridge(run)
        run.phase, run.booted = "ready", True
        run.filter = ConsoleAgentFilter(run, run.console, driver.write)
        driver.run = run
        watchdog.start(0.1)
        usage0.append(cpu())
        print("ready", flush=True)

    def failed(f: Any) -> None:
        print(f"capture: {f.getTraceback()}", file=sys.stderr)
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(main()).addErrback(failed))
    reactor.run()
    print(json.dumps(result), flush=True)
    return 0 if result else 1


# -- the orchestrator -----------------------------------------------------------------------


def phase(name: str, baud: int, rate: float, size: int, tick: float, idle: float
          ) -> dict[str, Any]:
    """One run: a sender and a capture process; returns the figures."""
    me = [sys.executable, str(HERE)]
    send = subprocess.Popen([*me, "_send", "--rate", str(rate), "--bytes", str(size),
                             "--tick", str(tick)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert send.stdin is not None and send.stdout is not None
    grab: subprocess.Popen[str] | None = None
    try:
        device = send.stdout.readline().strip()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        grab = subprocess.Popen([*me, "_capture", "--device", device, "--baud", str(baud),
                                 "--bytes", str(size), "--idle", str(idle)],
                                stdout=subprocess.PIPE, text=True, env=env)
        assert grab.stdout is not None
        if grab.stdout.readline().strip() != "ready":
            raise SystemExit(f"{name}: the capture process did not start")
        busy0, total0 = machine_ticks()
        load0 = os.getloadavg()[0]
        send.stdin.write("go\n")
        send.stdin.flush()
        sent = json.loads(send.stdout.readline())
        got = json.loads(grab.stdout.readline())
        busy1, total1 = machine_ticks()
        grab.wait(30)
        send.stdin.write("done\n")
        send.stdin.flush()
        send.wait(30)
    finally:
        for proc in (grab, send):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    cores = os.cpu_count() or 1
    wall = sent["seconds"]
    machine = (busy1 - busy0) / max(1, total1 - total0)  # share of all cores
    ours = (got["cpu_seconds"] + sent["cpu_seconds"]) / max(wall, 1e-9) / cores
    mb = got["bytes"] / 1e6
    return {
        "phase": name, "baud": baud if rate > 0 else None,
        "rate_bytes_per_s": rate if rate > 0 else None,
        "bytes_sent": sent["bytes"], "bytes_captured": got["bytes"],
        "bytes_lost": sent["bytes"] - got["bytes"], "dropped_by_pty": sent["dropped"],
        "sha256_equal": sent["sha256"] == got["sha256"],
        "seconds": wall, "throughput_mb_s": mb / wall if wall else None,
        "capture_cpu_seconds": got["cpu_seconds"],
        "cpu_seconds_per_mb": got["cpu_seconds"] / mb if mb else None,
        "core_percent": 100 * got["cpu_seconds"] / wall if wall else None,
        "reads": got["calls"], "bytes_per_read": got["bytes"] / max(1, got["calls"]),
        "sender_writes": sent["writes"], "sender_cpu_seconds": sent["cpu_seconds"],
        "machine_busy_percent": 100 * machine,
        "other_load_percent": max(0.0, 100 * (machine - ours)),
        "loadavg_1min_before": load0,
    }


def machine_info() -> dict[str, Any]:
    import serial

    import twisted

    host = host_info()
    return {"cpus": os.cpu_count(), "cpu_model": host["cpu_model"], "kernel": host["kernel"],
            "python": host["python"], "twisted": twisted.__version__,
            "pyserial": serial.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    s = sub.add_parser("_send")
    s.add_argument("--rate", type=float, required=True)
    s.add_argument("--bytes", type=int, required=True)
    s.add_argument("--tick", type=float, required=True)
    c = sub.add_parser("_capture")
    c.add_argument("--device", required=True)
    c.add_argument("--baud", type=int, required=True)
    c.add_argument("--bytes", type=int, required=True)
    c.add_argument("--idle", type=float, required=True)
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of sending per paced phase (default 10)")
    parser.add_argument("--baud", type=int, action="append",
                        help="a paced phase's baud rate (repeat; default 115200 and 3000000)")
    parser.add_argument("--tick", type=float, default=0.001,
                        help="the sender's pacing interval in seconds (default 0.001)")
    parser.add_argument("--max-bytes", type=int, default=256 * 1024 * 1024,
                        help="bytes of the unpaced phase (default 256 MiB; 0 skips it)")
    parser.add_argument("--idle", type=float, default=2.0,
                        help="seconds without data after which a capture with loss ends")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.mode == "_send":
        return sender(args.rate, args.bytes, args.tick)
    if args.mode == "_capture":
        return capture(args.device, args.baud, args.bytes, args.idle)

    results = []
    for baud in args.baud or [115200, 3000000]:
        rate = baud / LINE_BITS
        results.append(phase(f"{baud} baud", baud, rate, int(rate * args.duration),
                             args.tick, args.idle))
    if args.max_bytes:
        results.append(phase("unpaced", 115200, 0, args.max_bytes, args.tick, args.idle))
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": machine_info(), "argv": sys.argv[1:], "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m = report["machine"]
    print(f"{report['date']}; {m['cpus']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
          f"Python {m['python']}, Twisted {m['twisted']}, pyserial {m['pyserial']}")
    head = ("phase", "MB/s", "sent", "captured", "lost", "sha256", "CPU s/MB", "% core",
            "B/read", "other load")
    print(" | ".join(head))
    for r in results:
        print(" | ".join([
            r["phase"], f"{r['throughput_mb_s']:.3f}", f"{r['bytes_sent']:,}",
            f"{r['bytes_captured']:,}", f"{r['bytes_lost']:,}",
            "equal" if r["sha256_equal"] else "DIFFERENT", f"{r['cpu_seconds_per_mb']:.3f}",
            f"{r['core_percent']:.1f}", f"{r['bytes_per_read']:.0f}",
            f"{r['other_load_percent']:.0f} %"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
