#!/usr/bin/env python3
"""Benchmark of the rendezvous proxy against HAProxy (TCP mode) and socat, side by side.

    .venv/bin/python tools/bench/proxy.py [--size-mib 1024] [--connects 1000]
        [--concurrent 1000] [--tunnels 1000] [--pool N] [--no-ws] [--json]

What it starts, measures and prints, and its options: ``tools/bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchkit.cli import run, sayer
from benchkit.daemons import remove_temp, signer, start_daemon, temp_dir, twistd
from benchkit.host import first_line, host_info
from benchkit.procfs import CLK_TCK, descendants, pss_kb, status_kb, total_ticks
from benchkit.procs import ROOT, free_port, free_range

MiB = 1024 * 1024
TIMEOUT = 120.0  # seconds any single phase may take
log = sayer()


def status(pid: int, field: str) -> int:
    """A /proc/PID/status figure in bytes (VmRSS, VmHWM)."""
    return (status_kb(pid, field) or 0) * 1024


def pss(pid: int) -> int:
    return (pss_kb(pid) or 0) * 1024


def cpu_seconds(pids: list[int]) -> float:
    """utime, stime, and the same of waited-for children (socat's forks)."""
    return total_ticks(pids) / CLK_TCK


class Processes:
    """Everything this benchmark starts, stopped at the end (also on Ctrl-C)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


_PENDING: dict[int, bytes] = {}


def read_line(proc: subprocess.Popen[Any], timeout: float) -> str:
    """A line of ``proc``'s standard output (a pipe), or RuntimeError after ``timeout``."""
    import select

    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buffered = _PENDING.get(fd, b"")
    while b"\n" not in buffered:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            raise RuntimeError(f"{' '.join(map(str, proc.args[:3]))} said nothing more "
                               f"within {timeout:.0f} s")
        buffered += chunk
    line, _, _PENDING[fd] = buffered.partition(b"\n")
    return line.decode()


def wait_port(port: int, proc: subprocess.Popen[Any] | None = None,
              timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


# -- the backend (a child process) -----------------------------------------------------------


async def _backend(echo_port: int, bulk_port: int) -> None:
    block = memoryview(os.urandom(MiB))

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            verb, size = (await reader.readline()).split()
            left = int(size)
            if verb == b"SEND":
                while left:
                    chunk = block[:min(left, MiB)]
                    writer.write(chunk)
                    left -= len(chunk)
                    await writer.drain()
            else:
                while left:
                    data = await reader.read(min(left, 4 * MiB))
                    if not data:
                        break
                    left -= len(data)
                writer.write(b"OK\n")
                await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    await asyncio.start_server(echo, "127.0.0.1", echo_port, backlog=4096)
    await asyncio.start_server(bulk, "127.0.0.1", bulk_port, backlog=1024)
    await asyncio.Event().wait()


# -- the fleet: many jobs, each publishing one service (a child process) ------------------


def _fleet(proxy_url: str, tokens_file: str, echo_port: int) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import DeferredList

    from treadmill.supervisor.exposure import ExposureManager

    tokens = json.loads(Path(tokens_file).read_text())
    managers = [ExposureManager(reactor, job, [{"url": proxy_url, "token": token}],
                                {"echo": ("127.0.0.1", echo_port, True)}, websocket=False,
                                reconnect_initial=0.5, reconnect_max=5.0)
                for job, token in tokens.items()]

    def started() -> None:
        for manager in managers:
            manager.start()
        DeferredList([m.published() for m in managers]).addCallback(
            lambda _: print(json.dumps({"published": len(managers)}), flush=True))

    reactor.callWhenRunning(started)
    reactor.run()


# -- the WebSocket forwarder of ``tml job connect`` (a child process) --------------------------


def _forwarder(job_json: str, service: str, port: int) -> None:
    from pathlib import Path as _Path

    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    from treadmill.cli.commands.connect import add_connect_arguments, job_connect
    from treadmill.cli.config import Settings
    from treadmill.cli.context import Context

    class Api:
        async def get(self, *segments: str, params: Any = None) -> Any:
            return json.loads(job_json)

    def main(reactor: Any) -> Any:
        parser = argparse.ArgumentParser()
        parser.add_argument("--json", action="store_true")
        add_connect_arguments(parser)
        args = parser.parse_args(["job", service, "--local-port", str(port)])
        ctx = Context(reactor, args, sys.stdout, sys.stderr, sys.stdin, {},
                      Settings("http://127.0.0.1:1", None, None, _Path("/x")), Api())
        return Deferred.fromCoroutine(job_connect(ctx))

    react(main)


# -- client measurements ---------------------------------------------------------------------


def throughput(port: int, size: int, direction: str) -> float:
    """Seconds to move ``size`` bytes through one connection."""
    buffer = bytearray(4 * MiB)
    view = memoryview(buffer)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        if direction == "download":
            s.sendall(b"SEND %d\n" % size)
            got = 0
            while got < size:
                n = s.recv_into(view)
                if not n:
                    raise RuntimeError(f"download ended after {got} bytes")
                got += n
        else:
            s.sendall(b"RECV %d\n" % size)
            left = size
            while left:
                n = min(left, len(view))
                s.sendall(view[:n])
                left -= n
            if not s.recv(16).startswith(b"OK"):
                raise RuntimeError("upload not acknowledged")
        return time.perf_counter() - started


def setup_latency(port: int, count: int) -> list[float]:
    """Seconds per connect + 1-byte echo + close, ``count`` times in a row."""
    times = []
    deadline = time.monotonic() + TIMEOUT
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise RuntimeError("no echo")
        times.append(time.perf_counter() - started)
        if time.monotonic() > deadline:
            break
    return times


async def _concurrent(port: int, count: int, hold: float) -> tuple[float, int, list[Any]]:
    payload = b"0123456789abcdef" * 4
    open_writers: list[Any] = []

    async def one() -> bool:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 30)
            writer.write(payload)
            await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
            open_writers.append(writer)
            return got == payload
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            return False

    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(count)))
    elapsed = time.perf_counter() - started
    return elapsed, results.count(False), open_writers


def concurrent(port: int, count: int, measure: Any = None) -> tuple[float, int, Any]:
    """Open ``count`` connections at once, each echoing 64 bytes; keep them open while
    ``measure()`` runs (the idle-connections memory), then close them."""

    async def run() -> tuple[float, int, Any]:
        elapsed, failures, writers = await _concurrent(port, count, 0)
        await asyncio.sleep(0.5)
        sample = measure() if measure is not None else None
        for writer in writers:
            writer.close()
        await asyncio.sleep(0.2)
        return elapsed, failures, sample

    return asyncio.run(run())


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# -- targets ---------------------------------------------------------------------------------


class Target:
    """A path to the backend: its echo and bulk ports and the relay processes."""

    def __init__(self, name: str, echo: int, bulk: int, pids: list[int], note: str = ""):
        self.name = name
        self.echo = echo
        self.bulk = bulk
        self.pids = pids
        self.note = note

    def all_pids(self) -> list[int]:
        return [p for pid in self.pids for p in descendants([pid])]

    def rss(self) -> int:
        return sum(status(p, "VmRSS") for p in self.all_pids())

    def pss(self) -> int:
        return sum(pss(p) for p in self.all_pids())


def measure(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"path": target.name, "note": target.note}
    size = args.size_mib * MiB
    for direction in ("download", "upload"):
        cpu0 = cpu_seconds(target.all_pids())
        seconds = throughput(target.bulk, size, direction)
        cpu = cpu_seconds(target.all_pids()) - cpu0
        result[f"{direction}_mib_s"] = round(size / MiB / seconds, 1)
        result[f"{direction}_cpu_s_per_gib"] = round(cpu / (size / 1024 / MiB), 2)
        log(f"{target.name}: {direction} {size // MiB} MiB in {seconds:.2f} s "
            f"({size / MiB / seconds:.0f} MiB/s, relays' CPU {cpu:.2f} s)")
    setup_latency(target.echo, 50)  # warm-up
    cpu0 = cpu_seconds(target.all_pids())
    times = setup_latency(target.echo, args.connects)
    cpu = cpu_seconds(target.all_pids()) - cpu0
    result["setup_p50_ms"] = round(percentile(times, 50) * 1000, 3)
    result["setup_p99_ms"] = round(percentile(times, 99) * 1000, 3)
    result["setup_count"] = len(times)
    result["setup_cpu_us"] = round(cpu / len(times) * 1e6)
    log(f"{target.name}: {len(times)} connections, p50 {result['setup_p50_ms']} ms, "
        f"p99 {result['setup_p99_ms']} ms, relays' CPU {result['setup_cpu_us']} µs each")
    proxy_pid = getattr(target, "proxy_pid", None)

    def memory() -> tuple[int, int]:
        return target.pss(), pss(proxy_pid) if proxy_pid else 0

    before, proxy_before = memory()
    cpu0 = cpu_seconds(target.all_pids())
    elapsed, failures, (with_open, proxy_with) = concurrent(target.echo, args.concurrent,
                                                             memory)
    # The relays' CPU for the burst (and for closing it: the connections end within it).
    result["concurrent_cpu_s"] = round(cpu_seconds(target.all_pids()) - cpu0, 2)
    result["concurrent_s"] = round(elapsed, 3)
    result["concurrent_failures"] = failures
    # PSS, not RSS: socat's forks share most of their pages.
    result["idle_conns_pss_mib"] = round(with_open / MiB, 1)
    result["idle_conns_growth_mib"] = round((with_open - before) / MiB, 1)
    if proxy_pid:
        result["proxy_idle_conns_pss_mib"] = round(proxy_with / MiB, 1)
        result["proxy_idle_conns_growth_mib"] = round((proxy_with - proxy_before) / MiB, 1)
    log(f"{target.name}: {args.concurrent} concurrent connections in {elapsed:.2f} s, "
        f"{failures} failed, relays' CPU {result['concurrent_cpu_s']} s; relays' PSS "
        f"{before / MiB:.1f} -> {with_open / MiB:.1f} MiB with them open")
    return result


# -- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for option, default, text in (
            ("--size-mib", 1024, "bytes per throughput run, each way (default 1024: 1 GiB)"),
            ("--connects", 1000, "sequential connections for the setup latency"),
            ("--concurrent", 1000, "connections opened at once through one tunnel"),
            ("--tunnels", 1000, "idle tunnels for the memory comparison (0: skip)"),
            ("--pool", None, "the proxy's pool.per_job: idle pooled data connections per "
             "job (default: the setting's default; 0: no pool, a connect round trip per "
             "client)")):
        parser.add_argument(option, type=int, default=default, help=text)
    parser.add_argument("--no-ws", action="store_true", help="skip the WebSocket path")
    parser.add_argument("--paths", default="direct,treadmill,treadmill-ws,haproxy,socat",
                        help="the paths to measure (comma-separated; also: floor, a "
                        "minimal two-relay path in Python, tools/bench/floorrelay.py)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve-backend", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-fleet", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--serve-forwarder", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend:
        asyncio.run(_backend(*args.serve_backend))
        return 0
    if args.serve_fleet:
        _fleet(args.serve_fleet[0], args.serve_fleet[1], int(args.serve_fleet[2]))
        return 0
    if args.serve_forwarder:
        _forwarder(args.serve_forwarder[0], args.serve_forwarder[1],
                   int(args.serve_forwarder[2]))
        return 0

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = 6 * max(args.concurrent, args.tunnels) + 200
    if hard < needed:
        log(f"warning: the open files limit is {hard}; about {needed} are needed")
    return run(Bench(args), args, render, (), log)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.procs = Processes()
        self.tmp = temp_dir("treadmill-bench-proxy-")

    def run(self) -> dict[str, Any]:
        args = self.args
        results: list[dict[str, Any]] = []
        tunnels: dict[str, Any] = {}
        skipped: list[str] = []
        targets = setup(self.procs, self.tmp, args, skipped)
        wanted = set(args.paths.split(","))
        for target in targets:
            if target.name in wanted:
                results.append(measure(target, args))
        if args.tunnels:
            tunnels = tunnel_memory(self.procs, self.tmp, args, skipped)
        return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "size_mib": args.size_mib, "connects": args.connects,
                "concurrent": args.concurrent, "pool": args.pool, "paths": results,
                "tunnels": tunnels,
                "ratios": ratios(results, tunnels), "skipped": skipped}

    def cleanup(self) -> None:
        self.procs.stop_all()
        remove_temp(self.tmp, False, log)


def machine() -> dict[str, Any]:
    socat = subprocess.run(["socat", "-V"], capture_output=True, text=True) \
        if shutil.which("socat") else None
    host = host_info()
    return {"cpus": os.cpu_count(), "cpu": host["cpu_model"], "kernel": host["kernel"],
            "python": host["python"],
            "haproxy": first_line(["haproxy", "-v"]) if shutil.which("haproxy") else None,
            "socat": next((line for line in socat.stdout.splitlines()
                           if "version" in line), None) if socat else None}


def port_range(size: int) -> tuple[int, int]:
    first = free_range(size)
    return first, first + size - 1


def setup(procs: Processes, tmp: Path, args: argparse.Namespace,
          skipped: list[str]) -> list[Target]:
    echo, bulk = free_port(), free_port()
    backend = procs.start([sys.executable, __file__, "--serve-backend", str(echo), str(bulk)])
    wait_port(echo, backend)
    wait_port(bulk, backend)
    targets = [Target("direct", echo, bulk, [], "no relay")]
    log(f"backend: echo on {echo}, bulk on {bulk}")

    ours = start_ours(procs, tmp, args, {"echo": echo, "bulk": bulk})
    targets.append(ours)
    if not args.no_ws:
        targets.append(start_forwarders(procs, ours))
    if "floor" in args.paths.split(","):
        targets.append(start_floor(procs, echo, bulk, args.pool))

    if shutil.which("haproxy"):
        h_echo, h_bulk = free_port(), free_port()
        config = tmp / "haproxy.cfg"
        config.write_text(haproxy_config({h_echo: echo, h_bulk: bulk}))
        haproxy = procs.start(["haproxy", "-f", str(config), "-db"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(h_echo, haproxy)
        wait_port(h_bulk, haproxy)
        targets.append(Target("haproxy", h_echo, h_bulk, [haproxy.pid],
                              "HAProxy mode tcp, nbthread 1"))
    else:
        skipped.append("haproxy (not installed)")
    if shutil.which("socat"):
        pids = []
        ports = []
        for backend_port in (echo, bulk):
            port = free_port()
            proc = procs.start(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,"
                                "backlog=1024", f"TCP:127.0.0.1:{backend_port}"],
                               stderr=subprocess.DEVNULL)
            wait_port(port, proc)
            pids.append(proc.pid)
            ports.append(port)
        targets.append(Target("socat", ports[0], ports[1], pids, "socat fork"))
    else:
        skipped.append("socat (not installed)")
    return targets


def token(sign: Any, job: str) -> str:
    from treadmill.common.captoken import Access

    return str(sign.sign("bench", "treadmill-proxy", [Access("tunnel", job, ("publish",))],
                           3600))


def start_proxy(procs: Processes, tmp: Path, args: argparse.Namespace,
                ports: tuple[int, int]) -> tuple[subprocess.Popen[Any], int]:
    http, data = free_port(), free_port()
    argv = twistd("treadmill-proxy", "--listen", f"tcp:{http}:interface=127.0.0.1",
                  "--data-listen", f"tcp:{data}:interface=127.0.0.1",
                  "--public-host", "127.0.0.1", "--public-interface", "127.0.0.1",
                  "--ports", f"{ports[0]}-{ports[1]}", "--auth-keys-file",
                  str(tmp / "keys.json"), "--http-access-log", "false", "--idle-timeout", "0",
                  "--max-connections-per-tunnel", str(args.concurrent + 100),
                  "--max-tunnels-per-job", "16",
                  *(["--pool-per-job", str(args.pool)] if args.pool is not None else []))
    proc = start_daemon(argv, tmp / "proxy.log", f"http://127.0.0.1:{http}/healthz",
                        "the proxy", level="warn", cwd=ROOT, interval=0.1)
    procs.procs.append(proc)
    return proc, http


def start_ours(procs: Processes, tmp: Path, args: argparse.Namespace,
               services: dict[str, int]) -> Target:
    sign = signer(tmp / "keys.json")
    proxy, http = start_proxy(procs, tmp, args, port_range(16))
    job = str(uuid.uuid4())
    (tmp / "token").write_text(token(sign, job))
    argv = [sys.executable, str(ROOT / "tools" / "bench" / "expose.py"), "--job", job,
            "--proxy", f"ws://127.0.0.1:{http}", "--token-file", str(tmp / "token"), "--quiet",
            "--self-authenticating"]
    for name, port in services.items():
        argv += ["--service", f"{name}=127.0.0.1:{port}"]
    supervisor = procs.start(argv, cwd=str(ROOT), stdout=subprocess.PIPE)
    endpoints: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(endpoints) < len(services):
        endpoints = json.loads(read_line(supervisor, max(0.1, deadline - time.monotonic())))
    by_name = {e["service"]: e for e in endpoints}
    target = Target("treadmill", by_name["echo"]["port"], by_name["bulk"]["port"],
                    [proxy.pid, supervisor.pid], "proxy + supervisor relay (2 relays)")
    target.endpoints = by_name  # type: ignore[attr-defined]
    target.proxy_pid = proxy.pid  # type: ignore[attr-defined]
    log(f"treadmill: proxy pid {proxy.pid}, supervisor pid {supervisor.pid}, "
        f"echo on {target.echo}, bulk on {target.bulk}")
    return target


def start_floor(procs: Processes, echo: int, bulk: int, pool: int | None) -> Target:
    """The floor (``floorrelay.py``): two minimal relays in Python, for each service."""
    script = str(ROOT / "tools" / "bench" / "floorrelay.py")
    ports, pids = [], []
    for service in (echo, bulk):
        public, data = free_port(), free_port()
        hop1 = procs.start([sys.executable, script, "hop1", str(public), str(data)],
                           stdout=subprocess.PIPE)
        read_line(hop1, 10)
        hop2 = procs.start([sys.executable, script, "hop2", str(data), str(service),
                            str(2 if pool is None else max(1, pool))], stdout=subprocess.PIPE)
        read_line(hop2, 10)
        ports.append(public)
        pids += [hop1.pid, hop2.pid]
    wait_port(ports[0])
    return Target("floor", ports[0], ports[1], pids,
                  "floorrelay.py: two minimal epoll relays in Python (2 relays)")


def start_forwarders(procs: Processes, ours: Target) -> Target:
    ports = {}
    pids = []
    for name in ("echo", "bulk"):
        port = free_port()
        job = {"id": "job", "state": "ready", "endpoints": [ours.endpoints[name]]}  # type: ignore[attr-defined]
        proc = procs.start([sys.executable, __file__, "--serve-forwarder", json.dumps(job),
                            name, str(port)], cwd=str(ROOT), stderr=subprocess.DEVNULL)
        wait_port(port, proc)
        ports[name] = port
        pids.append(proc.pid)
    return Target("treadmill-ws", ports["echo"], ports["bulk"], [*ours.pids, *pids],
                  "tml job connect -> WebSocket path -> proxy -> supervisor (3 relays)")


def haproxy_config(listeners: dict[int, int]) -> str:
    # HAProxy refuses to start if maxconn needs more descriptors than the limit allows.
    maxconn = max(1000, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - len(listeners) - 100)
                  // 2 - 100)
    lines = ["global", f"    maxconn {maxconn}", "    nbthread 1", "defaults", "    mode tcp",
             "    timeout connect 10s", "    timeout client 300s", "    timeout server 300s",
             f"    maxconn {maxconn}"]
    for i, (port, backend) in enumerate(listeners.items()):
        lines += [f"listen l{i}", f"    bind 127.0.0.1:{port}",
                  f"    server s 127.0.0.1:{backend}"]
    return "\n".join(lines) + "\n"


def tunnel_memory(procs: Processes, tmp: Path, args: argparse.Namespace,
                  skipped: list[str]) -> dict[str, Any]:
    """Memory to hold ``--tunnels`` published, idle endpoints."""
    count = args.tunnels
    result: dict[str, Any] = {"count": count}
    echo = free_port()
    backend = procs.start([sys.executable, __file__, "--serve-backend", str(echo),
                           str(free_port())])
    wait_port(echo, backend)

    # Ours: one job per tunnel, each with its own control connection (as a site's
    # supervisors would have), all in one fleet process.
    sign = signer(tmp / "keys.json")
    proxy, http = start_proxy(procs, tmp, args, port_range(count + 16))
    time.sleep(0.5)
    base = status(proxy.pid, "VmRSS")
    tokens = {str(uuid.uuid4()): "" for _ in range(count)}
    tokens = {job: token(sign, job) for job in tokens}
    (tmp / "tokens.json").write_text(json.dumps(tokens))
    started = time.monotonic()
    fleet = procs.start([sys.executable, __file__, "--serve-fleet", f"ws://127.0.0.1:{http}",
                         str(tmp / "tokens.json"), str(echo)], cwd=str(ROOT),
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    read_line(fleet, TIMEOUT)  # {"published": count}
    elapsed = time.monotonic() - started
    time.sleep(1.0)
    rss = status(proxy.pid, "VmRSS")
    result["treadmill_rss_mib"] = round(rss / MiB, 1)
    result["treadmill_base_rss_mib"] = round(base / MiB, 1)
    result["treadmill_per_tunnel_kib"] = round((rss - base) / count / 1024, 1)
    result["treadmill_publish_s"] = round(elapsed, 2)
    result["treadmill_supervisors_rss_mib"] = round(status(fleet.pid, "VmRSS") / MiB, 1)
    log(f"treadmill: {count} jobs published in {elapsed:.1f} s; proxy RSS "
        f"{base / MiB:.1f} -> {rss / MiB:.1f} MiB")
    procs.stop(fleet)
    procs.stop(proxy)

    if shutil.which("haproxy"):
        first = free_range(count)
        config = tmp / "haproxy-tunnels.cfg"
        config.write_text(haproxy_config({first + i: echo for i in range(count)}))
        haproxy = procs.start(["haproxy", "-f", str(config), "-db"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(first + count - 1, haproxy)
        time.sleep(1.0)
        result["haproxy_rss_mib"] = round(status(haproxy.pid, "VmRSS") / MiB, 1)
        log(f"haproxy: {count} listeners, RSS {result['haproxy_rss_mib']} MiB")
        procs.stop(haproxy)
    if shutil.which("socat"):
        first = free_range(count)
        socats = [procs.start(["socat", f"TCP-LISTEN:{first + i},bind=127.0.0.1,fork,"
                               "reuseaddr", f"TCP:127.0.0.1:{echo}"], stderr=subprocess.DEVNULL)
                  for i in range(count)]
        wait_port(first + count - 1, socats[-1])
        time.sleep(1.0)
        result["socat_pss_mib"] = round(sum(pss(p.pid) for p in socats) / MiB, 1)
        result["socat_rss_mib"] = round(sum(status(p.pid, "VmRSS") for p in socats) / MiB, 1)
        log(f"socat: {count} processes, PSS {result['socat_pss_mib']} MiB "
            f"(RSS {result['socat_rss_mib']} MiB)")
        for proc in socats:
            procs.stop(proc)
    procs.stop(backend)
    return result


def ratios(results: list[dict[str, Any]], tunnels: dict[str, Any]) -> dict[str, Any]:
    by = {r["path"]: r for r in results}
    ours = by.get("treadmill")
    out: dict[str, Any] = {}
    if ours is None:
        return out
    for ref in ("haproxy", "socat", "direct", "floor"):
        other = by.get(ref)
        if other is None:
            continue
        out[ref] = {
            "download": round(ours["download_mib_s"] / other["download_mib_s"], 2),
            "upload": round(ours["upload_mib_s"] / other["upload_mib_s"], 2),
            "setup_p50": round(ours["setup_p50_ms"] / other["setup_p50_ms"], 2),
            "setup_p99": round(ours["setup_p99_ms"] / other["setup_p99_ms"], 2),
            "concurrent": round(ours["concurrent_s"] / other["concurrent_s"], 2),
        }
        if other["concurrent_cpu_s"] > 0 and other["setup_cpu_us"] > 0:  # a relay's
            out[ref]["setup_cpu"] = round(ours["setup_cpu_us"] / other["setup_cpu_us"], 2)
            out[ref]["concurrent_cpu"] = round(ours["concurrent_cpu_s"] /
                                               other["concurrent_cpu_s"], 2)
        if ref != "direct" and other["idle_conns_growth_mib"] > 0:
            # What 1,000 idle connections add: all our relays, and the proxy alone.
            out[ref]["idle_conns_memory"] = round(ours["idle_conns_growth_mib"] /
                                                  other["idle_conns_growth_mib"], 2)
            out[ref]["idle_conns_memory_proxy_only"] = round(
                ours["proxy_idle_conns_growth_mib"] / other["idle_conns_growth_mib"], 2)
    if tunnels.get("haproxy_rss_mib"):
        out.setdefault("haproxy", {})["tunnels_memory"] = round(
            tunnels["treadmill_rss_mib"] / tunnels["haproxy_rss_mib"], 2)
    if tunnels.get("socat_pss_mib"):
        out.setdefault("socat", {})["tunnels_memory"] = round(
            tunnels["treadmill_rss_mib"] / tunnels["socat_pss_mib"], 2)
    return out


def _pool_text(report: dict[str, Any]) -> str:
    pool = report.get("pool")
    return "default" if pool is None else str(pool)


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Proxy benchmark, {report['date']}: {m['cpus']} CPUs ({m['cpu']}), "
             f"kernel {m['kernel']}, Python {m['python']}",
             f"{m['haproxy'] or 'no HAProxy'}; {m['socat'] or 'no socat'}", ""]
    header = (f"{'path':<13} {'down MiB/s':>10} {'up MiB/s':>9} {'CPU s/GiB':>9} "
              f"{'p50 ms':>7} {'p99 ms':>7} {'CPU µs':>6} {'conc s':>7} {'CPU s':>5} "
              f"{'fail':>4} {'PSS MiB':>8} {'+conns':>7}")
    lines += [header, "-" * len(header)]
    for r in report["paths"]:
        cpu = (r["download_cpu_s_per_gib"] + r["upload_cpu_s_per_gib"]) / 2
        lines.append(f"{r['path']:<13} {r['download_mib_s']:>10.0f} {r['upload_mib_s']:>9.0f} "
                     f"{cpu:>9.2f} {r['setup_p50_ms']:>7.3f} {r['setup_p99_ms']:>7.3f} "
                     f"{r['setup_cpu_us']:>6} {r['concurrent_s']:>7.2f} "
                     f"{r['concurrent_cpu_s']:>5.2f} {r['concurrent_failures']:>4} "
                     f"{r['idle_conns_pss_mib']:>8.1f} {r['idle_conns_growth_mib']:>7.1f}")
        if "proxy_idle_conns_pss_mib" in r:
            lines.append(f"  {'(the proxy process alone)':<85} "
                         f"{r['proxy_idle_conns_pss_mib']:>8.1f} "
                         f"{r['proxy_idle_conns_growth_mib']:>7.1f}")
    lines.append("")
    lines.append(f"throughput: {report['size_mib']} MiB each way on one connection; "
                 f"setup: {report['connects']} sequential connect+1-byte echo+close; "
                 f"CPU µs: the relays' per setup; "
                 f"conc: {report['concurrent']} connections at once (echo 64 B); "
                 f"CPU s: the relays' in it; "
                 f"pool.per_job: {_pool_text(report)}; "
                 f"PSS: the relays' memory with them open, +conns: what they added")
    for r in report["paths"]:
        lines.append(f"  {r['path']}: {r['note']}")
    t = report["tunnels"]
    if t:
        lines += ["", f"{t['count']} idle tunnels: treadmill proxy RSS "
                  f"{t['treadmill_base_rss_mib']} -> {t['treadmill_rss_mib']} MiB "
                  f"({t['treadmill_per_tunnel_kib']} KiB per job with its control connection "
                  f"and port; published in {t['treadmill_publish_s']} s)"]
        if "haproxy_rss_mib" in t:
            lines.append(f"  HAProxy with {t['count']} listen sections: {t['haproxy_rss_mib']} "
                         "MiB RSS")
        if "socat_pss_mib" in t:
            lines.append(f"  {t['count']} socat listeners: {t['socat_pss_mib']} MiB PSS "
                         f"({t['socat_rss_mib']} MiB RSS)")
    lines += ["", "ratios (treadmill / reference; throughput > 1 is faster, the rest < 1 is "
              "better):"]
    for ref, values in report["ratios"].items():
        lines.append(f"  vs {ref:<8} " + ", ".join(f"{k} {v}" for k, v in values.items()))
    if report["skipped"]:
        lines.append("skipped: " + ", ".join(report["skipped"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
