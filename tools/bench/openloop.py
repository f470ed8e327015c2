#!/usr/bin/env python3
"""An open-loop, fixed-rate HTTP/1.1 load generator (standard library only).

    python tools/bench/openloop.py --url http://127.0.0.1:8080/api/v1/jobs/ID \
        --rate 500 --duration 10 [--connections 16] [--method POST --body '{...}'] \
        [-H 'Authorization: Bearer ...']

What it starts, measures and prints, and its options: ``tools/bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

from benchkit.procs import BadResponse, read_response
from benchkit.report import percentile


async def generate(host: str, port: int, request: bytes, rate: float, duration: float,
                   connections: int, timeout: float, drain: float) -> dict:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    lags: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    in_flight = [0]
    last_done = [0.0]

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def worker(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
        while True:
            due = await queue.get()
            if due is None:
                break
            lags.append(loop.time() - due)
            in_flight[0] += 1
            try:
                if conn is None:
                    conn = await connect()
                reader, writer = conn
                writer.write(request)
                status, _, _, keep = await asyncio.wait_for(read_response(reader), timeout)
                now = loop.time()
                last_done[0] = now
                latencies.append(now - due)
                statuses[status] += 1
                if not keep:
                    writer.close()
                    conn = None
            except (TimeoutError, OSError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, BadResponse, ValueError) as e:
                errors[type(e).__name__] += 1
                if conn is not None:
                    conn[1].close()
                conn = None
            finally:
                in_flight[0] -= 1
        if conn is not None:
            conn[1].close()

    # Open every connection before the clock starts, so connects are not measured.
    conns = []
    for _ in range(connections):
        try:
            conns.append(await connect())
        except (TimeoutError, OSError) as e:
            errors[f"connect:{type(e).__name__}"] += 1
            conns.append(None)
    workers = [asyncio.ensure_future(worker(c)) for c in conns]

    total = int(rate * duration)
    t0 = loop.time() + 0.01
    sent = 0
    while sent < total:
        now = loop.time()
        while sent < total and t0 + sent / rate <= now:
            queue.put_nowait(t0 + sent / rate)
            sent += 1
        if sent < total:
            await asyncio.sleep(max(0.0, t0 + sent / rate - loop.time()))
    for _ in workers:
        queue.put_nowait(None)
    end_of_schedule = loop.time()
    _, pending = await asyncio.wait(workers, timeout=drain)
    unfinished = queue.qsize() - len(pending) + in_flight[0]  # queued (less sentinels) + running
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)

    latencies.sort()
    lags.sort()
    ok = sum(n for status, n in statuses.items() if 200 <= status < 300)
    window = max(end_of_schedule, last_done[0]) - t0
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    return {
        "rate_target": rate,
        "duration": duration,
        "connections": connections,
        "scheduled": total,
        "completed": len(latencies),
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": dict(errors),
        "unfinished": max(0, unfinished),
        "window_s": round(window, 3),
        "rate_achieved": round(ok / window, 2) if window > 0 else 0.0,
        "latency_ms": {
            "p50": ms(percentile(latencies, 50)),
            "p90": ms(percentile(latencies, 90)),
            "p99": ms(percentile(latencies, 99)),
            "p999": ms(percentile(latencies, 99.9)),
            "max": ms(latencies[-1] if latencies else None),
        },
        # How late the generator itself handed requests to a connection: if this
        # is large, the generator (not the server) was the bottleneck.
        "dispatch_lag_ms": {"p99": ms(percentile(lags, 99)),
                            "max": ms(lags[-1] if lags else None)},
    }


def build_request(method: str, path: str, host: str, headers: list[str], body: bytes | None
                  ) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    names = set()
    for header in headers:
        name, _, value = header.partition(":")
        names.add(name.strip().lower())
        lines.append(f"{name.strip()}: {value.strip()}")
    if body is not None:
        if "content-type" not in names:
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of scheduling")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", help="request body (sent with Content-Length)")
    parser.add_argument("-H", "--header", action="append", default=[])
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    parser.add_argument("--drain", type=float, default=10.0,
                        help="seconds to wait for outstanding requests at the end")
    args = parser.parse_args(argv)
    url = urlsplit(args.url)
    if url.scheme != "http" or not url.hostname:
        parser.error("--url must be http://HOST:PORT/PATH")
    try:
        loopback = ipaddress.ip_address(url.hostname).is_loopback
    except ValueError:
        loopback = url.hostname == "localhost"
    if not loopback:
        parser.error("--url must name a loopback address")
    if not (0 < args.rate <= 100000 and 0 < args.duration <= 600):
        parser.error("--rate must be in (0, 100000] and --duration in (0, 600]")
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    port = url.port or 80
    request = build_request(args.method, path, f"{url.hostname}:{port}", args.header,
                            args.body.encode() if args.body is not None else None)
    started = time.time()
    result = asyncio.run(generate(url.hostname, port, request, args.rate, args.duration,
                                  args.connections, args.timeout, args.drain))
    result["started"] = started
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
