"""Processes and loopback ports: start, wait for, stop, profile; a small HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchkit.cli import BenchError

ROOT = Path(__file__).resolve().parents[3]
VENV = ROOT / ".venv" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_range(size: int, start: int = 30000, stop: int = 60000) -> int:
    """The first of ``size`` consecutive loopback ports nothing listens on."""
    first = start
    while first + size < stop:
        for port in range(first, first + size):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    first = port + 1
                    break
        else:
            return first
    raise RuntimeError(f"no run of {size} free ports")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def raise_nofile() -> None:
    """preexec_fn: raise the soft RLIMIT_NOFILE of the child to its hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def spawn(cmd: list[str], log: Path, *, cwd: Path | None = None,
          env: dict[str, str] | None = None, stdout_pipe: bool = False,
          nofile: bool = True) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (with a raised fd limit), output to ``log``."""
    out = subprocess.PIPE if stdout_pipe else log.open("ab")
    err = log.with_suffix(".err").open("ab") if stdout_pipe else subprocess.STDOUT
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=err, start_new_session=True,
                            preexec_fn=raise_nofile if nofile else None)


def stop_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM,
                 timeout: float = 15.0) -> float | None:
    """Signal ``proc`` and wait for it (SIGKILL to its group after ``timeout``); seconds."""
    if proc is None or proc.poll() is not None:
        return None
    start = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    return time.monotonic() - start


def wait_until(check: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> float:
    """Seconds until ``check()`` is true; :class:`BenchError` after ``timeout``."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)
    return time.monotonic() - t0


def http(method: str, url: str, token: str | None = None, body: Any = None,
         timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of one request with an optional bearer token and JSON body."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_json(method: str, url: str, token: str | None = None, body: Any = None,
              timeout: float = 10.0) -> tuple[int, Any]:
    """:func:`http` with the body parsed as JSON where it is; ``(0, None)`` if unreachable."""
    try:
        status, raw = http(method, url, token, body, timeout)
    except (urllib.error.URLError, OSError):
        return 0, None
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw


def wait_http(url: str, proc: subprocess.Popen[Any], what: str, log: Path,
              timeout: float = 60.0, interval: float = 0.2) -> None:
    """Wait until ``url`` answers 200; BenchError if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}; see its log:\n"
                             + tail(log))
        with contextlib.suppress(OSError):
            if http("GET", url, timeout=2)[0] == 200:
                return
        time.sleep(interval)
    raise BenchError(f"{what} did not answer {url} within {timeout:.0f} s:\n" + tail(log))


def py_spy() -> str | None:
    """The py-spy executable (on PATH or in .venv), or None."""
    path = shutil.which("py-spy") or str(VENV / "py-spy")
    return path if Path(path).exists() else None


def py_spy_record(pid: int, out_dir: str, name: str, *options: str
                  ) -> tuple[subprocess.Popen[bytes], str]:
    """``py-spy record`` of ``pid`` into ``OUT_DIR/NAME.txt`` (raw stacks); (process, file)."""
    binary = py_spy()
    if binary is None:
        raise BenchError("--py-spy needs py-spy (.venv/bin/pip install py-spy)")
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "record", "--pid", str(pid), *options, "--format", "raw",
         "--output", str(out / f"{name}.txt")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=(out / f"{name}.log").open("wb"), start_new_session=True)
    return proc, str(out / f"{name}.txt")


class Profiler:
    """``--py-spy DIR``: py-spy recordings of a daemon, listed in ``results["profiles"]``."""

    def __init__(self, out_dir: str | None, results: dict[str, Any]):
        self.out_dir = out_dir
        self.results = results
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, pid: int | None, name: str, *options: str, attach: float = 0.5
              ) -> subprocess.Popen[bytes] | None:
        """Record ``pid`` (none without ``--py-spy`` or a pid) until :meth:`stop`."""
        if not self.out_dir or pid is None:
            return None
        proc, out = py_spy_record(pid, self.out_dir, name, *options)
        self.results.setdefault("profiles", []).append(out)
        time.sleep(attach)  # let it attach
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes] | None, timeout: float = 60) -> None:
        if proc is not None:
            stop_process(proc, signal.SIGINT, timeout=timeout)
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.running):
            with contextlib.suppress(Exception):
                self.stop(proc, 15)


class BadResponse(Exception):
    """Not an HTTP/1.x response."""


async def read_response(reader: asyncio.StreamReader
                        ) -> tuple[int, dict[bytes, bytes], bytes, bool]:
    """One HTTP/1.1 response: status, headers, body, and whether the connection stays open."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise BadResponse(lines[0][:80])
    status = int(parts[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if b":" in line:
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip()
    keep = headers.get(b"connection", b"").lower() != b"close" and parts[0] != b"HTTP/1.0"
    body = b""
    if 100 <= status < 200 or status in (204, 304):
        return status, headers, body, keep
    if b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                break
            chunks.append((await reader.readexactly(size + 2))[:-2])
        body = b"".join(chunks)
    else:
        body = await reader.read()  # delimited by the end of the connection
        keep = False
    return status, headers, body, keep
