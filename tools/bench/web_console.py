#!/usr/bin/env python3
"""Benchmark: the web console in headless Chromium (issue 16): jobs page, console latency, memory.

    .venv/bin/python tools/bench/web_console.py [--loads 20] [--latency-seconds 30]
                                                [--memory-seconds 300] [--json]

Starts PostgreSQL, a switchboard and a log server (``twistd``, loopback) and Debian's
headless Chromium (Selenium, as ``tests/web`` does), then measures:

1. **Time to first render of the jobs page**: ``--loads`` fresh loads of ``/#/jobs``
   (logged in, 100 jobs listed), from the navigation's start to the first job row in
   the DOM (a ``MutationObserver`` the benchmark adds to every document).
2. **Console latency at 1 MB/s**: the benchmark appends to a job's console on the log
   server, as a supervisor does (``POST …/streams/console?offset=N`` with the job's
   append token), 10 KB every 10 ms, each append ending with a line ``@@T SEQ MS`` (its
   wall-clock time); the job page follows the stream, and a hook on ``TextDecoder``
   (the page decodes every chunk it hands to xterm.js) notes when each marker
   arrived. Percentiles of arrival - append over ``--latency-seconds``. The terminal
   paints at the next animation frame (≤ 16 ms later), which is not included.
3. **Memory of the page at 100 KB/s**: the same at 100 KB/s for ``--memory-seconds``;
   the JS heap (``Runtime.getHeapUsage``) and the DOM nodes every 30 s. The scroll-back
   (10,000 lines) fills in under a minute at this rate, so a flat curve after that is
   the bounded memory of an hour.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request
from typing import Any

from benchkit.cli import BenchError, bench_parser, missing, output_options, run, sayer
from benchkit.daemons import Postgres, bootstrap, remove_temp, start_daemon, temp_dir, twistd
from benchkit.host import host_info, revision
from benchkit.procfs import tree_memory_mb
from benchkit.procs import ROOT, free_port, stop_process
from benchkit.report import percentile

say = sayer(clock=True)
SERVICE = "treadmill-logserver"
PASSWORD = "bench console password"
DIGEST = "sha256:" + "5" * 64

HOOK = """
(() => {
  window.__bench = { marks: [], rows: null };
  const decode = TextDecoder.prototype.decode;
  TextDecoder.prototype.decode = function (input, options) {
    const text = decode.call(this, input, options);
    if (text.includes("@@T ")) {
      const now = performance.timeOrigin + performance.now();
      for (const m of text.matchAll(/@@T (\\d+) (\\d+\\.\\d+)/g)) {
        window.__bench.marks.push([Number(m[1]), now - Number(m[2])]);
      }
    }
    return text;
  };
  new MutationObserver((_, observer) => {
    if (document.querySelector("#jobs tbody tr[data-job]")) {
      window.__bench.rows = performance.now();
      observer.disconnect();
    }
  }).observe(document, { childList: true, subtree: true });
})();
"""


def http(method: str, url: str, token: str | None = None, body: Any = None,
         data: bytes | None = None) -> Any:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    payload = json.dumps(body).encode() if body is not None else data
    request = urllib.request.Request(url, data=payload, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


class Writer(threading.Thread):
    """Appends ``rate`` bytes/s to a job's console in 10 ms steps, each ending with a
    timestamped marker line, as a supervisor's log shipping does."""

    def __init__(self, url: str, token: str, rate: float):
        super().__init__(daemon=True)
        self.url, self.token, self.rate = url, token, rate
        self.offset = 0
        self.stopping = threading.Event()
        self.appends = 0

    def run(self) -> None:
        step = 0.01
        size = int(self.rate * step)
        filler = (b"console line of a busy job, padded to a realistic width .......\n"
                  * (size // 64 + 1))
        start = time.monotonic()
        seq = 0
        while not self.stopping.is_set():
            seq += 1
            marker = b"@@T %d %.3f\n" % (seq, time.time() * 1000)
            body = filler[:max(0, size - len(marker))] + marker
            request = urllib.request.Request(f"{self.url}?offset={self.offset}", data=body,
                                             method="POST",
                                             headers={"Authorization": f"Bearer {self.token}"})
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
            self.offset += len(body)
            self.appends += 1
            delay = start + seq * step - time.monotonic()
            if delay > 0:
                time.sleep(delay)


class WebConsoleBench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = temp_dir("treadmill-bench-web-")
        self.procs: list[Any] = []
        self.db: Postgres | None = None
        self.driver: Any = None

    def cleanup(self) -> None:
        if self.driver is not None:
            self.driver.quit()
        for proc in reversed(self.procs):
            stop_process(proc)
        if self.db is not None:
            self.db.stop()
        remove_temp(self.tmp, self.args.keep_temp, say)

    def start(self) -> None:
        self.db = Postgres(self.tmp / "pg", say, durable=False)
        sb_port, logs_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{sb_port}"
        self.logs = f"http://127.0.0.1:{logs_port}"
        key = self.tmp / "key.pem"
        (self.tmp / "switchboard.toml").write_text(
            f'[logs]\nservers = ["{self.logs}"]\nservice = "{SERVICE}"\n')
        say(f"starting the switchboard on {self.url}")
        self.procs.append(start_daemon(twistd(
            "treadmill-switchboard", "--config", str(self.tmp / "switchboard.toml"),
            "--database-dsn", self.db.dsn, "--capabilities-signing-key", str(key),
            "--listen", f"tcp:{sb_port}:interface=127.0.0.1", "--http-access-log", "false"),
            self.tmp / "switchboard.log", f"{self.url}/healthz", "the switchboard",
            level="warn"))
        (self.tmp / "logserver.toml").write_text(
            f'listen = ["tcp:{logs_port}:interface=127.0.0.1"]\nroot = "{self.tmp / "logs"}"\n'
            f'service = "{SERVICE}"\nfsync = "never"\n[auth]\nkeys_file = "{key}"\n'
            f'issuer = "treadmill"\n[http]\naccess_log = false\ncors_origins = ["{self.url}"]\n')
        say(f"starting the log server on {self.logs}")
        self.procs.append(start_daemon(twistd("treadmill-logserver", "--config",
                                              str(self.tmp / "logserver.toml")),
                                       self.tmp / "logserver.log", f"{self.logs}/healthz",
                                       "the log server", level="warn"))
        self.admin = bootstrap("--database-dsn", self.db.dsn)
        http("POST", f"{self.url}/api/v1/users", self.admin,
             {"name": "viewer", "admin": True, "password": PASSWORD})
        say("enqueueing 100 jobs (no host: they stay queued)")
        self.jobs = [http("POST", f"{self.url}/api/v1/jobs", self.admin,
                          {"image": DIGEST, "tags": ["nowhere"], "label": f"bench job {i}"}
                          )["id"] for i in range(100)]
        from treadmill.common.captoken import Access, CapabilitySigner, load_or_create_signing_key

        class WallClock:
            @staticmethod
            def seconds() -> float:
                return time.time()

        self.signer = CapabilitySigner(load_or_create_signing_key(str(key)), "treadmill",
                                       WallClock())
        sys.path.insert(0, str(ROOT))
        from tests.web.browser import start_driver

        self.driver = start_driver()
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": HOOK})
        self.Access = Access

    def log_in(self) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        d = self.driver
        d.get(f"{self.url}/#/login")
        WebDriverWait(d, 20).until(lambda d: d.find_elements(By.ID, "login-form"))
        d.find_element(By.ID, "login-user").send_keys("viewer")
        d.find_element(By.ID, "login-password").send_keys(PASSWORD)
        d.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
        WebDriverWait(d, 20).until(lambda d: d.find_elements(By.ID, "whoami"))

    def first_render(self) -> dict[str, Any]:
        from selenium.webdriver.support.ui import WebDriverWait

        times = []
        for _ in range(self.args.loads):
            self.driver.get("about:blank")
            self.driver.get(f"{self.url}/#/jobs")
            times.append(WebDriverWait(self.driver, 20, poll_frequency=0.02).until(
                lambda d: d.execute_script("return window.__bench && window.__bench.rows")))
        say(f"jobs page loads (ms): {[round(t) for t in times]}")
        times.sort()
        say(f"jobs page: first row after {percentile(times, 50):.0f} ms (median)")
        return {"loads": len(times), "p50_ms": percentile(times, 50),
                "p90_ms": percentile(times, 90), "max_ms": max(times)}

    def console(self, rate: float, seconds: float, sample: float | None) -> dict[str, Any]:
        from selenium.webdriver.support.ui import WebDriverWait

        job = self.jobs[0] if rate > 200_000 else self.jobs[1]
        token = self.signer.sign("host:bench", SERVICE, [self.Access("job", job, ("append",))],
                                 seconds + 600)
        self.driver.get("about:blank")
        self.driver.get(f"{self.url}/#/jobs/{job}")
        WebDriverWait(self.driver, 20).until(
            lambda d: d.execute_script("return document.querySelector('#console-status')"))
        writer = Writer(f"{self.logs}/v1/jobs/{job}/streams/console", token, rate)
        writer.start()
        samples = []
        started = time.monotonic()
        try:
            while time.monotonic() - started < seconds:
                time.sleep(min(sample or seconds, seconds - (time.monotonic() - started)))
                if sample:
                    samples.append(self.memory(time.monotonic() - started))
                    say(f"  {samples[-1]['at_s']:.0f} s: heap {samples[-1]['heap_mb']:.1f} MB, "
                        f"browser PSS {samples[-1]['browser_pss_mb']:.0f} MB")
        finally:
            writer.stopping.set()
            writer.join()
        time.sleep(1.0)
        marks = self.driver.execute_script("return window.__bench.marks.splice(0)")
        latencies = sorted(latency for _, latency in marks)
        seen = len({seq for seq, _ in marks})
        result: dict[str, Any] = {
            "rate_bytes_per_s": rate, "seconds": seconds, "appends": writer.appends,
            "bytes": writer.offset, "markers_seen": seen,
            "received_bytes": int(self.driver.execute_script(
                "return document.querySelector('#console').dataset.bytes"))}
        if latencies:
            result.update({"p50_ms": percentile(latencies, 50),
                           "p99_ms": percentile(latencies, 99), "max_ms": latencies[-1]})
        if samples:
            result["memory"] = samples
        return result

    def memory(self, at: float) -> dict[str, Any]:
        # The benchmark's own markers are not the page's: drop them before measuring.
        self.driver.execute_script("window.__bench.marks.length = 0")
        self.driver.execute_cdp_cmd("HeapProfiler.collectGarbage", {})
        heap = self.driver.execute_cdp_cmd("Runtime.getHeapUsage", {})
        nodes = self.driver.execute_script("return document.getElementsByTagName('*').length")
        # The scroll-back's typed arrays live outside the JS heap: the browser's processes
        # (chromedriver's tree: Chromium, its renderer, GPU and utility processes) too.
        browser = tree_memory_mb(self.driver.service.process.pid)
        return {"at_s": round(at), "heap_mb": heap["usedSize"] / 1e6, "dom_nodes": nodes,
                "browser_pss_mb": browser["pss_mb"], "browser_rss_mb": browser["rss_mb"]}

    def run(self) -> dict[str, Any]:
        self.start()
        self.log_in()
        results: dict[str, Any] = {"host": host_info(), "revision": revision(ROOT),
                                   "chromium": self.driver.capabilities.get("browserVersion")}
        results["first_render"] = self.first_render()
        say(f"console latency at 1 MB/s for {self.args.latency_seconds:g} s")
        results["latency_1mbs"] = self.console(1_000_000, self.args.latency_seconds, None)
        say(f"page memory at 100 KB/s for {self.args.memory_seconds:g} s")
        results["memory_100kbs"] = self.console(100_000, self.args.memory_seconds, 30.0)
        return results


def table(results: dict[str, Any]) -> str:
    r, lat, mem = results["first_render"], results["latency_1mbs"], results["memory_100kbs"]
    lines = [f"jobs page, first row: p50 {r['p50_ms']:.0f} ms, p90 {r['p90_ms']:.0f} ms, "
             f"max {r['max_ms']:.0f} ms ({r['loads']} loads)",
             f"console at 1 MB/s: {lat['bytes']} bytes appended, {lat['received_bytes']} "
             f"received; latency p50 {lat.get('p50_ms', 0):.0f} ms, p99 "
             f"{lat.get('p99_ms', 0):.0f} ms, max {lat.get('max_ms', 0):.0f} ms"]
    for s in mem.get("memory", []):
        lines.append(f"page at 100 KB/s, {s['at_s']:>5} s: JS heap {s['heap_mb']:.1f} MB, "
                     f"{s['dom_nodes']} DOM nodes, browser PSS {s['browser_pss_mb']:.0f} MB")
    return "\n".join(lines)


def main() -> int:
    parser = bench_parser("web_console.py", __doc__ or "", "")
    parser.add_argument("--loads", type=int, default=20)
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument("--memory-seconds", type=float, default=300.0)
    output_options(parser)
    args = parser.parse_args()
    if (code := missing("web_console.py", "chromium", "chromedriver")) is not None:
        return code
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    return run(WebConsoleBench(args), args, table, (BenchError, OSError), say)


if __name__ == "__main__":
    sys.exit(main())
