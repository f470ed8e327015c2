"""The supervisor's state directory: what it runs and what it has yet to report.

    STATE_DIR/
    ├── lock              flock(2): one supervisor per state directory
    ├── current-job.json  the job it runs: {"job": JobStart, "state", "stage"}
    ├── ended.json        the final events of the last jobs that ended here
    ├── held.json         the ended job whose host is held: {"job": JobStart, "until"}
    └── journal/
        └── 0000000000000042.json   one unacknowledged job event each

Every file is written atomically (a temporary file, ``fsync``, ``rename``,
``fsync`` of the directory) with mode 0600. ``current-job.json`` holds the
``JobStart`` as the switchboard sent it, **secret parameter values included**:
a restarted supervisor (or driver) needs them to re-adopt the job; the
directory is the supervisor's own (``StateDirectory=`` with mode 0700 under
systemd) and nothing in it is ever logged.

A journal file is written before its event is sent and deleted when the
switchboard acknowledged it; the files' sequence numbers give the order.
``held.json`` is written before the held job's final event (a crash between the
two leaves the job current, which a restart re-adopts) and removed once the
hold is over; a restarted supervisor re-adopts the held host or ends the hold.

The methods here do blocking file I/O (and ``fsync``): the runner calls each
of them in a thread, one at a time and in order, never in the reactor thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from treadmill.common.files import fsync_directory, write_json

__all__ = ["ENDED_KEEP", "Loaded", "StateFiles", "StateLocked"]

CURRENT = "current-job.json"
ENDED = "ended.json"
HELD = "held.json"
JOURNAL = "journal"
LOCK = "lock"
ENDED_KEEP = 16  # final events remembered for stop_job/start_job of ended jobs


class StateLocked(RuntimeError):
    """Another process uses this state directory."""


@dataclass
class Loaded:
    """What a state directory held at start-up."""

    current: dict[str, Any] | None = None
    events: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    ended: list[dict[str, Any]] = field(default_factory=list)
    held: dict[str, Any] | None = None
    next_seq: int = 1


class StateFiles:
    """Blocking operations on one state directory."""

    log = Logger()

    def __init__(self, path: str, *, durable: bool = True):
        self.path = os.path.abspath(path)
        self.journal_dir = os.path.join(self.path, JOURNAL)
        self.durable = durable
        self._lock_fd: int | None = None

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> Loaded:
        """Create the directory if needed, lock it and read it."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        os.makedirs(self.journal_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateLocked(f"{self.path} is in use by another supervisor") from None
        self._lock_fd = fd
        loaded = Loaded()
        loaded.current = self._read_json(os.path.join(self.path, CURRENT))
        held = self._read_json(os.path.join(self.path, HELD))
        loaded.held = held if isinstance(held, dict) else None
        ended = self._read_json(os.path.join(self.path, ENDED))
        if isinstance(ended, dict) and isinstance(ended.get("jobs"), list):
            loaded.ended = [e for e in ended["jobs"] if isinstance(e, dict)]
        for name in sorted(os.listdir(self.journal_dir)):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.journal_dir, name))
                continue
            stem, _, ext = name.partition(".")
            if ext != "json" or not stem.isdigit():
                continue
            event = self._read_json(os.path.join(self.journal_dir, name))
            if isinstance(event, dict):
                loaded.events.append((int(stem), event))
        loaded.events.sort(key=lambda item: item[0])
        if loaded.events:
            loaded.next_seq = loaded.events[-1][0] + 1
        return loaded

    def close(self) -> None:
        """Release the lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # -- writes (each one call in the I/O thread) ------------------------------------

    def record(self, seq: int | None, event: dict[str, Any] | None, *,
               current: dict[str, Any] | None = None, clear_current: bool = False,
               ended: list[dict[str, Any]] | None = None, held: dict[str, Any] | None = None,
               clear_held: bool = False) -> None:
        """Record the hold (``held``, or remove it: ``clear_held``), journal ``event`` as
        ``seq``, then update the current job and the ended list.

        The order matters for a crash in between: a journaled ``terminated``
        event for the current job means the job is over, whatever the other
        files say; a hold is on disk before the event that ends its job.
        """
        if held is not None:
            write_json(os.path.join(self.path, HELD), held, self.durable)
        elif clear_held:
            self._unlink(os.path.join(self.path, HELD))
        if event is not None and seq is not None:
            write_json(self._event_path(seq), event, self.durable)
        if ended is not None:
            write_json(os.path.join(self.path, ENDED), {"jobs": ended}, self.durable)
        if current is not None:
            write_json(os.path.join(self.path, CURRENT), current, self.durable)
        elif clear_current:
            self._unlink(os.path.join(self.path, CURRENT))

    def remove_event(self, seq: int) -> None:
        """Forget an acknowledged event (a crash before this resends it: harmless)."""
        self._unlink(self._event_path(seq), sync=False)

    # -- helpers ---------------------------------------------------------------------

    def _event_path(self, seq: int) -> str:
        return os.path.join(self.journal_dir, f"{seq:016d}.json")

    def _read_json(self, path: str) -> Any:
        try:
            with open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            # Atomic writes make this unlikely; keep the file for a human to look at.
            self.log.error("Unreadable state file {path} ({error}); moved aside",
                           path=path, error=str(e))
            with contextlib.suppress(OSError):
                os.replace(path, path + ".corrupt")
            return None

    def _unlink(self, path: str, *, sync: bool = True) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        if sync:
            self._sync_dir(os.path.dirname(path))

    def _sync_dir(self, path: str) -> None:
        if self.durable:
            fsync_directory(path, strict=True)
