"""Process plumbing for ``tools/bench/supervisors.py``: start, stop and sample processes.

Standard library only. Everything here reads ``/proc`` (Linux): resident set
sizes (``VmRSS``, ``VmHWM``, ``Pss``) and CPU times (``utime + stime``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchkit import first_line, host_info

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- /proc ---------------------------------------------------------------------------


def status_kb(pid: int | None, field: str) -> int | None:
    """A ``kB`` field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``), or None."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (field 3 is index 0)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def cpu_ticks(pid: int | None) -> int | None:
    """utime + stime of ``pid`` in clock ticks."""
    if pid is None:
        return None
    fields = stat_fields(pid)
    return None if fields is None else int(fields[11]) + int(fields[12])


def tree(root_pid: int | None) -> list[int]:
    """``root_pid`` and its direct children (PostgreSQL's backends)."""
    if root_pid is None:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == root_pid:
            found.append(pid)
            continue
        fields = stat_fields(pid)
        if fields is not None and int(fields[1]) == root_pid:
            found.append(pid)
    return found


def tree_ticks(root_pid: int | None) -> dict[int, int]:
    out = {}
    for pid in tree(root_pid):
        ticks = cpu_ticks(pid)
        if ticks is not None:
            out[pid] = ticks
    return out


def ticks_delta(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds used between two :func:`tree_ticks` snapshots (exited processes lost)."""
    return sum(t - before.get(pid, 0) for pid, t in after.items()) / CLK_TCK


def pss_kb(pid: int) -> int | None:
    """Proportional set size (shared pages divided among their users)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def tree_memory_mb(root_pid: int | None) -> dict[str, float]:
    """Summed RSS (overcounts shared memory) and PSS of a process tree, in MB."""
    rss = pss = 0
    pids = tree(root_pid)
    for pid in pids:
        rss += status_kb(pid, "VmRSS") or 0
        pss += pss_kb(pid) or 0
    return {"processes": len(pids), "rss_mb": round(rss / 1024, 1),
            "pss_mb": round(pss / 1024, 1)}


def runq_wait_ns(pid: int | None) -> int | None:
    """Nanoseconds the main thread of ``pid`` was runnable but waited for a CPU."""
    if pid is None:
        return None
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None


def listen_overflows() -> dict[str, int]:
    """TcpExt ListenOverflows and ListenDrops of this network namespace (/proc/net/netstat)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {k: int(table.get(k, 0)) for k in ("ListenOverflows", "ListenDrops")}
    return {}


# -- sampling --------------------------------------------------------------------------


class Sampler:
    """Samples RSS and CPU time of named processes every ``interval`` seconds.

    ``targets`` maps a name to a function returning the current pid (or
    None): the switchboard's pid changes when the benchmark restarts it.
    """

    def __init__(self, targets: dict[str, Callable[[], int | None]], interval: float = 0.25):
        self.targets = targets
        self.interval = interval
        self.samples: list[tuple[float, dict[str, tuple[int, int, int, int, int] | None]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def sample(self) -> None:
        now = time.time()
        row: dict[str, tuple[int, int, int, int, int] | None] = {}
        for name, pid_of in self.targets.items():
            pid = pid_of()
            ticks = cpu_ticks(pid)
            rss = status_kb(pid, "VmRSS")
            hwm = status_kb(pid, "VmHWM")
            runq = runq_wait_ns(pid)
            row[name] = None if pid is None or ticks is None or rss is None else (
                pid, ticks, rss, hwm or rss, runq or 0)
        with self._lock:
            self.samples.append((now, row))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def window(self, name: str, t0: float, t1: float) -> dict[str, Any]:
        """CPU seconds, CPU share, peak RSS and VmHWM of ``name`` between t0 and t1.

        CPU time is summed per pid (a restart inside the window starts a new
        segment); the CPU time a killed process used after its last sample is lost.
        """
        with self._lock:
            rows = [(t, r[name]) for t, r in self.samples if t0 <= t <= t1 and r.get(name)]
        if not rows:
            return {"cpu_s": None, "cpu_pct": None, "runq_pct": None, "rss_peak_mb": None,
                    "hwm_mb": None, "rss_end_mb": None}
        first: dict[int, tuple[int, int]] = {}
        last: dict[int, tuple[int, int]] = {}
        for _, (pid, ticks, _, _, runq) in rows:  # type: ignore[misc]
            first.setdefault(pid, (ticks, runq))
            last[pid] = (ticks, runq)
        cpu = sum(last[pid][0] - first[pid][0] for pid in last) / CLK_TCK
        runq = sum(last[pid][1] - first[pid][1] for pid in last) / 1e9
        wall = rows[-1][0] - rows[0][0]
        return {
            "cpu_s": round(cpu, 2),
            "cpu_pct": round(100 * cpu / wall, 1) if wall > 0 else None,
            # Share of the time the main (reactor) thread was ready to run but had no CPU.
            "runq_pct": round(100 * runq / wall, 1) if wall > 0 else None,
            "rss_peak_mb": round(max(s[2] for _, s in rows) / 1024, 1),  # type: ignore[index]
            "hwm_mb": round(max(s[3] for _, s in rows) / 1024, 1),  # type: ignore[index]
            "rss_end_mb": round(rows[-1][1][2] / 1024, 1),  # type: ignore[index]
        }

    def series(self, name: str, t0: float, t1: float, every: float = 1.0
               ) -> list[tuple[float, float, float]]:
        """(seconds since t0, RSS MB, CPU % since the previous point) about every ``every`` s."""
        with self._lock:
            rows = [(t, r[name]) for t, r in self.samples if t0 <= t <= t1 and r.get(name)]
        out: list[tuple[float, float, float]] = []
        prev: tuple[float, int, int] | None = None
        for t, s in rows:
            pid, ticks, rss, _, _ = s  # type: ignore[misc]
            if prev is not None and t - prev[0] < every:
                continue
            pct = 0.0
            if prev is not None and prev[1] == pid and t > prev[0]:
                pct = 100 * (ticks - prev[2]) / CLK_TCK / (t - prev[0])
            out.append((round(t - t0, 2), round(rss / 1024, 1), round(pct, 1)))
            prev = (t, pid, ticks)
        return out


# -- processes -------------------------------------------------------------------------


def raise_nofile() -> None:
    """preexec_fn: raise the soft RLIMIT_NOFILE of the child to its hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def nofile_limits() -> dict[str, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft": soft, "hard": hard}


def spawn(cmd: list[str], log: Path, *, cwd: Path, env: dict[str, str] | None = None,
          stdout_pipe: bool = False) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session, with a raised fd limit, output to ``log``."""
    out = subprocess.PIPE if stdout_pipe else log.open("ab")
    err = log.with_suffix(".err").open("ab") if stdout_pipe else subprocess.STDOUT
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=err, start_new_session=True, preexec_fn=raise_nofile)


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
                 timeout: float = 30.0) -> float | None:
    """Signal ``proc`` and wait for it (SIGKILL after ``timeout``); seconds it took."""
    if proc is None or proc.poll() is not None:
        return None
    start = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)
    return time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- the machine -------------------------------------------------------------------------


def machine_info(postgres_bin: Path | None) -> dict[str, Any]:
    somaxconn = None
    with contextlib.suppress(OSError, ValueError):
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    return {
        **host_info(),
        "postgresql": first_line([str(postgres_bin), "--version"]) if postgres_bin
        else "unknown",
        "somaxconn": somaxconn,
        "nofile": nofile_limits(),
    }
