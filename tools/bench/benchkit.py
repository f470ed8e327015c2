"""What every benchmark here reports about the machine and the checkout.

Imported by the scripts beside it (each is run as a script, so this folder is on
``sys.path``). Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["first_line", "host_info", "machine_ticks", "revision", "run"]


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


def run(bench: Any, args: Any, table: Any, errors: tuple[type[BaseException], ...],
        say: Any) -> int:
    """Run ``bench`` (``run()`` then always ``cleanup()``) and print its results.

    SIGTERM and Ctrl-C interrupt it (130) and ``errors`` fail it (1), cleaned up
    either way; the results go to ``args.json_out`` if set, and to standard output
    as JSON (``args.json``) or as ``table(results)``.
    """
    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    try:
        results = bench.run()
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    except errors as e:
        say(f"failed: {e}")
        return 1
    finally:
        bench.cleanup()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        print(table(results))
    return 0
