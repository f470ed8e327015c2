"""The switchboard API as the fleet benchmarks use it (standard library only).

A thread-safe client with one keep-alive HTTP/1.1 connection per thread, bulk
enqueue over several threads, a paced (open-loop) enqueuer, job listing with
pagination, and job events. Only loopback URLs are accepted.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import queue
import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

from benchkit.report import percentiles

ACTIVE_STATES = ("queued", "assigned", "initializing", "ready", "terminating")


class APIError(RuntimeError):
    pass


def metric(port: int, name: str) -> float:
    """An unlabelled Prometheus sample from ``/metrics`` on a loopback port (0 if none)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, flags=re.M)
    return float(found.group(1)) if found else 0.0


def epoch(stamp: str | None) -> float | None:
    """An RFC 3339 time of the API as seconds since the epoch."""
    if not stamp:
        return None
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class Client:
    """One keep-alive connection per calling thread."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected http://HOST:PORT, got {base_url!r}")
        if not ipaddress.ip_address(parts.hostname).is_loopback:
            raise ValueError("only loopback addresses are allowed")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.token = token
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
            self._local.used = False
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def request(self, method: str, path: str, body: Any = None,
                retries: int | None = None) -> tuple[int, Any]:
        """(status, parsed JSON body). GETs are retried; a POST only on a stale connection."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        attempts = (retries if retries is not None else (2 if method == "GET" else 0)) + 1
        for attempt in range(attempts + 1):
            conn = self._connection()
            reused = self._local.used
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                raw = response.read()
                self._local.used = True
                if response.will_close:
                    self._drop()
                try:
                    parsed = json.loads(raw) if raw else None
                except ValueError:
                    parsed = raw.decode("utf-8", "replace")
                return response.status, parsed
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as e:
                self._drop()
                # A keep-alive connection the server had closed: the request never
                # reached it, so even a POST may be sent again once.
                if reused and attempt == 0:
                    continue
                if attempt + 1 >= attempts:
                    raise APIError(f"{method} {path}: {type(e).__name__}: {e}") from e
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                if attempt + 1 >= attempts:
                    raise APIError(f"{method} {path}: {type(e).__name__}: {e}") from e
                time.sleep(0.2)
        raise APIError(f"{method} {path}: no answer")

    def get(self, path: str, **query: Any) -> Any:
        if query:
            path += "?" + urlencode(query, doseq=True)
        status, body = self.request("GET", path)
        if status != 200:
            raise APIError(f"GET {path} answered {status}: {str(body)[:300]}")
        return body

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


# -- jobs ------------------------------------------------------------------------------


def job_body(label: str, tags: list[str], image: str, run_time: float | None = None
             ) -> dict[str, Any]:
    body: dict[str, Any] = {"image": image, "tags": tags, "label": label}
    if run_time is not None:
        body["parameters"] = {"mock.run_time": {"value": f"{run_time:g}"}}
    return body


def enqueue_many(client: Client, body: dict[str, Any] | Callable[[int, int, float], dict],
                 count: int, concurrency: int = 8) -> dict[str, Any]:
    """Enqueue ``count`` jobs as fast as ``concurrency`` connections allow.

    ``body`` is the request body, or a function of (index, jobs enqueued so
    far, seconds elapsed) that returns it.
    """
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    done = [0]
    start = time.time()

    def one(i: int) -> None:
        with lock:
            progress = done[0]
        payload = body(i, progress, time.time() - start) if callable(body) else body
        try:
            status, _ = client.request("POST", "/api/v1/jobs", payload)
            key = str(status)
        except APIError as e:
            key = type(e.__cause__).__name__ if e.__cause__ else "error"
        with lock:
            statuses[key] += 1
            done[0] += 1

    with ThreadPoolExecutor(concurrency, thread_name_prefix="enqueue") as pool:
        list(pool.map(one, range(count)))
    elapsed = time.time() - start
    ok = statuses.get("201", 0)
    return {"count": count, "ok": ok, "statuses": dict(statuses), "started": start,
            "elapsed_s": round(elapsed, 3), "rate": round(ok / elapsed, 1) if elapsed else None}


class PacedEnqueuer:
    """Enqueues ``body`` at a fixed rate (open loop) on a few threads until stopped."""

    def __init__(self, client: Client, body: dict[str, Any], rate: float, workers: int = 4):
        self.client = client
        self.body = body
        self.rate = rate
        self.workers = workers
        self.statuses: Counter[str] = Counter()
        self.latencies: list[float] = []
        self._queue: queue.Queue[float | None] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._schedule, name="pace", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"pace-{i}", daemon=True)
                          for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def _schedule(self) -> None:
        t0 = time.monotonic()
        i = 0
        while not self._stop.is_set():
            due = t0 + i / self.rate
            delay = due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            self._queue.put(due)
            i += 1
        for _ in range(self.workers):
            self._queue.put(None)

    def _work(self) -> None:
        while True:
            due = self._queue.get()
            if due is None:
                return
            try:
                status, _ = self.client.request("POST", "/api/v1/jobs", self.body)
                key = str(status)
            except APIError as e:
                key = type(e.__cause__).__name__ if e.__cause__ else "error"
            with self._lock:
                self.statuses[key] += 1
                self.latencies.append(time.monotonic() - due)

    def stop(self, timeout: float = 15.0) -> dict[str, Any]:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return {"statuses": dict(self.statuses),
                    "latency_ms": percentiles(self.latencies)}


def list_jobs(client: Client, *, since: float | None = None,
              states: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Jobs (newest first), all pages; stop at jobs created before ``since`` (epoch)."""
    out: list[dict[str, Any]] = []
    query: dict[str, Any] = {"limit": 500}
    states = list(states)
    if states:
        query["state"] = ",".join(states)
    while True:
        page = client.get("/api/v1/jobs", **query)
        jobs = page.get("jobs", [])
        for job in jobs:
            if since is not None and (epoch(job["created_at"]) or 0) < since:
                return out
            out.append(job)
        cursor = page.get("next_cursor")
        if not cursor or not jobs:
            return out
        query["cursor"] = cursor


def job_events(client: Client, job_ids: list[str], concurrency: int = 8
               ) -> dict[str, list[dict[str, Any]]]:
    def one(job_id: str) -> tuple[str, list[dict[str, Any]]]:
        events: list[dict[str, Any]] = []
        after = 0
        while True:
            page = client.get(f"/api/v1/jobs/{job_id}/events", after=after)["events"]
            events += page
            if len(page) < 1000:
                return job_id, events
            after = page[-1]["seq"]

    with ThreadPoolExecutor(concurrency, thread_name_prefix="events") as pool:
        return dict(pool.map(one, job_ids))


def hosts(client: Client) -> list[dict[str, Any]]:
    return client.get("/api/v1/hosts")["hosts"]
