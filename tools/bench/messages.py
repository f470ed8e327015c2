#!/usr/bin/env python3
"""Benchmark: ``treadmill.common.messages.check`` per message type, jsonschema vs compiled.

    .venv/bin/python tools/bench/messages.py [--rounds 5] [--seconds 0.2] [--json]

For one built message of each type of both protocols (and a few invalid ones), the
time of one ``check`` (as ``supervisor.validate`` and ``proxy.validate`` call it:
``check`` of the per-type part) with the compiled predicate
(``treadmill.common.schemacheck``) and with jsonschema alone (the predicate turned
off), the two interleaved round by round; the median over the rounds, in us per
message. In process, no daemons. What it prints: ``tools/bench/README.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from benchkit.cli import bench_parser, options, output_options, run, sayer
from benchkit.host import busy_share, host_info, stamp
from benchkit.procs import ROOT

from treadmill.common import messages
from treadmill.protocol import proxy, supervisor

say = sayer("messages")
JOB = str(uuid.uuid4())
CONN = "k" * 24


def _samples() -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, protocol module, message): one valid message per type, then invalid ones."""
    sv, px = supervisor, proxy
    start = {"id": JOB, "image": {"digest": "sha256:" + "c" * 64, "name": "img",
                                  "stores": ["http://store:5000"]},
             "parameters": {"P": {"value": "v", "secret": True}}, "timeout": 600.0,
             "log_servers": [{"url": "http://logs:8300", "token": "x" * 300}]}
    ours = [
        sv.start_job(9, start), sv.stop_job(9, JOB, "execution_timeout"),
        sv.status_request(9), sv.status(9, {"id": JOB, "state": "ready", "stage": None}),
        sv.job_event(9, JOB, "terminated", reason="workload_exited", exit_status=0),
        sv.job_endpoints(9, JOB, [{"service": "ssh", "proxy": "http://p:1"}]),
        sv.snapshot_job(9, JOB, JOB, "bob/disk", "http://store:5000"),
        sv.snapshot_result(9, JOB, JOB, digest="sha256:" + "d" * 64),
        sv.console_event(9, JOB, event="closed", conn_id=CONN, service="console", user="bob",
                         access="read", peer="192.0.2.9", at=1765000001.0),
        sv.renew_tokens(9, JOB, 900.0), sv.ack(9), sv.protocol_error("violation", "x"),
    ]
    theirs = [
        px.welcome("job-9", 40001, True, "proxy.example", 10.0, []),
        px.publish(9, "web"), px.published(9, "web", "proxy.example", tcp_port=40002),
        px.unpublish(9, "web"), px.unpublished(9, "web"), px.connect(CONN, "web"),
        px.connect_failed(CONN, "no"), px.error(9, "internal_error", "oops"),
        px.protocol_error("x"),
        px.console("closed", CONN, "web", "bob", "read", "192.0.2.9", 1765000001.0),
    ]
    event = ours[4]
    return [*((m["type"], sv, m) for m in ours),
            *((f"proxy {m['type']}", px, m) for m in theirs),
            ("job_event, invalid state", sv, {**event, "state": "exploded"}),
            ("job_event, unknown key", sv, {**event, "extra": 1}),
            ("proxy publish, bad service", px, {**theirs[1], "service": "-web"})]


def _per_message(call: Callable[[], None], seconds: float) -> float:
    """Seconds per ``call`` over about ``seconds`` of calls."""
    n, spent = 1, 0.0
    while spent < seconds / 10:
        n *= 2
        begin = time.perf_counter()
        for _ in range(n):
            call()
        spent = time.perf_counter() - begin
    count = max(1, int(n * seconds / spent))
    begin = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - begin) / count


def _checker(protocol: Any, message: dict[str, Any]) -> Callable[[], None]:
    def check() -> None:
        try:
            protocol.validate(message)
        except protocol.ProtocolError:
            pass
    return check


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.results: dict[str, Any] = {}

    def run(self) -> dict[str, Any]:
        stamp(self.results, host_info(), vars(self.args).copy(), ROOT)
        self.results["busy_before"] = round(busy_share(2), 3)
        self.results["loadavg_before"] = open("/proc/loadavg").read().split()[:3]
        fast = messages.compiled
        samples = _samples()
        times: dict[str, dict[str, list[float]]] = {
            name: {"jsonschema": [], "compiled": []} for name, _, _ in samples}
        for round_ in range(self.args.rounds):
            say(f"round {round_ + 1} of {self.args.rounds}")
            for name, protocol, message in samples:
                for mode in (("jsonschema", "compiled") if round_ % 2 == 0
                             else ("compiled", "jsonschema")):
                    messages.compiled = fast if mode == "compiled" else (lambda schema: None)
                    try:
                        spent = _per_message(_checker(protocol, message), self.args.seconds)
                    finally:
                        messages.compiled = fast
                    times[name][mode].append(spent * 1e6)
        self.results["us_per_message"] = {
            name: {mode: round(statistics.median(values), 2) for mode, values in modes.items()}
            for name, modes in times.items()}
        self.results["busy_after"] = round(busy_share(2), 3)
        return self.results

    def cleanup(self) -> None:
        """Nothing to stop: the benchmark runs in this process."""


def table(results: dict[str, Any]) -> str:
    lines = [f"{'message':<28} {'jsonschema us':>14} {'compiled us':>12} {'ratio':>7}"]
    for name, modes in results["us_per_message"].items():
        ratio = modes["jsonschema"] / modes["compiled"] if modes["compiled"] else 0
        lines.append(f"{name:<28} {modes['jsonschema']:>14.2f} {modes['compiled']:>12.2f} "
                     f"{ratio:>6.1f}x")
    lines.append(f"machine busy {results['busy_before']:.0%} before, "
                 f"{results['busy_after']:.0%} after; load {' '.join(results['loadavg_before'])}"
                 f"; {results['machine']['nproc']} CPUs ({results['machine']['cpu_model']}), "
                 f"Python {results['machine']['python']}, {results['revision']}")
    return "\n".join(lines)


def main() -> int:
    parser = bench_parser("messages.py", __doc__ or "", "")
    options(parser, (
        ("--rounds", int, 5, "rounds, each timing every message both ways [5]"),
        ("--seconds", float, 0.2, "seconds of calls per message, mode and round [0.2]"),
    ))
    output_options(parser)
    args = parser.parse_args()
    return run(Bench(args), args, table, (), say)


if __name__ == "__main__":
    raise SystemExit(main())
