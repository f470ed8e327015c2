"""Processes seen through ``/proc`` (Linux): memory, CPU time, run-queue wait; samplers.

Resident set sizes (``VmRSS``, ``VmHWM``, ``Pss``) are in kB, CPU times
(``utime + stime``) in clock ticks unless a name says otherwise.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchkit.host import machine_ticks

CLK_TCK = os.sysconf("SC_CLK_TCK")
KB_MB = 1 / 1024


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


def descendants(roots: list[int]) -> list[int]:
    """``roots`` (those alive) and all their descendants."""
    parents: dict[int, list[int]] = {}
    alive = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None:
                alive.add(int(entry))
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [r for r in roots if r in alive]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(parents.get(pid, ()))
    return found


def total_ticks(pids: list[int]) -> int:
    """utime + stime of ``pids``, with those of their reaped children (``cutime``)."""
    total = 0
    for pid in pids:
        fields = stat_fields(pid)
        if fields is not None:
            total += sum(int(x) for x in fields[11:15])
    return total


def reset_hwm(pid: int) -> bool:
    """Reset the peak RSS (VmHWM) of ``pid`` to its current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def thread_ticks(pid: int) -> tuple[int, int]:
    """CPU ticks of the main (reactor) thread of ``pid``, and of all its other threads."""
    main = other = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2:].split()
            ticks = int(fields[11]) + int(fields[12])
            if int(tid) == pid:
                main += ticks
            else:
                other += ticks
    return main, other


def rusage_cpu(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU seconds of this process (or its reaped children)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


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


class Monitor:
    """Samples a server's CPU time (and memory), and PostgreSQL's CPU time, through a phase.

    The server's CPU time includes its direct children (nginx's worker); its
    memory and run-queue wait are those of the process itself (the
    switchboard's reactor thread).
    """

    def __init__(self, pid: int, postmaster: int | None, memory: bool = True,
                 interval: float = 0.1):
        self.pid = pid
        self.postmaster = postmaster
        self.memory = memory
        self.interval = interval
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._start: dict[str, Any] = {}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = status_kb(self.pid, "VmRSS")
            if rss is not None:
                with self._lock:
                    self._peak = max(self._peak, rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def begin(self) -> None:
        with self._lock:
            self._peak = status_kb(self.pid, "VmRSS") or 0
        self._start = {
            "time": time.monotonic(),
            "server": tree_ticks(self.pid),
            "runq": runq_wait_ns(self.pid) or 0,
            "machine": machine_ticks(),
            "pg": tree_ticks(self.postmaster) if self.postmaster else {},
            "children": resource.getrusage(resource.RUSAGE_CHILDREN),
        }

    def end(self) -> dict[str, Any]:
        wall = time.monotonic() - self._start["time"]
        delta = ticks_delta
        server_cpu = delta(self._start["server"], tree_ticks(self.pid))
        runq = ((runq_wait_ns(self.pid) or 0) - self._start["runq"]) / 1e9
        pg_cpu = delta(self._start["pg"], tree_ticks(self.postmaster)) \
            if self.postmaster else 0.0
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = self._start["children"]
        # The load generator is the only child of ours reaped during a phase.
        loadgen = children.ru_utime + children.ru_stime - start.ru_utime - start.ru_stime
        busy, total = machine_ticks()
        busy0, total0 = self._start["machine"]
        machine = (busy - busy0) / (total - total0) if total > total0 else None
        other = None
        if machine is not None:
            cores = len(os.sched_getaffinity(0))
            other = max(0.0, machine - (server_cpu + pg_cpu + loadgen) / (cores * wall))
        result: dict[str, Any] = {
            "wall_s": round(wall, 3),
            "server_cpu_s": round(server_cpu, 3),
            # Time the server's main (reactor) thread was ready to run but no core was free.
            "server_runq_wait_s": round(runq, 3),
            "postgres_cpu_s": round(pg_cpu, 3) if self.postmaster else None,
            "loadgen_cpu_s": round(loadgen, 3),
            # Share of all the machine's cores that were busy (any process).
            "machine_cpu_busy": None if machine is None else round(machine, 3),
            # Share of the cores used by anything but the server, PostgreSQL and the
            # load generator (other work on the machine): it skews the figures.
            "other_cpu_busy": None if other is None else round(other, 3),
        }
        if self.memory:
            rss = status_kb(self.pid, "VmRSS") or 0
            with self._lock:
                peak = max(self._peak, rss)
            result.update({
                "rss_mb_end": round(rss * KB_MB, 1),
                "rss_mb_peak": round(peak * KB_MB, 1),
                "hwm_mb": round((status_kb(self.pid, "VmHWM") or 0) * KB_MB, 1),
            })
        return result
