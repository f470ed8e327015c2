#!/usr/bin/env python3
"""Benchmark of the image store: big-blob upload and download, small-blob GETs, memory.

    .venv/bin/python tools/bench/imagestore.py [--size 1G] [--size 256M] [--json]

What it starts, measures and prints, and its options: ``tools/bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchkit import cli
from benchkit.daemons import Nginx, remove_temp, role_config, signer, start_daemon, temp_dir, twistd
from benchkit.host import ambient, first_line, host_info, stamp
from benchkit.procfs import KB_MB, Monitor, reset_hwm, rusage_cpu, status_kb
from benchkit.procs import ROOT, Profiler, free_port, stop_process
from benchkit.report import WRK_REPORT_LUA, cell, headline, verdict_lines, wrk

# Targets of the issue.
TARGET_GET_RATIO = 0.5      # GET MB/s through the store / nginx's
TARGET_UPLOAD_RATIO = 0.5   # upload MB/s (end to end) / sha256sum's MB/s
FLAT_MB = 16.0              # "flat": peak RSS moves by less than this between sizes

SERVICE = "treadmill-imagestore"
MiB = 1024 * 1024
MB = 1e6
REPO_BIG = "bench/big"
REPO_CHUNKED = "bench/chunked"
REPO_SMALL = "bench/small"
REPO_PUBLIC = "bench/public"  # in anonymous_pull

say = cli.sayer()
_UNITS = {"": 1, "k": 1024, "m": MiB, "g": 1024 * MiB}


def byte_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 1G, 256M or 4096: {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def human(n: int) -> str:
    for unit, factor in (("GiB", 1024 * MiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} B"


# -- machine ---------------------------------------------------------------------------


def machine_info(tmp: Path) -> dict[str, Any]:
    fs = first_line(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", str(tmp)])
    return {
        **host_info(),
        "filesystem": fs,
        "curl": first_line(["curl", "--version"]),
        "sha256sum": first_line(["sha256sum", "--version"]),
        "wrk": first_line(["wrk", "-v"]),
        "nginx": first_line(["nginx", "-v"]) if shutil.which("nginx") else "absent",
    }


# -- memory and CPU of a phase ------------------------------------------------------------


class Phase:
    """CPU time and peak RSS of the store (or nginx) through one phase.

    Wraps the switchboard benchmark's :class:`Monitor` (CPU of the server and
    its direct children, of reaped children of ours, of the whole machine;
    RSS sampled every 50 ms) and adds our own CPU time (the upload client runs
    in this process) and a per-phase ``VmHWM`` (reset before the phase).
    """

    def __init__(self, pid: int, memory: bool = True):
        self.pid = pid
        self.memory = memory
        self.hwm_reset = reset_hwm(pid) if memory else False
        self.rss_before = (status_kb(pid, "VmRSS") or 0) * KB_MB
        self.monitor = Monitor(pid, None, memory, interval=0.05)
        self.self0 = rusage_cpu()
        self.monitor.begin()

    def end(self) -> dict[str, Any]:
        try:
            usage = self.monitor.end()
        finally:
            self.monitor.stop()
        own = rusage_cpu() - self.self0
        usage["client_cpu_s"] = round(usage.pop("loadgen_cpu_s") + own, 3)
        cores = len(os.sched_getaffinity(0))
        if usage.get("other_cpu_busy") is not None and usage["wall_s"]:
            usage["other_cpu_busy"] = round(max(0.0, usage["other_cpu_busy"]
                                                - own / (cores * usage["wall_s"])), 3)
        if self.memory:
            usage["rss_mb_before"] = round(self.rss_before, 1)
            if self.hwm_reset:
                # VmHWM was reset to the RSS at the start: it is this phase's exact peak.
                usage["peak_rss_mb"] = usage["hwm_mb"]
            else:
                usage["peak_rss_mb"] = usage["rss_mb_peak"]
        usage.pop("server_runq_wait_s", None)
        usage.pop("postgres_cpu_s", None)
        return usage


# -- a small HTTP/1.1 client on a blocking socket ----------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection; bodies are sent from a file with sendfile(2)."""

    def __init__(self, port: int, timeout: float = 600.0):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()

    def send(self, method: str, target: str, headers: dict[str, str],
             body: bytes | None = None, file: Any = None, offset: int = 0,
             count: int = 0) -> None:
        length = len(body) if body is not None else count
        lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{self.port}",
                 f"Content-Length: {length}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        if body:
            self.sock.sendall(body)
        elif file is not None and count:
            sent = self.sock.sendfile(file, offset, count)
            if sent != count:
                raise cli.BenchError(f"sendfile sent {sent} of {count} bytes")

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status_line = self.reader.readline()
        if not status_line.startswith(b"HTTP/1."):
            raise cli.BenchError(f"bad response: {status_line[:100]!r}")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while True:
            line = self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        body = b""
        if status in (204, 304) or 100 <= status < 200:
            pass
        elif "content-length" in headers:
            body = self.reader.read(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size = int(self.reader.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.reader.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.reader.read(size))
                self.reader.readline()
            body = b"".join(parts)
        else:
            body = self.reader.read()
        return status, headers, body


def request(port: int, method: str, target: str, headers: dict[str, str],
            body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    conn = Connection(port, timeout=60)
    try:
        conn.send(method, target, {**headers, "Connection": "close"}, body=body)
        return conn.response()
    finally:
        conn.close()


# -- the benchmark ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = temp_dir("tml-bench-imagestore-", args.tmpdir)
        self.store: subprocess.Popen[bytes] | None = None
        self.store_port = 0
        self.nginx: Nginx | None = None
        self.results: dict[str, Any] = {"sizes": [], "small": []}
        self.profiler = Profiler(args.py_spy, self.results)
        self.report_lua = self.tmp / "report.lua"
        self.report_lua.write_text(WRK_REPORT_LUA)
        from treadmill.common.captoken import Access

        self.keys_file = self.tmp / "capability-keys.json"
        sign = signer(self.keys_file).sign
        ttl = 6 * 3600.0
        self.push_token = sign("bench", SERVICE, [
            Access("repository", repo, ("pull", "push"))
            for repo in (REPO_BIG, REPO_CHUNKED, REPO_SMALL, REPO_PUBLIC)], ttl)
        self.pull_token = sign("bench", SERVICE, [Access("repository", REPO_SMALL, ("pull",))],
                               ttl)

    # -- processes -----------------------------------------------------------------

    def start_store(self, name: str) -> str:
        port = free_port()
        config = role_config(self.tmp / f"{name}.toml",
                             f"tcp:{port}:interface=127.0.0.1:backlog=1024", self.tmp / name,
                             SERVICE, self.keys_file,
                             f'anonymous_pull = ["{REPO_PUBLIC}"]\n',
                             'realm = "http://127.0.0.1:9/api/v1/registry/token"\n')
        say(f"starting the image store ({name}) on 127.0.0.1:{port}")
        url = f"http://127.0.0.1:{port}"
        self.store = start_daemon(twistd("treadmill-imagestore", "--config", str(config),
                                         logger=self.args.logger),
                                  self.tmp / f"{name}.log", url + "/healthz", "the image store",
                                  level="warn")
        self.store_port = port
        return url

    def stop_store(self) -> None:
        stop_process(self.store)
        self.store = None

    def start_nginx(self) -> None:
        if Nginx.available(self.args.no_nginx, say):
            # The root is the temporary directory: /<store>/blobs/sha256/<hh>/<hex> is a
            # store's own blob file.
            (self.tmp / "ping").write_text("ok\n")
            self.nginx = Nginx(self.tmp / "nginx", self.tmp, "/ping",
                               "application/octet-stream", say)

    def profile(self, name: str) -> subprocess.Popen[bytes] | None:
        """With ``--py-spy DIR``: sample the store until ``profiler.stop``."""
        pid = self.store.pid if self.store is not None else None
        return self.profiler.start(pid, name, "--rate", "200", "--threads")

    def cleanup(self) -> None:
        self.profiler.stop_all()
        for step in (self.stop_store, self.nginx.stop if self.nginx else None):
            with contextlib.suppress(Exception):
                step()  # type: ignore[misc]
        remove_temp(self.tmp, self.args.keep_temp, say)

    # -- steps -----------------------------------------------------------------------

    def make_file(self, size: int) -> tuple[Path, str]:
        path = self.tmp / f"blob-{size}.bin"
        say(f"writing {human(size)} of random bytes to {path.name}")
        hasher = hashlib.sha256()
        block = 4 * MiB
        with path.open("wb") as f:
            left = size
            while left:
                data = os.urandom(min(block, left))
                hasher.update(data)
                f.write(data)
                left -= len(data)
        return path, "sha256:" + hasher.hexdigest()

    @staticmethod
    def warm(path: Path) -> float:
        """Read ``path`` once so that it is in the page cache; return the seconds taken."""
        start = time.monotonic()
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True, timeout=600)
        return time.monotonic() - start

    def sha256sum(self, path: Path, digest: str, size: int) -> dict[str, Any]:
        self.warm(path)
        start = time.monotonic()
        proc = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True,
                              check=True, timeout=600)
        wall = time.monotonic() - start
        if "sha256:" + proc.stdout.split()[0] != digest:
            raise cli.BenchError("sha256sum disagrees with the digest computed while writing")
        return {"seconds": round(wall, 3), "mb_s": round(size / wall / MB, 1)}

    def upload_monolithic(self, path: Path, digest: str, size: int) -> dict[str, Any]:
        assert self.store is not None
        phase = Phase(self.store.pid)
        conn = Connection(self.store_port)
        try:
            with path.open("rb") as f:
                start = time.monotonic()
                conn.send("POST", f"/v2/{REPO_BIG}/blobs/uploads/?digest={digest}",
                          {"Authorization": f"Bearer {self.push_token}",
                           "Content-Type": "application/octet-stream",
                           "Connection": "close"}, file=f, count=size)
                sent = time.monotonic()
                status, headers, body = conn.response()
                done = time.monotonic()
        finally:
            conn.close()
        usage = phase.end()
        if status != 201 or headers.get("docker-content-digest") != digest:
            raise cli.BenchError(f"monolithic upload answered {status}: {body[:300]!r}")
        wall = done - start
        return {"kind": "monolithic", "seconds": round(wall, 3),
                "mb_s": round(size / wall / MB, 1),
                # sendfile returned: all but the socket buffers' worth was taken by the store.
                "body_sent_s": round(sent - start, 3),
                # from then to the 201: the rest of the body, verification, fsync, commit.
                "after_body_s": round(done - sent, 3), **usage}

    def upload_chunked(self, path: Path, digest: str, size: int) -> dict[str, Any]:
        assert self.store is not None
        chunk = self.args.chunk_size
        auth = {"Authorization": f"Bearer {self.push_token}"}
        phase = Phase(self.store.pid)
        conn = Connection(self.store_port)
        requests = 0
        try:
            with path.open("rb") as f:
                start = time.monotonic()
                conn.send("POST", f"/v2/{REPO_CHUNKED}/blobs/uploads/", auth)
                status, headers, body = conn.response()
                requests += 1
                if status != 202:
                    raise cli.BenchError(f"starting an upload answered {status}: {body[:300]!r}")
                location = headers["location"]
                offset = 0
                while offset < size:
                    count = min(chunk, size - offset)
                    conn.send("PATCH", location,
                              {**auth, "Content-Type": "application/octet-stream",
                               "Content-Range": f"{offset}-{offset + count - 1}"},
                              file=f, offset=offset, count=count)
                    status, headers, body = conn.response()
                    requests += 1
                    if status != 202:
                        raise cli.BenchError(f"PATCH answered {status}: {body[:300]!r}")
                    location = headers.get("location", location)
                    offset += count
                sep = "&" if "?" in location else "?"
                sent = time.monotonic()
                conn.send("PUT", f"{location}{sep}digest={digest}", auth)
                status, headers, body = conn.response()
                requests += 1
                done = time.monotonic()
        finally:
            conn.close()
        usage = phase.end()
        if status != 201:
            raise cli.BenchError(f"committing the chunked upload answered {status}: {body[:300]!r}")
        wall = done - start
        return {"kind": f"chunked ({human(chunk)} PATCHes)", "seconds": round(wall, 3),
                "mb_s": round(size / wall / MB, 1), "requests": requests,
                "body_sent_s": round(sent - start, 3), "after_body_s": round(done - sent, 3),
                **usage}

    def curl_get(self, url: str, token: str | None, size: int) -> dict[str, Any]:
        cmd = ["curl", "-sS", "-o", "/dev/null", "--max-time", "600", "-w",
               "%{http_code} %{size_download} %{time_total} %{time_starttransfer}"]
        if token:
            cmd += ["-H", f"Authorization: Bearer {token}"]
        proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=660,
                              check=False)
        fields = proc.stdout.split()
        if proc.returncode != 0 or len(fields) != 4 or fields[0] != "200" \
                or int(fields[1]) != size:
            raise cli.BenchError(f"curl {url} failed ({proc.returncode}): {proc.stdout} "
                             f"{proc.stderr.strip()}")
        total = float(fields[2])
        return {"seconds": round(total, 3), "mb_s": round(size / total / MB, 1),
                "first_byte_ms": round(float(fields[3]) * 1000, 2)}

    def get_phase(self, server: str, url: str, token: str | None, size: int,
                  pid: int, memory: bool) -> dict[str, Any]:
        runs = []
        phase = Phase(pid, memory=memory)
        for _ in range(self.args.repeat):
            runs.append(self.curl_get(url, token, size))
        usage = phase.end()
        rates = [r["mb_s"] for r in runs]
        median = statistics.median(rates)
        entry = {"server": server, "mb_s": round(median, 1), "mb_s_runs": rates,
                 "first_byte_ms": statistics.median(r["first_byte_ms"] for r in runs),
                 **usage}
        entry["server_cpu_s_per_gib"] = round(
            usage["server_cpu_s"] / (size * len(runs) / (1024 * MiB)), 3)
        say(f"  GET via {server}: {median:.0f} MB/s (runs: "
            f"{', '.join(f'{r:.0f}' for r in rates)})"
            + (f", peak RSS {usage['peak_rss_mb']:.1f} MB" if memory else ""))
        return entry

    def run_size(self, size: int) -> None:
        a = self.args
        name = f"store-{size}"
        entry: dict[str, Any] = {"size": size, "size_h": human(size)}
        self.results["sizes"].append(entry)
        path, digest = self.make_file(size)
        entry["digest"] = digest
        self.start_store(name)
        try:
            assert self.store is not None
            entry["store_rss_mb_idle"] = round((status_kb(self.store.pid, "VmRSS") or 0)
                                               * KB_MB, 1)
            say(f"{human(size)}: sha256sum after a warm read")
            entry["sha256sum"] = self.sha256sum(path, digest, size)
            say(f"  sha256sum: {entry['sha256sum']['mb_s']:.0f} MB/s")

            self.warm(path)
            say(f"{human(size)}: monolithic upload")
            prof = self.profile(f"upload-{size}")
            try:
                up = self.upload_monolithic(path, digest, size)
            finally:
                self.profiler.stop(prof)
            entry["uploads"] = [up]
            say(f"  {up['mb_s']:.0f} MB/s end to end ({up['seconds']:.2f} s, of which "
                f"{up['after_body_s']:.2f} s after the last byte was handed to the kernel), "
                f"peak RSS {up['peak_rss_mb']:.1f} MB")
            if not a.no_chunked:
                self.warm(path)
                say(f"{human(size)}: chunked upload ({human(a.chunk_size)} PATCHes)")
                ch = self.upload_chunked(path, digest, size)
                entry["uploads"].append(ch)
                say(f"  {ch['mb_s']:.0f} MB/s end to end, peak RSS {ch['peak_rss_mb']:.1f} MB")

            blob = self.tmp / name / "blobs" / "sha256" / digest[7:9] / digest[7:]
            if not blob.is_file():
                raise cli.BenchError(f"the store's blob file is not where expected: {blob}")
            entry["warm_read_blob_s"] = round(self.warm(blob), 3)
            say(f"{human(size)}: GET x{a.repeat}, store then nginx (same file)")
            store_url = f"http://127.0.0.1:{self.store_port}/v2/{REPO_BIG}/blobs/{digest}"
            prof = self.profile(f"get-{size}")
            try:
                entry["get"] = [self.get_phase("image store", store_url, self.push_token,
                                               size, self.store.pid, True)]
            finally:
                self.profiler.stop(prof)
            if self.nginx is not None:
                rel = blob.relative_to(self.tmp)
                entry["get"].append(self.get_phase(
                    "nginx", f"http://127.0.0.1:{self.nginx.port}/{rel}", None, size,
                    self.nginx.proc.pid, False))
            entry["store_hwm_mb_lifetime"] = round(
                (status_kb(self.store.pid, "VmHWM") or 0) * KB_MB, 1)
        finally:
            self.stop_store()
            with contextlib.suppress(OSError):
                path.unlink()
            shutil.rmtree(self.tmp / name, ignore_errors=True)

    def wrk(self, url: str, token: str | None) -> dict[str, Any]:
        a = self.args
        return wrk(url, self.report_lua, a.duration, a.threads, a.connections, token)

    def small_phase(self, server: str, url: str, token: str | None, pid: int,
                    memory: bool) -> None:
        a = self.args
        if a.warmup > 0:
            saved, a.duration = a.duration, a.warmup
            try:
                self.wrk(url, token)
            finally:
                a.duration = saved
        say(f"small blob: {server} ...")
        phase = Phase(pid, memory=memory)
        result = self.wrk(url, token)
        usage = phase.end()
        ok = (result.get("requests") or 0) - (result.get("non_2xx") or 0)
        if ok:
            usage["server_cpu_ms_per_req"] = round(usage["server_cpu_s"] / ok * 1000, 3)
        entry = {"server": server, **result, **usage}
        say(f"  {entry['ok_rps']:.0f} req/s, p50 {entry['p50_ms']:.2f} ms, "
            f"p99 {entry['p99_ms']:.2f} ms, errors {entry['non_2xx'] + entry['socket_errors']}"
            + (f", peak RSS {usage['peak_rss_mb']:.1f} MB" if memory else ""))
        self.results["small"].append(entry)

    def run_small(self) -> None:
        a = self.args
        data = os.urandom(a.small_size)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.start_store("store-small")
        try:
            assert self.store is not None
            for repo in (REPO_SMALL, REPO_PUBLIC):
                status, _, body = request(
                    self.store_port, "POST", f"/v2/{repo}/blobs/uploads/?digest={digest}",
                    {"Authorization": f"Bearer {self.push_token}",
                     "Content-Type": "application/octet-stream"}, data)
                if status != 201:
                    raise cli.BenchError(f"pushing the small blob answered {status}: "
                                         f"{body[:300]!r}")
            base = f"http://127.0.0.1:{self.store_port}/v2"
            status, _, body = request(self.store_port, "GET",
                                      f"/v2/{REPO_PUBLIC}/blobs/{digest}", {})
            if status != 200 or body != data:
                raise cli.BenchError(f"anonymous GET answered {status}")
            prof = self.profile("small-token")
            try:
                self.small_phase("image store, pull token", f"{base}/{REPO_SMALL}/blobs/{digest}",
                                 self.pull_token, self.store.pid, True)
            finally:
                self.profiler.stop(prof)
            self.small_phase("image store, anonymous_pull",
                             f"{base}/{REPO_PUBLIC}/blobs/{digest}", None, self.store.pid, True)
            if self.nginx is not None:
                blob = self.tmp / "store-small" / "blobs" / "sha256" / digest[7:9] / digest[7:]
                self.small_phase("nginx", f"http://127.0.0.1:{self.nginx.port}/"
                                 f"{blob.relative_to(self.tmp)}", None, self.nginx.proc.pid, False)
            self.results["small_hwm_mb_lifetime"] = round(
                (status_kb(self.store.pid, "VmHWM") or 0) * KB_MB, 1)
        finally:
            self.stop_store()

    def run(self) -> dict[str, Any]:
        a = self.args
        self.results["ambient_cpu_busy"] = round(ambient(say), 3)
        stamp(self.results, machine_info(self.tmp), {
            "sizes": a.size, "repeat": a.repeat, "chunk_size": a.chunk_size,
            "small_size": a.small_size, "duration_s": a.duration, "connections": a.connections,
            "threads": a.threads, "warmup_s": a.warmup, "logger": a.logger,
            "tmpdir": str(self.tmp.parent)}, ROOT)
        self.start_nginx()
        for size in a.size:
            self.run_size(size)
        if not a.no_small:
            self.run_small()
        self.results["verdicts"] = verdicts(self.results)
        return self.results


# -- report ----------------------------------------------------------------------------------


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for entry in results["sizes"]:
        get = {g["server"]: g for g in entry.get("get", [])}
        if "image store" in get and "nginx" in get and get["nginx"]["mb_s"]:
            ratio = get["image store"]["mb_s"] / get["nginx"]["mb_s"]
            entry["get_ratio"] = round(ratio, 3)
            out.append({"target": f"GET {entry['size_h']} >= {TARGET_GET_RATIO:g} of nginx",
                        "value": round(ratio, 3), "met": ratio >= TARGET_GET_RATIO})
        sha = entry.get("sha256sum", {}).get("mb_s")
        uploads = entry.get("uploads", [])
        if sha and uploads:
            ratio = uploads[0]["mb_s"] / sha
            entry["upload_ratio"] = round(ratio, 3)
            out.append({"target": f"upload {entry['size_h']} >= {TARGET_UPLOAD_RATIO:g} of "
                                  "sha256sum", "value": round(ratio, 3),
                        "met": ratio >= TARGET_UPLOAD_RATIO})
            if len(uploads) > 1:
                entry["chunked_upload_ratio"] = round(uploads[1]["mb_s"] / sha, 3)
    sizes = sorted(results["sizes"], key=lambda e: e["size"])
    if len(sizes) >= 2:
        small, big = sizes[0], sizes[-1]

        def peaks(entry: dict[str, Any]) -> dict[str, float]:
            found = {"upload": max((u["peak_rss_mb"] for u in entry.get("uploads", [])),
                                   default=None)}
            for g in entry.get("get", []):
                if g["server"] == "image store":
                    found["GET"] = g["peak_rss_mb"]
            return {k: v for k, v in found.items() if v is not None}

        p_small, p_big = peaks(small), peaks(big)
        for phase in ("upload", "GET"):
            if phase in p_small and phase in p_big:
                diff = p_big[phase] - p_small[phase]
                out.append({"target": f"{phase} peak RSS flat ({big['size_h']} vs "
                                      f"{small['size_h']}: < {FLAT_MB:g} MB apart)",
                            "value": round(diff, 1), "met": abs(diff) < FLAT_MB})
    else:
        for entry in sizes:
            for phase in entry.get("uploads", [])[:1] + [
                    g for g in entry.get("get", []) if g["server"] == "image store"]:
                growth = phase["peak_rss_mb"] - phase["rss_mb_before"]
                what = "upload" if "kind" in phase else "GET"
                out.append({"target": f"{what} {entry['size_h']}: peak RSS grows by "
                                      f"< {FLAT_MB:g} MB (one size only)",
                            "value": round(growth, 1), "met": growth < FLAT_MB})
    return out


def table(results: dict[str, Any]) -> str:
    m, p = results["machine"], results["parameters"]
    lines = [
        headline("Image store benchmark", results),
        f"temporary directory on {m['filesystem']}; machine "
        f"{results.get('ambient_cpu_busy', 0):.0%} busy before the start",
        "",
        f"{'size':>8} {'phase':<34} {'MB/s':>7} {'s':>7} {'srv CPU s':>9} {'client CPU':>10} "
        f"{'CPUs busy':>9} {'other':>6} {'RSS MB':>7} {'peak MB':>7}",
        "-" * 112,
    ]
    for e in results["sizes"]:
        size = e["size_h"]
        sha = e.get("sha256sum", {})
        lines.append(f"{size:>8} {'sha256sum (warm page cache)':<34} "
                     f"{cell(sha.get('mb_s'), '7.0f')} {cell(sha.get('seconds'), '7.2f')}")
        for u in e.get("uploads", []):
            lines.append(
                f"{size:>8} {'upload, ' + u['kind']:<34} {u['mb_s']:>7.0f} {u['seconds']:>7.2f} "
                f"{u['server_cpu_s']:>9.2f} {u['client_cpu_s']:>10.2f} "
                f"{cell(u.get('machine_cpu_busy'), '9.0%')} "
                f"{cell(u.get('other_cpu_busy'), '6.0%')} "
                f"{u['rss_mb_before']:>7.1f} {u['peak_rss_mb']:>7.1f}")
        for g in e.get("get", []):
            label = f"GET via {g['server']} (median of {len(g['mb_s_runs'])})"
            lines.append(
                f"{size:>8} {label:<34} {g['mb_s']:>7.0f} {g['wall_s']:>7.2f} "
                f"{g['server_cpu_s']:>9.2f} {g['client_cpu_s']:>10.2f} "
                f"{cell(g.get('machine_cpu_busy'), '9.0%')} "
                f"{cell(g.get('other_cpu_busy'), '6.0%')} "
                f"{cell(g.get('rss_mb_before'), '7.1f')} {cell(g.get('peak_rss_mb'), '7.1f')}")
    lines += [
        "",
        "MB/s: 10^6 bytes per second; an upload is timed from its first byte to the 201 (body, "
        "digest check, fsync, commit).",
        "s: that time (GET: all runs). srv CPU s: the store's (or nginx's) CPU time; client "
        "CPU: curl / this script.",
        "RSS MB: the store's RSS before the phase; peak MB: its VmHWM over the phase (reset "
        "before it).",
    ]
    if results.get("small"):
        lines += ["", f"small blob ({p['small_size']} bytes), wrk -t{p['threads']} "
                      f"-c{p['connections']} -d{p['duration_s']:g}s:",
                  f"  {'server':<30} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
                  f"{'CPU ms/req':>10} {'peak MB':>7}"]
        for s in results["small"]:
            lines.append(f"  {s['server']:<30} {s['ok_rps']:>8.0f} {s['p50_ms']:>7.2f} "
                         f"{s['p99_ms']:>7.2f} {s['non_2xx'] + s['socket_errors']:>6} "
                         f"{cell(s.get('server_cpu_ms_per_req'), '10.3f')} "
                         f"{cell(s.get('peak_rss_mb'), '7.1f')}")
    lines.append("")
    for e in results["sizes"]:
        if "get_ratio" in e:
            lines.append(f"{e['size_h']}: GET store / nginx = {e['get_ratio']:.3f}")
        if "upload_ratio" in e:
            lines.append(f"{e['size_h']}: upload / sha256sum = {e['upload_ratio']:.3f}"
                         + (f" (chunked: {e['chunked_upload_ratio']:.3f})"
                            if "chunked_upload_ratio" in e else ""))
    for e in results["sizes"]:
        for row in e.get("uploads", []) + e.get("get", []):
            if (row.get("other_cpu_busy") or 0) > 0.15:
                lines.append(f"warning: {e['size_h']}: other processes used "
                             f"{row['other_cpu_busy']:.0%} of the machine during a phase")
    lines += ["", "Targets:", *verdict_lines(results["verdicts"], 58)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.bench_parser("imagestore.py", __doc__,
                          "Targets: GET >= 0.5 of nginx; upload >= 0.5 of sha256sum; "
                          "memory flat in blob size.")
    parser.add_argument("--size", type=byte_size, action="append",
                        help="blob size (1G, 256M, ...); repeatable; default 1G")
    parser.add_argument("--repeat", type=int, default=3, help="GETs per server and size")
    parser.add_argument("--chunk-size", type=byte_size, default=8 * MiB,
                        help="PATCH size of the chunked upload (default 8M, as tml image push)")
    parser.add_argument("--no-chunked", action="store_true", help="skip the chunked upload")
    cli.options(parser, (
        ("--small-size", byte_size, 4096, "size of the small blob (default 4096 bytes)"),
        ("--duration", float, 10.0, "seconds of each small-blob wrk run"),
        ("--connections", int, 100, "wrk connections"),
        ("--threads", int, 2, "wrk threads"),
        ("--warmup", float, 2.0, "seconds of unrecorded wrk load before each small-blob run"),
    ))
    parser.add_argument("--no-small", action="store_true", help="skip the small-blob GETs")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx reference")
    cli.daemon_options(parser, "the store during the uploads, the GETs and the small-blob run")
    cli.output_options(parser, keep_help="keep the temporary directory (logs) for inspection")
    args = parser.parse_args(argv)
    args.size = args.size or [1024 * MiB]
    if not all(MiB <= s <= 64 * 1024 * MiB for s in args.size):
        parser.error("--size must be between 1M and 64G")
    if not (1 <= args.repeat <= 20 and 0 < args.duration <= 300 and 0 <= args.warmup <= 60):
        parser.error("--repeat in [1, 20], --duration in (0, 300], --warmup in [0, 60]")
    if not (1 <= args.connections <= 1000 and 1 <= args.threads <= args.connections):
        parser.error("--connections must be in [1, 1000], --threads in [1, connections]")
    if not MiB // 16 <= args.chunk_size <= 1024 * MiB:
        parser.error("--chunk-size must be between 64K and 1G")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if cli.missing("imagestore", "curl", "sha256sum", "wrk"):
        return 2
    errors = (cli.BenchError, OSError, subprocess.SubprocessError)
    return cli.run(Bench(args), args, table, errors, say)


if __name__ == "__main__":
    sys.exit(main())
