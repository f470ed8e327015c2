"""Shipping a job's log streams to its log servers: the supervisor's side.

A :class:`LogShipper` takes the bytes of a job's streams (``console``, the
supervisor's ``events``, any other) and delivers every one of them, once and
in order, to **every** log server the job names, across log server outages
and supervisor restarts:

1. :meth:`LogShipper.append` puts the bytes in a bounded spool on local disk
   first (append-only segment files, ``fdatasync``-ed, in a thread), so that
   only bytes that survive a crash are ever sent.
2. One loop per server sends the spooled bytes at that server's cursor
   (``POST /v1/jobs/{job}/streams/{stream}?offset=CURSOR``, at most
   ``chunk`` bytes at a time, one request at a time, over a keep-alive
   connection). The cursor advances only when the server acknowledged,
   which it does once the bytes are durable on its disk.
3. A server that answers ``gap`` with its length (it has fewer bytes than the
   cursor said: it lost some) gets them again from that length, if the spool
   still holds them. Retried bytes it already has are accepted as they are
   (the server compares them), so a repeat never duplicates anything.
4. Failures (connection refused, timeouts, 5xx, a refused token) are retried
   with capped exponential backoff and jitter, per server; one server being
   down never holds the others back, but it holds the spool: spool segments
   are deleted only once every server acknowledged them.
5. :meth:`LogShipper.close` closes every stream on every server once all its
   bytes are there (readers that follow it then end), and then deletes the
   job's spool.

Restarts: the cursors are saved at most every ``save_interval`` seconds (and
at :meth:`stop` and :meth:`close`); a shipper rebuilt from the state directory
(:meth:`LogShipper.resume`) sends again from the saved cursors, or from the
start of the spool if that is later. The servers accept the repeated bytes.

The spool is bounded: ``pending_bytes``, the bytes not yet acknowledged by
every server, never exceeds ``spool_limit``. When an append does not fit, its
bytes are **refused**: ``append`` returns False, :attr:`spool_full` is set,
``on_spool_full(shipper, stream, refused_bytes)`` is called and an error is
logged, once per episode and stream, and the refused bytes are counted. When
an append to that stream fits again, a marker line saying how many bytes were
dropped is put in the stream first (``console`` and other text streams; never
in ``events``), so a reader sees the hole. The ``events`` stream has a reserve
of its own (``reserve`` bytes of the limit that only it may use), so job
events keep flowing while console output is being refused.

State directory layout (the supervisor's, mode 0700)::

    STATE_DIR/logs/<job id>/
    ├── job.json         {"job_id", "servers": [{"url", "token"}]}: tokens are secrets
    ├── cursors.json     per server: acknowledged length, closed and failed streams;
    │                    per stream: whether it is being closed
    └── spool/<stream>/<first offset, 20 digits>.seg

One shipper per job and state directory at a time (the supervisor's lock on
its state directory covers this).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import treq
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from treadmill.common.files import fsync_directory, write_file, write_json
from treadmill.protocol import logs
from treadmill.protocol.logs import is_stream

__all__ = ["LOGS_DIR", "LogShipper"]

LOGS_DIR = "logs"
JOB_FILE = "job.json"
CURSORS_FILE = "cursors.json"
SPOOL_DIR = "spool"
EVENTS = "events"
FINAL_STREAMS = ("console", EVENTS)
MARKER = ("\r\n[treadmill: {count} bytes of output were dropped here: the supervisor's "
          "log spool was full]\r\n")


class _Retry(Exception):
    """A request failed in a way that may pass: try again after a backoff."""


class _Stream:
    """One stream's spool, as the reactor sees it."""

    __slots__ = ("base", "buffer", "closing", "flushing", "name", "produced", "refused",
                 "segments", "spooled", "tail", "tail_start")

    def __init__(self, name: str):
        self.name = name
        self.produced = 0  # bytes accepted by append (spooled or in the buffer)
        self.spooled = 0  # bytes durable in the spool; only these are sent
        self.base = 0  # the first byte still in the spool
        self.segments: list[list[int]] = []  # [first offset, size], in order
        self.buffer = bytearray()  # accepted, not yet spooled
        self.flushing = False
        self.closing = False
        self.refused = 0  # bytes refused since the last marker
        self.tail = bytearray()  # the last spooled bytes, kept in memory for sending
        self.tail_start = 0

    @property
    def settled(self) -> bool:
        """Every accepted byte is in the spool."""
        return not self.buffer and not self.flushing


class _Server:
    """One log server: where to send, and what it acknowledged."""

    def __init__(self, url: str, token: str, chunk: int):
        self.url = url.rstrip("/")
        self.token = token
        self.chunk = chunk
        self.cursors: dict[str, int] = {}
        self.closed: set[str] = set()
        self.failed: dict[str, str] = {}
        self.attempts = 0
        self.last_error: str | None = None
        self.loop: Deferred[None] | None = None
        self.wake: Deferred[None] | None = None
        self.sleep: Deferred[None] | None = None
        self.request: Deferred[Any] | None = None
        self.removed = False
        self.progress_at = 0.0  # when it last acknowledged, or was caught up (metrics)

    def live(self, name: str) -> bool:
        return name not in self.failed

    def cursor(self, name: str) -> int:
        return self.cursors.get(name, 0)


# -- blocking file operations (run in a thread, one at a time) ---------------------------


def _read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            os.replace(path, path + ".corrupt")
        return None


def _segment_path(directory: str, name: str, start: int) -> str:
    return os.path.join(directory, SPOOL_DIR, name, f"{start:020d}.seg")


def _spool_write(directory: str, name: str, start: int, data: bytes, durable: bool) -> None:
    path = _segment_path(directory, name, start)
    new = not os.path.exists(path)
    if new:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    write_file(path, data, flags=os.O_APPEND, sync=os.fdatasync if durable else None)
    if new and durable:
        fsync_directory(os.path.dirname(path), strict=True)


def _spool_read(directory: str, name: str, start: int, offset: int, size: int) -> bytes:
    with open(_segment_path(directory, name, start), "rb", buffering=0) as f:
        return os.pread(f.fileno(), size, offset - start)


def _spool_drop(directory: str, name: str, starts: list[int]) -> None:
    for start in starts:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_segment_path(directory, name, start))


def _load(directory: str) -> dict[str, Any]:
    """What a job's shipping directory holds (blocking, small)."""
    found: dict[str, Any] = {"job": _read_json(os.path.join(directory, JOB_FILE)),
                             "cursors": _read_json(os.path.join(directory, CURSORS_FILE)),
                             "segments": {}}
    spool = os.path.join(directory, SPOOL_DIR)
    if os.path.isdir(spool):
        for name in sorted(os.listdir(spool)):
            if not is_stream(name):
                continue
            segments = []
            for entry in os.scandir(os.path.join(spool, name)):
                stem, _, ext = entry.name.partition(".")
                if ext == "seg" and stem.isdigit():
                    segments.append([int(stem), entry.stat().st_size])
                elif entry.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
            segments.sort()
            found["segments"][name] = segments
    return found


# -- the shipper -------------------------------------------------------------------------


class LogShipper:
    """Spools and ships one job's log streams to every one of its log servers.

    :param state_dir: the supervisor's state directory (the spool goes in
        ``logs/<job_id>/`` under it).
    :param servers: ``[{"url": "https://logs.example", "token": JWT}]``, as the
        switchboard's ``start_job`` gives them (``log_servers``). The token
        grants ``append`` on the job.
    :param spool_limit: the most bytes not yet acknowledged by every server.
    :param on_spool_full: ``fn(shipper, stream, refused_bytes)``, called when
        a stream starts refusing bytes.
    :param run_io: runs blocking file I/O (``fn, *args``) and returns a
        Deferred; by default in the reactor's thread pool. Calls are serialised.
    :param durable: ``fdatasync`` the spool before sending (False for load
        tests whose disks are not under test).
    :param ca_file: CAs trusted for ``https`` servers (default: the system's).
    :param final_streams: streams :meth:`close` closes even if nothing was
        ever appended to them, so that their followers end.

    If the state directory already holds this job's spool (a restart), the
    shipper continues from it; ``servers`` then replaces the saved list
    (fresher tokens) and keeps the cursors of the servers it names again.
    """

    log = Logger()

    def __init__(self, reactor: Any, state_dir: str, job_id: str, servers: list[dict[str, str]],
                 *, spool_limit: int = 64 * 1024 * 1024,
                 on_spool_full: Callable[[LogShipper, str, int], None] | None = None,
                 run_io: Callable[..., Deferred[Any]] | None = None, durable: bool = True,
                 ca_file: str | None = None, chunk: int = 256 * 1024,
                 segment_size: int | None = None, reserve: int | None = None,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0,
                 request_timeout: float = 30.0, save_interval: float = 1.0,
                 final_streams: Iterable[str] = FINAL_STREAMS, http: Any = None):
        if spool_limit <= 0:
            raise ValueError("spool_limit must be positive")
        self.reactor = reactor
        self.job_id = job_id
        self.directory = os.path.join(os.path.abspath(state_dir), LOGS_DIR, job_id)
        self.spool_limit = spool_limit
        self.reserve = reserve if reserve is not None else min(64 * 1024, spool_limit // 8)
        self.segment_size = segment_size or max(64 * 1024, min(4 * 1024 * 1024,
                                                               spool_limit // 8))
        self.chunk = chunk
        self.tail_limit = max(chunk * 2, 1024 * 1024)
        self.durable = durable
        self.on_spool_full = on_spool_full
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.request_timeout = request_timeout
        self.save_interval = save_interval
        self.final_streams = tuple(final_streams)
        self.spool_full = False
        self.refused_bytes = 0
        self._run_io = run_io or (lambda fn, *a: deferToThreadPool(
            reactor, reactor.getThreadPool(), fn, *a))
        self._io_lock = DeferredLock()
        self._streams: dict[str, _Stream] = {}
        self._servers: dict[str, _Server] = {}
        self._closing = False
        self._stopped = False
        self._finished = False
        self._gone = False
        self._save_call: Any = None
        self._drain_waiters: list[Deferred[None]] = []
        self._settle_waiters: list[Deferred[None]] = []
        self._finish_waiters: list[Deferred[None]] = []
        self._rr = 0
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = 2
            agent_kwargs: dict[str, Any] = {"pool": self._pool, "connectTimeout": 10}
            if ca_file:
                from treadmill.common.tls import client_policy

                agent_kwargs["contextFactory"] = client_policy(ca_file)
            http = treq.client.HTTPClient(Agent(reactor, **agent_kwargs))
        self._http = http

        loaded = _load(self.directory) if os.path.isdir(self.directory) else None
        self._restore(loaded, servers)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._io(write_json, os.path.join(self.directory, JOB_FILE),
                 {"job_id": job_id, "servers": [{"url": s.url, "token": s.token}
                                                for s in self._servers.values()]},
                 durable).addErrback(self._io_failed, "write job.json")
        for server in self._servers.values():
            self._start_loop(server)
        self._save_soon()
        self._check_done()  # a restart after everything was closed but not yet removed

    # -- construction from the state directory ---------------------------------------------

    @classmethod
    def unfinished(cls, state_dir: str) -> list[str]:
        """Job ids whose logs are still being shipped from ``state_dir``."""
        root = os.path.join(os.path.abspath(state_dir), LOGS_DIR)
        try:
            names = sorted(os.listdir(root))
        except FileNotFoundError:
            return []
        return [n for n in names if os.path.isfile(os.path.join(root, n, JOB_FILE))]

    @classmethod
    def resume(cls, reactor: Any, state_dir: str, job_id: str,
               **kwargs: Any) -> LogShipper | None:
        """The shipper of ``job_id`` as the state directory left it, or None."""
        path = os.path.join(os.path.abspath(state_dir), LOGS_DIR, job_id, JOB_FILE)
        saved = _read_json(path)
        if not isinstance(saved, dict) or not isinstance(saved.get("servers"), list):
            return None
        servers = [s for s in saved["servers"] if isinstance(s, dict)
                   and isinstance(s.get("url"), str) and isinstance(s.get("token"), str)]
        return cls(reactor, state_dir, job_id, servers, **kwargs)

    def _restore(self, loaded: dict[str, Any] | None, servers: list[dict[str, str]]) -> None:
        for spec in servers:
            server = _Server(spec["url"], spec["token"], self.chunk)
            server.progress_at = self.reactor.seconds()
            self._servers[server.url] = server
        if loaded is None:
            return
        saved = loaded.get("cursors") if isinstance(loaded.get("cursors"), dict) else {}
        about = saved.get("streams") if isinstance(saved.get("streams"), dict) else {}
        for name, segments in loaded["segments"].items():
            st = _Stream(name)
            # Keep the contiguous run of segments (a gap would be a bug or tampering).
            run: list[list[int]] = []
            for start, size in segments:
                if run and start != run[-1][0] + run[-1][1]:
                    self.log.error("Log spool of {job}/{stream} has a hole at {offset}; "
                                   "keeping what follows", job=self.job_id, stream=name,
                                   offset=run[-1][0] + run[-1][1])
                    run = []
                run.append([start, size])
            st.segments = run
            if run:
                st.base = run[0][0]
                st.spooled = st.produced = run[-1][0] + run[-1][1]
            st.tail_start = st.spooled
            info = about.get(name) if isinstance(about.get(name), dict) else {}
            st.closing = info.get("closing") is True
            if isinstance(info.get("length"), int) and not run:
                # Everything was acknowledged and dropped from the spool.
                st.base = st.spooled = st.produced = st.tail_start = info["length"]
            self._streams[name] = st
        for name, info in about.items():
            if name not in self._streams and is_stream(name) and isinstance(info, dict):
                st = _Stream(name)
                length = info.get("length") if isinstance(info.get("length"), int) else 0
                st.base = st.spooled = st.produced = st.tail_start = length
                st.closing = info.get("closing") is True
                self._streams[name] = st
        saved_servers = saved.get("servers") if isinstance(saved.get("servers"), dict) else {}
        for url, server in self._servers.items():
            record = saved_servers.get(url)
            if not isinstance(record, dict):
                continue
            cursors = record.get("cursors") if isinstance(record.get("cursors"), dict) else {}
            for name, st in self._streams.items():
                cursor = cursors.get(name)
                cursor = cursor if isinstance(cursor, int) else 0
                # Below the spool's start every server had acknowledged (that is when
                # segments are dropped); above its end nothing was ever sent.
                server.cursors[name] = min(max(cursor, st.base), st.spooled)
            closed = record.get("closed") if isinstance(record.get("closed"), list) else []
            server.closed = {n for n in closed if n in self._streams}
            failed = record.get("failed") if isinstance(record.get("failed"), dict) else {}
            server.failed = {n: str(r) for n, r in failed.items() if n in self._streams}
        for server in self._servers.values():
            for name, st in self._streams.items():
                server.cursors.setdefault(name, st.base)
        self._closing = any(st.closing for st in self._streams.values())
        self.log.info("Resuming log shipping of job {job}: {streams}", job=self.job_id,
                      streams=", ".join(f"{st.name} ({st.spooled - st.base} bytes spooled)"
                                        for st in self._streams.values()) or "no streams")

    # -- introspection (runner, manhole, tests) --------------------------------------------

    @property
    def servers(self) -> list[str]:
        return list(self._servers)

    @property
    def pending_bytes(self) -> int:
        """Bytes accepted but not yet acknowledged by every server."""
        return sum(st.produced - self._acked_by_all(st) for st in self._streams.values())

    @property
    def finished(self) -> bool:
        """Every stream is closed on every server and the spool is gone."""
        return self._finished

    @property
    def closing(self) -> bool:
        """:meth:`close` was called (before a restart, too): appends are refused."""
        return self._closing

    async def last_line(self, stream: str, limit: int = 64 * 1024) -> bytes | None:
        """The last line spooled in ``stream`` (``b""`` if it has none), once every
        byte appended so far is spooled; None if the spool no longer holds its end."""
        await self.flushed()
        st = self._streams.get(stream)
        if st is None or st.spooled == 0:
            return b""
        if not st.segments or st.spooled <= st.base:
            return None
        first = st.segments[-1][0]  # a segment starts where an append started
        start = max(first, st.spooled - limit)
        data = await self._read(st, start, st.spooled - start)
        lines = data.rstrip(b"\n").rsplit(b"\n", 1)
        return lines[-1] if len(lines) > 1 or start == first else None

    def status(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "pending_bytes": self.pending_bytes,
            "spool_full": self.spool_full, "refused_bytes": self.refused_bytes,
            "closing": self._closing, "finished": self._finished,
            "streams": {st.name: {"produced": st.produced, "spooled": st.spooled,
                                  "base": st.base, "closing": st.closing}
                        for st in self._streams.values()},
            "servers": {s.url: {"cursors": dict(s.cursors), "closed": sorted(s.closed),
                                "failed": dict(s.failed), "last_error": s.last_error}
                        for s in self._servers.values()},
        }

    def _behind(self, server: _Server) -> int:
        """Bytes produced that ``server`` has not acknowledged (its live streams)."""
        return sum(max(0, st.produced - server.cursor(name))
                   for name, st in self._streams.items() if server.live(name))

    def lag(self) -> dict[str, tuple[int, float]]:
        """Per log server URL: bytes not yet acknowledged, and seconds since it last made
        progress while behind (0 when caught up)."""
        now = self.reactor.seconds()
        result = {}
        for server in self._servers.values():
            behind = self._behind(server)
            result[server.url] = (behind, max(0.0, now - server.progress_at) if behind else 0.0)
        return result

    def _acked_by_all(self, st: _Stream) -> int:
        cursors = [s.cursor(st.name) for s in self._servers.values() if s.live(st.name)]
        return min(cursors) if cursors else st.produced

    # -- appending -------------------------------------------------------------------------

    def append(self, stream: str, data: bytes) -> bool:
        """Spool ``data`` at the end of ``stream`` and ship it. False if it was refused
        (spool full, or the shipper is closing or stopped); see the module docstring."""
        if not is_stream(stream):
            raise ValueError(f"invalid stream name {stream!r}")
        if self._stopped or self._closing:
            self.log.warn("Log shipper of job {job} is {state}; dropping {count} bytes of "
                          "{stream}", job=self.job_id, count=len(data), stream=stream,
                          state="stopped" if self._stopped else "closing")
            return False
        if not data:
            return True
        st = self._stream(stream)
        room = self.spool_limit - (0 if stream == EVENTS else self.reserve) - self.pending_bytes
        marker = b""
        if st.refused:
            marker = MARKER.format(count=st.refused).encode() if stream != EVENTS else b""
        if len(marker) + len(data) > room:
            self._refuse(st, len(data))
            return False
        if st.refused:
            self.log.warn("Log spool of job {job} has room again; {count} bytes of {stream} "
                          "were dropped", job=self.job_id, count=st.refused, stream=stream)
            st.refused = 0
        self.spool_full = any(s.refused for s in self._streams.values())
        now = self.reactor.seconds()
        for server in self._servers.values():
            if not self._behind(server):  # its lag starts now
                server.progress_at = now
        st.buffer += marker
        st.buffer += data
        st.produced += len(marker) + len(data)
        self._flush(st)
        return True

    def _refuse(self, st: _Stream, count: int) -> None:
        first = not st.refused
        st.refused += count
        self.refused_bytes += count
        self.spool_full = True
        if first:
            self.log.error("Log spool of job {job} is full ({pending} of {limit} bytes not "
                           "yet acknowledged by every log server): refusing output of "
                           "{stream}", job=self.job_id, pending=self.pending_bytes,
                           limit=self.spool_limit, stream=st.name)
            if self.on_spool_full is not None:
                try:
                    self.on_spool_full(self, st.name, count)
                except Exception:
                    self.log.failure("on_spool_full callback failed")

    def _stream(self, name: str) -> _Stream:
        st = self._streams.get(name)
        if st is None:
            st = _Stream(name)
            self._streams[name] = st
            for server in self._servers.values():
                server.cursors.setdefault(name, 0)
        return st

    def _io(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self._io_lock.run(self._run_io, fn, *args)

    def _io_failed(self, failure: Failure, what: str) -> None:
        self.log.error("Log shipper of job {job} cannot {what}: {error}", job=self.job_id,
                       what=what, error=failure.getErrorMessage())

    def _flush(self, st: _Stream) -> None:
        """Write the stream's buffer to the spool; then it may be sent."""
        if st.flushing or not st.buffer:
            return
        data = bytes(st.buffer)
        st.buffer.clear()
        st.flushing = True
        if not st.segments or st.segments[-1][1] >= self.segment_size:
            st.segments.append([st.spooled, 0])
        segment = st.segments[-1]
        start = segment[0]

        def written(_: Any) -> None:
            st.flushing = False
            segment[1] += len(data)
            st.spooled += len(data)
            st.tail += data
            if len(st.tail) > self.tail_limit:
                cut = len(st.tail) - self.tail_limit
                del st.tail[:cut]
                st.tail_start += cut
            self._wake_all()
            self._flush(st)
            self._check_settled()
            self._check_done()

        def failed(failure: Failure) -> None:
            # Keep the bytes (they are counted in pending_bytes) and try again.
            self._io_failed(failure, f"write its spool ({st.name})")
            st.flushing = False
            st.buffer[:0] = data
            if not segment[1] and st.segments and st.segments[-1] is segment:
                st.segments.pop()
            if not self._stopped:
                self.reactor.callLater(1.0, self._flush, st)

        self._io(_spool_write, self.directory, st.name, start, data, self.durable).addCallbacks(
            written, failed)

    def _check_settled(self) -> None:
        if all(st.settled for st in self._streams.values()):
            waiters, self._settle_waiters = self._settle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def flushed(self) -> Deferred[None]:
        """Fires once every byte appended so far is in the spool (durable)."""
        if all(st.settled for st in self._streams.values()):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._settle_waiters.append(waiter)
        return waiter

    async def _read(self, st: _Stream, offset: int, size: int) -> bytes:
        if offset >= st.tail_start:
            return bytes(st.tail[offset - st.tail_start:offset - st.tail_start + size])
        for start, length in st.segments:
            if start <= offset < start + length:
                size = min(size, start + length - offset)
                return await self._io(_spool_read, self.directory, st.name, start, offset,
                                      size)
        raise RuntimeError(f"offset {offset} of {st.name} is not in the spool")

    # -- sending ---------------------------------------------------------------------------

    def _start_loop(self, server: _Server) -> None:
        server.loop = Deferred.fromCoroutine(self._run(server))
        server.loop.addErrback(lambda f: f.check(CancelledError) or self.log.failure(
            "Log shipping to {url} crashed", f, url=server.url))

    def _wake_all(self) -> None:
        for server in self._servers.values():
            wake, server.wake = server.wake, None
            if wake is not None and not wake.called:
                wake.callback(None)

    def _next_work(self, server: _Server) -> tuple[str, _Stream] | None:
        streams = list(self._streams.values())
        if not streams:
            return None
        self._rr = (self._rr + 1) % len(streams)
        for st in streams[self._rr:] + streams[:self._rr]:
            name = st.name
            if not server.live(name) or name in server.closed:
                continue
            if server.cursor(name) < st.spooled:
                return "append", st
            if st.closing and st.settled and st.spooled == st.produced:
                return "close", st
        return None

    async def _run(self, server: _Server) -> None:
        while not self._stopped and not server.removed:
            work = self._next_work(server)
            if work is None:
                server.wake = Deferred()
                await server.wake
                continue
            kind, st = work
            try:
                if kind == "append":
                    await self._push(server, st)
                else:
                    await self._close_on(server, st)
            except CancelledError:
                return
            except Exception as e:
                if self._stopped or server.removed:
                    return
                if not isinstance(e, _Retry):
                    self.log.failure("Log shipping to {url} failed", url=server.url)
                server.attempts += 1
                delay = min(self.backoff_max, self.backoff_initial * 2 ** (server.attempts - 1))
                delay *= random.uniform(0.5, 1.0)
                if server.last_error != str(e) or server.attempts in (1, 5) or \
                        server.attempts % 20 == 0:
                    self.log.warn("Log server {url}: {error}; retrying in {delay:.1f} s "
                                  "(attempt {n})", url=server.url, error=str(e), delay=delay,
                                  n=server.attempts)
                server.last_error = str(e)
                server.sleep = deferLater(self.reactor, delay, lambda: None)
                try:
                    await server.sleep
                except CancelledError:
                    return
                finally:
                    server.sleep = None
                continue
            if server.attempts:
                self.log.info("Log server {url} accepts appends again", url=server.url)
            server.attempts = 0
            server.last_error = None

    async def _request(self, server: _Server, url: str, data: bytes) -> tuple[int, Any]:
        headers = {"authorization": f"Bearer {server.token}",
                   "content-type": "application/octet-stream"}
        try:
            server.request = self._http.post(url, data=data, headers=headers,
                                             timeout=self.request_timeout)
            response = await server.request
            server.request = self._http_content(response)
            content = await server.request
        except CancelledError:
            if self._stopped or server.removed:
                raise
            raise _Retry("request timed out") from None
        except Exception as e:
            raise _Retry(f"{type(e).__name__}: {e}".strip()) from None
        finally:
            server.request = None
        try:
            body = json.loads(content) if content else None
        except ValueError:
            body = None
        return response.code, body

    def _http_content(self, response: Any) -> Deferred[bytes]:
        return treq.content(response)

    @staticmethod
    def _error(body: Any) -> tuple[str, str]:
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return str(body["error"].get("code")), str(body["error"].get("message"))
        return "?", "no error body"

    async def _push(self, server: _Server, st: _Stream) -> None:
        name = st.name
        offset = server.cursor(name)
        if offset < st.base:
            self._fail(server, name, f"it needs bytes from {offset}, the spool starts at "
                       f"{st.base}")
            return
        size = min(server.chunk, st.spooled - offset)
        data = await self._read(st, offset, size)
        if not data:
            raise RuntimeError(f"nothing to read at {offset} of {name}")
        last = st.closing and st.settled and offset + len(data) == st.produced
        url = logs.append_url(server.url, self.job_id, name, offset, close=last)
        code, body = await self._request(server, url, data)
        if self._stopped or server.removed:
            return
        if code == 200:
            server.cursors[name] = max(server.cursor(name), offset + len(data))
            server.progress_at = self.reactor.seconds()
            if last and isinstance(body, dict) and body.get("closed"):
                server.closed.add(name)
            self._acked(st)
            return
        error, message = self._error(body)
        length = body.get("length") if isinstance(body, dict) else None
        if code == 409 and error == "gap" and isinstance(length, int):
            if length < st.base:
                self._fail(server, name, f"it has {length} bytes and lost the rest; the spool "
                           f"starts at {st.base}")
                return
            self.log.warn("Log server {url} has only {length} bytes of {job}/{stream} "
                          "(cursor {cursor}); sending again from there", url=server.url,
                          length=length, job=self.job_id, stream=name, cursor=offset)
            server.cursors[name] = min(length, st.spooled)
            self._save_soon()
            return
        if code == 409 and error == "closed" and isinstance(length, int) \
                and length == st.produced and st.closing:
            server.cursors[name] = length
            server.closed.add(name)
            self._acked(st)
            return
        if code == 409 or (code == 400 and error != "?"):
            self._fail(server, name, f"{error}: {message}")
            return
        if code == 413 and server.chunk > 1024:
            server.chunk = max(1024, server.chunk // 2)
            return
        raise _Retry(f"HTTP {code} {error}: {message}")

    async def _close_on(self, server: _Server, st: _Stream) -> None:
        name = st.name
        code, body = await self._request(
            server, logs.close_url(server.url, self.job_id, name, st.produced), b"")
        if self._stopped or server.removed:
            return
        if code == 200:
            server.closed.add(name)
            self._acked(st)
            return
        error, message = self._error(body)
        length = body.get("length") if isinstance(body, dict) else None
        if code == 409 and error == "gap" and isinstance(length, int) and length >= st.base:
            server.cursors[name] = min(length, st.spooled)
            return
        if code in (400, 409):
            self._fail(server, name, f"close: {error}: {message}")
            return
        raise _Retry(f"HTTP {code} {error}: {message}")

    def _fail(self, server: _Server, name: str, why: str) -> None:
        """Give up on one stream of one server (it lost bytes the spool no longer has,
        or holds different ones): the other servers go on, the spool moves on."""
        self.log.error("Log server {url} cannot get stream {stream} of job {job}: {why}. "
                       "Its copy will be incomplete.", url=server.url, stream=name,
                       job=self.job_id, why=why)
        server.failed[name] = why
        self._acked(self._streams[name])

    # -- acknowledgements ------------------------------------------------------------------

    def _acked(self, st: _Stream) -> None:
        self._save_soon()
        acked = self._acked_by_all(st)
        cut = min(acked, st.spooled) - st.tail_start
        if cut > 0:  # every server has these: no need to keep them in memory
            del st.tail[:cut]
            st.tail_start += cut
        drop = [seg for seg in st.segments[:-1] if seg[0] + seg[1] <= acked]
        if drop:
            st.segments = st.segments[len(drop):]
            st.base = st.segments[0][0] if st.segments else st.spooled
            self._io(_spool_drop, self.directory, st.name, [seg[0] for seg in drop]
                     ).addErrback(self._io_failed, "delete spool segments")
        self._check_done()

    def _check_done(self) -> None:
        if self.pending_bytes == 0 and all(st.settled for st in self._streams.values()):
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        if self._closing and not self._finished and self._all_closed():
            self._finished = True
            Deferred.fromCoroutine(self._finish())

    def _all_closed(self) -> bool:
        for st in self._streams.values():
            if not st.closing or not st.settled:
                return False
            for server in self._servers.values():
                if server.live(st.name) and st.name not in server.closed:
                    return False
        return True

    async def _finish(self) -> None:
        failures = {s.url: dict(s.failed) for s in self._servers.values() if s.failed}
        if failures:
            self.log.error("Log shipping of job {job} finished with incomplete copies: "
                           "{failures}", job=self.job_id, failures=failures)
        else:
            self.log.info("Log shipping of job {job} finished", job=self.job_id)
        self._cancel_save()
        await self._halt()
        try:
            await self._io(shutil.rmtree, self.directory)
        except Exception as e:
            self.log.error("Cannot remove {path}: {error}", path=self.directory, error=str(e))
        self._gone = True
        waiters, self._finish_waiters = self._finish_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def drained(self) -> Deferred[None]:
        """Fires once every byte appended so far is acknowledged by every server
        (servers that failed a stream do not count for it)."""
        if self.pending_bytes == 0 and all(st.settled for st in self._streams.values()):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drain_waiters.append(waiter)
        return waiter

    # -- cursors ---------------------------------------------------------------------------

    def _save_soon(self) -> None:
        if self._save_call is None and not self._stopped:
            self._save_call = self.reactor.callLater(self.save_interval, self._save_now)

    def _cancel_save(self) -> None:
        if self._save_call is not None and self._save_call.active():
            self._save_call.cancel()
        self._save_call = None

    def _save_now(self) -> Deferred[None]:
        self._save_call = None
        if self._finished and self._stopped:
            return succeed(None)
        state = {
            "streams": {st.name: {"closing": st.closing, "length": st.spooled}
                        for st in self._streams.values()},
            "servers": {s.url: {"cursors": dict(s.cursors), "closed": sorted(s.closed),
                                "failed": dict(s.failed)}
                        for s in self._servers.values()},
        }
        d = self._io(write_json, os.path.join(self.directory, CURSORS_FILE), state,
                     self.durable)
        d.addErrback(self._io_failed, "save its cursors")
        return d

    # -- ending ----------------------------------------------------------------------------

    def close(self, timeout: float = 30.0) -> Deferred[bool]:
        """No more appends: ship what is left, close every stream on every server,
        delete the spool. Fires True when done, or False after ``timeout`` seconds
        (shipping then goes on in the background, and after a restart)."""
        if not self._closing:
            self._closing = True
            for name in self.final_streams:
                self._stream(name)
            for st in self._streams.values():
                st.closing = True
            self._cancel_save()
            self._save_now()
            self._wake_all()
            self._check_done()
        if self._gone:
            return succeed(True)
        waiter: Deferred[None] = Deferred()
        self._finish_waiters.append(waiter)
        result: Deferred[bool] = Deferred()
        timer = self.reactor.callLater(timeout, lambda: result.called or result.callback(False))

        def done(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not result.called:
                result.callback(True)

        waiter.addCallback(done)
        return result

    def set_servers(self, servers: list[dict[str, str]]) -> None:
        """Replace the server list (e.g. with fresh tokens); cursors of servers named
        again are kept, a new server starts from the spool's start."""
        wanted = {spec["url"].rstrip("/"): spec["token"] for spec in servers}
        for url, server in list(self._servers.items()):
            if url not in wanted:
                server.removed = True
                self._interrupt(server)
                del self._servers[url]
        for url, token in wanted.items():
            server = self._servers.get(url)
            if server is not None:
                server.token = token
                continue
            server = _Server(url, token, self.chunk)
            server.progress_at = self.reactor.seconds()
            for name, st in self._streams.items():
                server.cursors[name] = st.base
                if st.base:
                    server.failed[name] = "added after the spool's start was dropped"
            self._servers[url] = server
            if not self._stopped and not self._finished:
                self._start_loop(server)
        self._io(write_json, os.path.join(self.directory, JOB_FILE),
                 {"job_id": self.job_id, "servers": [{"url": s.url, "token": s.token}
                                                     for s in self._servers.values()]},
                 self.durable).addErrback(self._io_failed, "write job.json")
        self._save_soon()
        self._check_done()

    def _interrupt(self, server: _Server) -> None:
        for pending in (server.request, server.sleep):
            if pending is not None and not pending.called:
                pending.cancel()
        wake, server.wake = server.wake, None
        if wake is not None and not wake.called:
            wake.callback(None)

    async def _halt(self) -> None:
        self._stopped = True
        for server in self._servers.values():
            self._interrupt(server)
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    async def stop(self) -> None:
        """The supervisor stops: spool what is buffered, save the cursors, stop sending.
        The spool stays for :meth:`resume`."""
        if self._stopped:
            return
        flushed = self.flushed()
        timer = self.reactor.callLater(10.0, flushed.cancel)
        try:
            await flushed
        except CancelledError:
            self.log.error("Log shipper of job {job}: the spool could not be written; "
                           "{count} bytes are lost", job=self.job_id,
                           count=sum(len(st.buffer) for st in self._streams.values()))
        if timer.active():
            timer.cancel()
        self._cancel_save()
        if not self._finished:
            await self._save_now()
        await self._halt()

    def halt(self) -> None:
        """Stop at once, saving nothing (what a crash does; for tests)."""
        self._cancel_save()
        self._stopped = True
        for server in self._servers.values():
            self._interrupt(server)
        if self._pool is not None:
            self._pool.closeCachedConnections()
