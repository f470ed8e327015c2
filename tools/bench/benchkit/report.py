"""Load generators and figures: wrk (run and parsed), percentiles, table cells."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchkit.cli import BenchError

# wrk's done() hook prints one machine-readable line; the text report is parsed too.
WRK_REPORT_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"connect":%.0f,"read":%.0f,' ..
    '"write":%.0f,"status":%.0f,"timeout":%.0f,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,' ..
    '"max_us":%.0f,"mean_us":%.3f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """The nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-pct * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def percentiles(values: Iterable[float], scale: float = 1000.0) -> dict[str, Any]:
    """count, p50, p90, p99, max (nearest rank), each multiplied by ``scale`` (s -> ms)."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}

    def rank(pct: float) -> float:
        return round(percentile(ordered, pct) * scale, 1)  # type: ignore[operator]

    return {"count": len(ordered), "p50": rank(50), "p90": rank(90), "p99": rank(99),
            "max": round(ordered[-1] * scale, 1)}


def cell(value: Any, spec: str = "") -> str:
    """``format(value, spec)``, or ``-`` as wide as ``spec`` for None."""
    if value is None:
        width = re.match(r"\d*", spec).group()  # type: ignore[union-attr]
        return "-".rjust(int(width or 0))
    return format(value, spec)


def wrk(url: str, lua: Path, duration: float, threads: int, connections: int,
        token: str | None) -> dict[str, Any]:
    """One closed-loop wrk run with ``lua`` (which reports through WRKJSON); its figures."""
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency",
           "--timeout", "10s", "-s", str(lua)]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=duration + 60,
                          check=False, start_new_session=True)
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()}")
    return parse_wrk(proc.stdout)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s and latency percentiles from wrk's report (and its done() line)."""
    result: dict[str, Any] = {}
    match = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if match:
        result["rps"] = float(match.group(1))
    for pct in ("50", "90", "99"):
        match = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", output, re.M)
        if match:
            result[f"p{pct}_ms"] = _ms(match.group(1))
    match = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", output, re.M)
    if match:
        result["max_ms"] = _ms(match.group(1))
    match = re.search(r"^\s+(\d+) requests in", output, re.M)
    if match:
        result["requests"] = int(match.group(1))
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["non_2xx"] = int(match.group(1)) if match else 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      output)
    result["socket_errors"] = sum(int(g) for g in match.groups()) if match else 0
    # The done() hook has exact figures; prefer them.
    match = re.search(r"^WRKJSON (\{.*\})$", output, re.M)
    if match:
        raw = json.loads(match.group(1))
        seconds = raw["duration_us"] / 1e6
        result.update({
            "requests": int(raw["requests"]),
            "rps": round(raw["requests"] / seconds, 2) if seconds else 0.0,
            "p50_ms": raw["p50_us"] / 1e3, "p90_ms": raw["p90_us"] / 1e3,
            "p99_ms": raw["p99_us"] / 1e3, "max_ms": raw["max_us"] / 1e3,
            "non_2xx": int(raw["status"]),
            "socket_errors": int(raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]),
        })
    if "rps" not in result:
        raise BenchError("could not parse wrk's output:\n" + output)
    result["ok_rps"] = round(result["rps"] * (1 - result["non_2xx"] / result["requests"]), 2) \
        if result.get("requests") else 0.0
    return result


def verdict_lines(verdicts: list[dict[str, Any]], width: int, server: bool = False
                  ) -> list[str]:
    """``met``/``MISSED`` lines of the targets, with their server (``server``)."""
    return [f"  {'met   ' if v['met'] else 'MISSED'}  "
            + (f"{v['server']:<31} " if server else "")
            + f"{v['target']:<{width}} measured {v['value']:g}" for v in verdicts]


def headline(title: str, results: dict[str, Any], extra: str = "", sep: str = ", ") -> str:
    """``TITLE: N cores (CPU), EXTRAPython V, revision R, started T``."""
    m = results["machine"]
    return (f"{title}: {m['nproc']} cores ({m['cpu_model']}), {extra}Python {m['python']}"
            f"{sep}revision {results.get('revision')}, started {results.get('started')}")
