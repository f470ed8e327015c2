"""The machine and the checkout: versions, CPUs, how busy the machine is, the revision."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def first_line(cmd: list[str]) -> str:
    """The first line ``cmd`` prints (a ``--version``), ``absent`` if it cannot run."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    out = (proc.stdout or proc.stderr).strip().splitlines()
    return out[0] if out else "unknown"


def revision(root: Path, paths: tuple[str, ...] = ("treadmill", "twisted")) -> str:
    """The checked-out commit, with ``+dirty`` if ``paths`` have local changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def host_info() -> dict[str, Any]:
    """CPUs usable, CPU model, memory, kernel and Python of this machine."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "memory_gib": mem_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def busy_share(seconds: float) -> float:
    """The share of the machine's cores busy with anything over the next ``seconds``."""
    busy0, total0 = machine_ticks()
    time.sleep(seconds)
    busy1, total1 = machine_ticks()
    return (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0


def ambient(say: Callable[[str], None]) -> float:
    """How busy the machine is (2 s) before a benchmark starts; a warning above 10 %."""
    share = busy_share(2)
    if share > 0.1:
        say(f"warning: the machine was {share:.0%} busy before the benchmark started; "
            "other load skews the figures")
    return share


def wait_quiet(max_busy: float, seconds: float, timeout: float,
               say: Callable[[str], None]) -> float:
    """Wait (at most ``timeout`` s) until the machine was at most ``max_busy`` busy for
    ``seconds``; the last window's busy share."""
    deadline = time.monotonic() + timeout
    while True:
        share = busy_share(seconds)
        if share <= max_busy or time.monotonic() >= deadline:
            return share
        say(f"the machine is {share:.0%} busy; waiting for it to quiet down "
            f"({deadline - time.monotonic():.0f} s left)")


def quiet_wait_option(parser: Any, max_busy: float) -> None:
    """``--quiet-wait S``: how long :func:`wait_quiet` may wait for the machine to be at
    most ``max_busy`` busy before the benchmark starts (0: start at once)."""
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                        help=f"wait up to S seconds for the machine to be at most "
                             f"{round(max_busy * 100)}%% busy before starting [0]")


def stamp(results: dict[str, Any], machine: dict[str, Any], parameters: dict[str, Any],
          root: Path) -> None:
    """Record the machine, the parameters, the start time and the revision of a run."""
    results["machine"] = machine
    results["parameters"] = parameters
    results["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["revision"] = revision(root)
