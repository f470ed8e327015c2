#!/usr/bin/env python3
"""Benchmark of the log server: 100 concurrent streams into one server, follow latency.

    .venv/bin/python tools/bench/logserver.py [--duration 10] [--streams 100] [--json]

What it starts, measures and prints, and its options: ``tools/bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchkit import cli
from benchkit.daemons import remove_temp, role_config, signer, start_daemon, temp_dir, twistd
from benchkit.host import ambient, first_line, host_info, machine_ticks, stamp
from benchkit.procfs import KB_MB, reset_hwm, rusage_cpu, status_kb, thread_ticks
from benchkit.procs import ROOT, Profiler, free_port, read_response, stop_process
from benchkit.report import cell, headline, percentile, verdict_lines

# Targets of the issue, on a 2-core machine.
TARGET_MB_S = 100.0
TARGET_FOLLOW_P99_MS = 50.0

SERVICE = "treadmill-logserver"
MB = 1e6
STREAM = "console"


def console_text(size: int) -> bytes:
    """``size`` bytes that look like a busy serial console."""
    lines = []
    n = 0
    total = 0
    while total < size:
        line = (f"[{n * 0.000731:12.6f}] bench-host kernel: eth0: rx queue {n % 8} "
                f"refill {n * 7919 % 100003} descriptors, status 0x{n * 2654435761 % 2**32:08x}"
                "\n").encode()
        lines.append(line)
        total += len(line)
        n += 1
    return b"".join(lines)[:size]


# ======================================================================================
# The writer and the follower: separate processes (--role writer|follower).
# ======================================================================================


def _wait_line(expected: str) -> None:
    line = sys.stdin.readline().strip()
    if line != expected:
        raise SystemExit(f"expected {expected!r} on standard input, got {line!r}")


async def writer_main(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = "127.0.0.1", spec["port"]
    payload = console_text(spec["chunk"])
    streams = spec["streams"]
    followed = set(spec["followed"])
    rate = spec.get("rate")  # aggregate bytes/s, or None: as fast as acknowledged
    interval = len(payload) * len(streams) / rate if rate else 0.0
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in streams:
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append((reader, writer))
    # Create every stream first (its job's directory and _meta.json, synced), with a
    # first line, so that the phase measures appends to existing streams; the creation
    # is timed on its own.
    async def create(index: int) -> tuple[int, float]:
        reader, writer = conns[index]
        job, token = streams[index]["job"], streams[index]["token"]
        line = f"[bench] console of mock host {index}\n".encode()
        began = time.monotonic()
        writer.write((f"POST /v1/jobs/{job}/streams/{STREAM}?offset=0 HTTP/1.1\r\n"
                      f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
                      f"Content-Type: application/octet-stream\r\n"
                      f"Content-Length: {len(line)}\r\n\r\n").encode() + line)
        await writer.drain()
        status, _, body, _ = await read_response(reader)
        if status != 200:
            raise RuntimeError(f"creating stream {index}: {status} {body[:200]!r}")
        return len(line), (time.monotonic() - began) * 1000

    began = time.monotonic()
    created = await asyncio.gather(*(create(i) for i in range(len(streams))))
    creation = {"seconds": round(time.monotonic() - began, 3),
                "p50_ms": percentile(sorted(c[1] for c in created), 50),
                "max_ms": max(c[1] for c in created)}
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, _wait_line, "go")
    cpu0 = rusage_cpu()
    start = time.monotonic()
    deadline = start + spec["duration"]
    acked = [c[0] for c in created]
    first = list(acked)
    counts = {"ok": 0, "refused": 0, "errors": 0}
    append_ms: list[float] = []
    lags_ms: list[float] = []
    records: dict[str, list[tuple[int, int, int]]] = {}
    last_ack = [start]

    async def run(index: int) -> None:
        job, token = streams[index]["job"], streams[index]["token"]
        reader, writer = conns[index]
        prefix = (f"POST /v1/jobs/{job}/streams/{STREAM}?offset=").encode()
        suffix = (f" HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
                  f"Content-Type: application/octet-stream\r\n"
                  f"Content-Length: {len(payload)}\r\n\r\n").encode()
        mine = records.setdefault(job, []) if job in followed else None
        offset = acked[index]
        # Paced: stream i starts at its own phase of the interval (spread evenly).
        due = start + interval * index / len(streams) if interval else start
        while True:
            if interval:
                now = time.monotonic()
                if due >= deadline:
                    break
                if due > now:
                    await asyncio.sleep(due - now)
                else:
                    lags_ms.append((now - due) * 1000)
            elif time.monotonic() >= deadline:
                break
            sent = time.monotonic_ns()
            writer.write(prefix + str(offset).encode() + suffix)
            writer.write(payload)
            await writer.drain()
            try:
                status, headers, _, _ = await read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                counts["errors"] += 1
                raise RuntimeError(f"stream {index}: connection lost: {e!r}") from None
            done = time.monotonic_ns()
            if status == 200:
                offset += len(payload)
                counts["ok"] += 1
                append_ms.append((done - sent) / 1e6)
                if mine is not None:
                    mine.append((offset, sent, done))
                last_ack[0] = done / 1e9
            else:
                counts["refused"] += 1
                length = headers.get(b"x-stream-length")
                if length is not None:
                    offset = int(length)
                if counts["refused"] > 1000:
                    raise RuntimeError(f"too many refused appends (last: {status})")
            acked[index] = offset
            if interval:
                due += interval

    await asyncio.gather(*(run(i) for i in range(len(streams))))
    end = max(last_ack[0], start + 1e-9)
    cpu = rusage_cpu() - cpu0
    # Every stream's length on the server must be what this writer was told.
    mismatches = 0
    for index, (reader, writer) in enumerate(conns):
        job, token = streams[index]["job"], streams[index]["token"]
        writer.write((f"GET /v1/jobs/{job}/streams HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      f"Authorization: Bearer {token}\r\n\r\n").encode())
        await writer.drain()
        status, _, raw, _ = await read_response(reader)
        body = json.loads(raw) if status == 200 else {"streams": []}
        lengths = {s["name"]: s["length"] for s in body["streams"]}
        if lengths.get(STREAM, 0) != acked[index]:
            mismatches += 1
        writer.close()
    append_ms.sort()
    lags_ms.sort()
    return {
        "seconds": round(end - start, 3), "bytes": sum(acked) - sum(first),
        "appends": counts["ok"], "creation": creation,
        "refused": counts["refused"], "errors": counts["errors"],
        "mb_s": round((sum(acked) - sum(first)) / (end - start) / MB, 2),
        "appends_per_s": round(counts["ok"] / (end - start), 1),
        "append_ms": {"p50": percentile(append_ms, 50), "p99": percentile(append_ms, 99),
                      "max": append_ms[-1] if append_ms else None},
        "schedule_lag_ms": {"p50": percentile(lags_ms, 50), "p99": percentile(lags_ms, 99),
                            "late": len(lags_ms)} if interval else None,
        "length_mismatches": mismatches, "cpu_s": round(cpu, 3),
        "records": records, "start_ns": int(start * 1e9),
    }


async def ws_follow(port: int, job: str, token: str, arrivals: list[tuple[int, int]],
                    ready: asyncio.Event, stop: asyncio.Event) -> dict[str, Any]:
    """A minimal WebSocket client (RFC 6455) following one stream from offset 0."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /v1/jobs/{job}/streams/{STREAM}/follow HTTP/1.1\r\n"
                  f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Protocol: treadmill.logs.v1\r\n"
                  f"Authorization: Bearer {token}\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"follow {job}: {head[:200]!r}")
    ready.set()
    total = 0
    close_code = None

    async def frames() -> None:
        nonlocal total, close_code
        while True:
            b0, b1 = await reader.readexactly(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", await reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", await reader.readexactly(8))[0]
            mask = await reader.readexactly(4) if b1 & 0x80 else None
            data = await reader.readexactly(n) if n else b""
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            if opcode in (0, 1, 2):
                total += n
                arrivals.append((time.monotonic_ns(), total))
            elif opcode == 9:  # ping: answer with a masked pong
                m = os.urandom(4)
                body = bytes(b ^ m[i % 4] for i, b in enumerate(data))
                writer.write(bytes([0x8A, 0x80 | len(body)]) + m + body)
            elif opcode == 8:
                close_code = struct.unpack(">H", data[:2])[0] if len(data) >= 2 else 1005
                return

    task = asyncio.ensure_future(frames())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    elif task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
    writer.close()
    return {"bytes": total, "messages": len(arrivals), "close_code": close_code}


async def follower_main(spec: dict[str, Any]) -> dict[str, Any]:
    port = spec["port"]
    stop = asyncio.Event()
    arrivals: dict[str, list[tuple[int, int]]] = {s["job"]: [] for s in spec["follow"]}
    readies = [asyncio.Event() for _ in spec["follow"]]
    tasks = [asyncio.ensure_future(ws_follow(port, s["job"], s["token"], arrivals[s["job"]],
                                             ready, stop))
             for s, ready in zip(spec["follow"], readies, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)
    cpu0 = rusage_cpu()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _wait_line, "stop")
    stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    return {"arrivals": arrivals, "errors": errors, "cpu_s": round(rusage_cpu() - cpu0, 3),
            "bytes": sum(r["bytes"] for r in results if isinstance(r, dict))}


def role_main(args: argparse.Namespace) -> int:
    spec = json.loads(Path(args.spec).read_text())
    main = writer_main if args.role == "writer" else follower_main
    result = asyncio.run(main(spec))
    Path(args.out).write_text(json.dumps(result))
    return 0


# ======================================================================================
# The benchmark (the orchestrating process).
# ======================================================================================

say = cli.sayer()


def machine_info(tmp: Path) -> dict[str, Any]:
    return {
        **host_info(),
        "filesystem": first_line(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T",
                                   str(tmp)]),
        "dd": first_line(["dd", "--version"]),
    }


class Usage:
    """The server's CPU time (reactor thread and the rest), its peak RSS, and the machine's
    busy share, between :meth:`begin` and :meth:`end`."""

    def __init__(self, pid: int):
        self.pid = pid

    def begin(self) -> None:
        reset_hwm(self.pid)
        self.t0 = time.monotonic()
        self.threads0 = thread_ticks(self.pid)
        self.machine0 = machine_ticks()

    def end(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        clk = os.sysconf("SC_CLK_TCK")
        main1, other1 = thread_ticks(self.pid)
        main = (main1 - self.threads0[0]) / clk
        other = (other1 - self.threads0[1]) / clk
        busy1, total1 = machine_ticks()
        busy0, total0 = self.machine0
        machine = (busy1 - busy0) / (total1 - total0) if total1 > total0 else None
        return {"wall_s": round(wall, 3), "server_cpu_s": round(main + other, 3),
                "reactor_cpu_s": round(main, 3), "threads_cpu_s": round(other, 3),
                "machine_cpu_busy": None if machine is None else round(machine, 3),
                "peak_rss_mb": round((status_kb(self.pid, "VmHWM") or 0) * KB_MB, 1),
                "rss_mb_end": round((status_kb(self.pid, "VmRSS") or 0) * KB_MB, 1)}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = temp_dir("tml-bench-logserver-", args.tmpdir)
        self.server: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.helpers: list[subprocess.Popen[str]] = []
        self.results: dict[str, Any] = {"phases": [], "dd": []}
        self.profiler = Profiler(args.py_spy, self.results)
        self.keys_file = self.tmp / "capability-keys.json"
        self.signer = signer(self.keys_file)

    def token(self, job: str, action: str) -> str:
        from treadmill.common.captoken import Access

        return self.signer.sign("bench", SERVICE, [Access("job", job, (action,))], 3 * 3600)

    # -- processes ----------------------------------------------------------------------

    def start_server(self, fsync: str) -> None:
        port = free_port()
        config = role_config(self.tmp / f"logserver-{fsync}.toml",
                             f"tcp:{port}:interface=127.0.0.1", self.tmp / f"root-{fsync}",
                             SERVICE, self.keys_file, f'fsync = "{fsync}"\n')
        say(f"starting the log server (fsync = \"{fsync}\") on 127.0.0.1:{port}")
        self.server = start_daemon(twistd("treadmill-logserver", "--config", str(config),
                                          logger=self.args.logger),
                                   self.tmp / f"logserver-{fsync}.log",
                                   f"http://127.0.0.1:{port}/healthz", "the log server",
                                   level="warn")
        self.port = port

    def stop_server(self) -> None:
        stop_process(self.server)
        self.server = None

    def helper(self, role: str, spec: dict[str, Any], name: str) -> tuple[subprocess.Popen[str],
                                                                          Path]:
        spec_file = self.tmp / f"{name}.spec.json"
        out_file = self.tmp / f"{name}.out.json"
        spec_file.write_text(json.dumps(spec))
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--role", role, "--spec",
             str(spec_file), "--out", str(out_file)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(self.tmp / f"{name}.err")
            .open("w"), text=True, start_new_session=True)
        self.helpers.append(proc)
        return proc, out_file

    def expect_ready(self, proc: subprocess.Popen[str], name: str, timeout: float = 60) -> None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().strip() if ready else ""
        if line != "ready":
            stop_process(proc)  # type: ignore[arg-type]
            raise cli.BenchError(f"the {name} did not get ready: {line!r}; "
                             + (self.tmp / f"{name}.err").read_text()[-2000:])

    def finish_helper(self, proc: subprocess.Popen[str], out: Path, name: str,
                      timeout: float) -> dict[str, Any]:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc)  # type: ignore[arg-type]
            raise cli.BenchError(f"the {name} did not finish within {timeout:.0f} s") from None
        finally:
            with contextlib.suppress(ValueError):
                self.helpers.remove(proc)
        if proc.returncode != 0 or not out.exists():
            raise cli.BenchError(f"the {name} failed ({proc.returncode}): "
                             + (self.tmp / f"{name}.err").read_text()[-3000:])
        return json.loads(out.read_text())

    def cleanup(self) -> None:
        for proc in list(self.helpers):
            with contextlib.suppress(Exception):
                stop_process(proc)  # type: ignore[arg-type]
        self.profiler.stop_all()
        with contextlib.suppress(Exception):
            self.stop_server()
        remove_temp(self.tmp, self.args.keep_temp, say)

    # -- a phase ---------------------------------------------------------------------------

    def phase(self, fsync: str, rate_mb_s: float | None) -> dict[str, Any]:
        a = self.args
        assert self.server is not None
        name = f"{fsync}-{'max' if rate_mb_s is None else f'{rate_mb_s:g}'}"
        jobs = [str(uuid.uuid4()) for _ in range(a.streams)]
        streams = [{"job": job, "token": self.token(job, "append")} for job in jobs]
        followed = jobs[::a.follow_every] if a.follow_every else []
        follow_spec = {"port": self.port,
                       "follow": [{"job": job, "token": self.token(job, "read")}
                                  for job in followed]}
        writer_spec = {"port": self.port, "streams": streams, "followed": followed,
                       "chunk": a.chunk, "duration": a.duration,
                       "rate": rate_mb_s * MB if rate_mb_s else None}
        label = "max" if rate_mb_s is None else f"@{rate_mb_s:g} MB/s"
        say(f"fsync {fsync}: {label}, {a.streams} streams x {a.chunk} B appends, "
            f"{len(followed)} followed, {a.duration:g} s ...")
        follower = None
        if followed:
            follower, follower_out = self.helper("follower", follow_spec, f"follower-{name}")
            self.expect_ready(follower, f"follower-{name}")
        writer, writer_out = self.helper("writer", writer_spec, f"writer-{name}")
        self.expect_ready(writer, f"writer-{name}")
        usage = Usage(self.server.pid)
        prof = self.profiler.start(self.server.pid, name, "--rate", "200", "--threads",
                                   "--idle") if rate_mb_s is None else None
        try:
            usage.begin()
            assert writer.stdin is not None
            writer.stdin.write("go\n")
            writer.stdin.flush()
            wrote = self.finish_helper(writer, writer_out, f"writer-{name}",
                                       a.duration + 120)
            # The server's CPU over the writer's run (not the follower's draining below).
            used = usage.end()
        finally:
            self.profiler.stop(prof)
        followed_result: dict[str, Any] | None = None
        if follower is not None:
            time.sleep(1.0)  # the last messages
            assert follower.stdin is not None
            follower.stdin.write("stop\n")
            follower.stdin.flush()
            followed_result = self.finish_helper(follower, follower_out, f"follower-{name}", 60)
        entry: dict[str, Any] = {
            "fsync": fsync, "phase": label, "kind": "max" if rate_mb_s is None else "rate",
            "rate_target_mb_s": rate_mb_s, "streams": a.streams, "chunk": a.chunk,
            **{k: v for k, v in wrote.items() if k not in ("records", "start_ns")},
            "writer_cpu_s": wrote["cpu_s"], **used}
        entry.pop("cpu_s", None)
        wall = used["wall_s"] or 1
        entry["server_cores"] = round(used["server_cpu_s"] / wall, 2)
        entry["reactor_busy"] = round(used["reactor_cpu_s"] / wall, 2)
        entry["server_cpu_ms_per_mb"] = round(
            used["server_cpu_s"] * 1000 / (wrote["bytes"] / MB), 3) if wrote["bytes"] else None
        if followed_result is not None:
            entry["follow"] = follow_latency(wrote["records"], followed_result["arrivals"])
            entry["follow"]["followers"] = len(followed)
            entry["follow"]["errors"] = followed_result["errors"]
            entry["follower_cpu_s"] = followed_result["cpu_s"]
        if used.get("machine_cpu_busy") is not None:
            # Share of the cores used by anything but the server, the writer and the
            # follower (other work on the machine): it skews the figures.
            ours = used["server_cpu_s"] + wrote["cpu_s"] + (followed_result or {}).get(
                "cpu_s", 0.0)
            cores = len(os.sched_getaffinity(0))
            entry["other_cpu_busy"] = round(max(0.0, used["machine_cpu_busy"]
                                                - ours / (cores * wall)), 3)
        f = entry.get("follow", {})
        say(f"  {entry['mb_s']:.1f} MB/s ({entry['appends_per_s']:.0f} appends/s), server "
            f"{entry['server_cores']:.2f} cores (reactor thread {entry['reactor_busy']:.0%}), "
            f"append p99 {entry['append_ms']['p99']:.1f} ms"
            + (f", follow p50/p99 {f['p50_ms']:.1f}/{f['p99_ms']:.1f} ms"
               if f.get("p99_ms") is not None else "")
            + f", refused {entry['refused']}, mismatches {entry['length_mismatches']}; "
            f"creating the {a.streams} streams first took {entry['creation']['seconds']:.2f} s")
        self.results["phases"].append(entry)
        return entry

    def dd(self, volume: int) -> None:
        a = self.args
        block = 64 * 1024
        count = max(16, volume // block)
        target = self.tmp / "dd.bin"
        variants = [("conv=fsync", ["conv=fsync"], count),
                    ("oflag=dsync", ["oflag=dsync"], max(16, min(count, a.dsync_max // block))),
                    ("no sync (page cache)", [], count)]
        for label, flags, n in variants:
            with contextlib.suppress(OSError):
                target.unlink()
            subprocess.run(["sync"], check=False, timeout=120)
            cmd = ["dd", "if=/dev/zero", f"of={target}", "bs=64k", f"count={n}", *flags]
            start = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
            wall = time.monotonic() - start
            if proc.returncode != 0:
                raise cli.BenchError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
            entry = {"variant": label, "command": " ".join(cmd[:5] + flags).replace(
                str(self.tmp), "TMP"), "bytes": n * block, "seconds": round(wall, 3),
                "mb_s": round(n * block / wall / MB, 1)}
            say(f"dd {label}: {entry['mb_s']:.0f} MB/s ({n * block / MB:.0f} MB in "
                f"{wall:.2f} s)")
            self.results["dd"].append(entry)
        with contextlib.suppress(OSError):
            target.unlink()

    def run(self) -> dict[str, Any]:
        a = self.args
        self.results["ambient_cpu_busy"] = round(ambient(say), 3)
        stamp(self.results, machine_info(self.tmp), dict(
            streams=a.streams, chunk=a.chunk, duration_s=a.duration, rates_mb_s=a.rate,
            follow_every=a.follow_every, fsync=a.fsync, logger=a.logger,
            tmpdir=str(self.tmp.parent), dsync_max=a.dsync_max), ROOT)
        volume = 0
        for fsync in a.fsync:
            self.start_server(fsync)
            try:
                entry = self.phase(fsync, None)
                if fsync == "always" or not volume:
                    volume = entry["bytes"]  # dd writes what the default policy took
                for rate in a.rate:
                    self.phase(fsync, rate)
            finally:
                self.stop_server()
                shutil.rmtree(self.tmp / f"root-{fsync}", ignore_errors=True)
        if not a.no_dd and volume:
            self.dd(volume)
        self.results["verdicts"] = verdicts(self.results)
        return self.results


def follow_latency(records: dict[str, list[list[int]]],
                   arrivals: dict[str, list[list[int]]]) -> dict[str, Any]:
    """From each append's send (and acknowledgement) to the follower's receipt of its last
    byte."""
    from_send: list[float] = []
    from_ack: list[float] = []
    missing = 0
    for job, appends in records.items():
        got = arrivals.get(job, [])
        i = 0
        for end_offset, sent, acked in appends:
            while i < len(got) and got[i][1] < end_offset:
                i += 1
            if i == len(got):
                missing += 1
                continue
            received = got[i][0]
            from_send.append((received - sent) / 1e6)
            from_ack.append((received - acked) / 1e6)
    from_send.sort()
    from_ack.sort()
    return {"samples": len(from_send), "missing": missing,
            "p50_ms": _r(percentile(from_send, 50)), "p99_ms": _r(percentile(from_send, 99)),
            "max_ms": _r(from_send[-1] if from_send else None),
            "after_ack_p50_ms": _r(percentile(from_ack, 50)),
            "after_ack_p99_ms": _r(percentile(from_ack, 99))}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for e in results["phases"]:
        if e["kind"] == "max":
            out.append({"target": f"fsync {e['fsync']}: aggregate >= {TARGET_MB_S:g} MB/s",
                        "value": e["mb_s"], "met": e["mb_s"] >= TARGET_MB_S})
        f = e.get("follow") or {}
        if e["kind"] == "rate" and f.get("p99_ms") is not None:
            # A latency figure counts only if the rate was actually sustained.
            sustained = e["mb_s"] >= 0.95 * e["rate_target_mb_s"]
            out.append({"target": f"fsync {e['fsync']}: follow p99 < {TARGET_FOLLOW_P99_MS:g} ms "
                                  f"{e['phase']}", "value": f["p99_ms"],
                        "met": f["p99_ms"] < TARGET_FOLLOW_P99_MS and sustained
                        and not f["missing"]})
    return out


def table(results: dict[str, Any]) -> str:
    p = results["parameters"]
    lines = [
        headline("Log server benchmark", results),
        f"{p['streams']} streams, {p['chunk']} B appends, {p['duration_s']:g} s per phase; "
        f"file system {results['machine']['filesystem']}; machine "
        f"{results.get('ambient_cpu_busy', 0):.0%} busy before the start",
        "",
        f"{'fsync':<7} {'phase':<12} {'MB/s':>7} {'app/s':>6} {'app p50':>7} {'app p99':>7} "
        f"{'fol p50':>7} {'fol p99':>7} {'fol max':>7} {'srv':>5} {'react':>5} {'CPU':>6} "
        f"{'writer':>6} {'CPUs':>5} {'other':>5} {'RSS':>6} {'refused':>7}",
        f"{'':<7} {'':<12} {'':>7} {'':>6} {'ms':>7} {'ms':>7} {'ms':>7} {'ms':>7} {'ms':>7} "
        f"{'cores':>5} {'tor':>5} {'ms/MB':>6} {'CPU s':>6} {'busy':>5} {'load':>5} {'MB':>6} "
        f"{'':>7}",
        "-" * 130,
    ]
    for e in results["phases"]:
        f = e.get("follow") or {}
        lines.append(
            f"{e['fsync']:<7} {e['phase']:<12} {e['mb_s']:>7.1f} {e['appends_per_s']:>6.0f} "
            f"{cell(e['append_ms']['p50'], '7.1f')} {cell(e['append_ms']['p99'], '7.1f')} "
            f"{cell(f.get('p50_ms'), '7.1f')} {cell(f.get('p99_ms'), '7.1f')} "
            f"{cell(f.get('max_ms'), '7.1f')} {e['server_cores']:>5.2f} {e['reactor_busy']:>5.0%} "
            f"{cell(e['server_cpu_ms_per_mb'], '6.2f')} {e['writer_cpu_s']:>6.1f} "
            f"{cell(e.get('machine_cpu_busy'), '5.0%')} {cell(e.get('other_cpu_busy'), '5.0%')} "
            f"{e['peak_rss_mb']:>6.1f} "
            f"{e['refused'] + e['errors']:>7}")
    lines += [
        "",
        "app: append latency (writer's send to the 200). fol: follow latency, from the writer "
        "starting to send",
        "an append to the follower receiving its last byte. srv cores: the server's CPU "
        "seconds per second;",
        "reactor: its main thread's share of one core. RSS: its peak (VmHWM) in the phase.",
        "CPUs busy: the whole machine; other load: the share of the cores used by anything "
        "but the server,",
        "the writer and the follower (other work on the machine skews the figures).",
    ]
    for e in results["phases"]:
        f = e.get("follow") or {}
        if (e.get("other_cpu_busy") or 0) > 0.15:
            lines.append(f"warning: fsync {e['fsync']} {e['phase']}: other processes used "
                         f"{e['other_cpu_busy']:.0%} of the machine; these figures are skewed")
        if f.get("missing"):
            lines.append(f"warning: fsync {e['fsync']} {e['phase']}: {f['missing']} followed "
                         "appends never reached the follower")
        if e["length_mismatches"]:
            lines.append(f"warning: fsync {e['fsync']} {e['phase']}: {e['length_mismatches']} "
                         "streams' lengths differ from what the writer was acknowledged")
        if e["kind"] == "rate" and e["mb_s"] < 0.95 * e["rate_target_mb_s"]:
            lines.append(f"warning: fsync {e['fsync']} {e['phase']}: the rate was not "
                         f"sustained ({e['mb_s']:.1f} MB/s)")
    lines.append("Streams are created (one first line each, all at once) before each phase, "
                 "not timed in it: " + ", ".join(
                     f"{e['fsync']} {e['phase']} {e['creation']['seconds']:.2f} s "
                     f"(slowest {e['creation']['max_ms']:.0f} ms)" for e in results["phases"]))
    if results["dd"]:
        lines += ["", "dd on the same file system, same run:"]
        for d in results["dd"]:
            lines.append(f"  {d['command']:<58} {d['mb_s']:>8.1f} MB/s "
                         f"({d['bytes'] / MB:.0f} MB in {d['seconds']:.2f} s)")
        ref = next((d for d in results["dd"] if d["variant"] == "conv=fsync"), None)
        if ref:
            for e in results["phases"]:
                if e["kind"] == "max":
                    lines.append(f"  fsync {e['fsync']}: server / dd conv=fsync = "
                                 f"{e['mb_s'] / ref['mb_s']:.3f}")
    return "\n".join([*lines, "", "Targets (2-core machine):",
                      *verdict_lines(results["verdicts"], 52)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.bench_parser("logserver.py", __doc__,
                          "Targets on 2 cores: >= 100 MB/s aggregate; p99 follow latency < 50 ms.")
    cli.options(parser, (
        ("--duration", float, 10.0, "seconds per phase"),
        ("--streams", int, 100, "concurrent streams (jobs)"),
        ("--chunk", int, 64 * 1024, "bytes per append"),
    ))
    parser.add_argument("--rate", type=float, action="append",
                        help="aggregate MB/s of a fixed-rate phase (repeatable; default 50, "
                             "i.e. half the target; 0: none)")
    parser.add_argument("--follow-every", type=int, default=10,
                        help="follow every N-th stream over the WebSocket (0: no follower)")
    parser.add_argument("--fsync", choices=("always", "never"), action="append",
                        help="server fsync policies to run (repeatable; default both)")
    parser.add_argument("--dsync-max", type=int, default=256 * 1024 * 1024,
                        help="bytes for the dd oflag=dsync reference (capped: it is slow)")
    parser.add_argument("--no-dd", action="store_true", help="skip the dd reference")
    cli.daemon_options(parser, "the server during the max phases")
    cli.output_options(parser, keep_help="keep the temporary directory (logs) for inspection")
    # Internal: the writer and follower processes.
    parser.add_argument("--role", choices=("writer", "follower"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.fsync = args.fsync or ["always", "never"]
    args.rate = [r for r in (args.rate if args.rate is not None else [TARGET_MB_S / 2]) if r > 0]
    if not (0 < args.duration <= 300 and 1 <= args.streams <= 1000):
        parser.error("--duration must be in (0, 300], --streams in [1, 1000]")
    if not (1 <= args.chunk <= 1024 * 1024):
        parser.error("--chunk must be in [1, 1048576] (the server's appends.max_bytes)")
    if args.follow_every < 0:
        parser.error("--follow-every must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role:
        return role_main(args)
    if cli.missing("logserver"):
        return 2
    errors = (cli.BenchError, OSError, subprocess.SubprocessError)
    return cli.run(Bench(args), args, table, errors, say)


if __name__ == "__main__":
    sys.exit(main())
