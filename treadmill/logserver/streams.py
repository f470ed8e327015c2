"""Log streams on disk: append-only files, one writer thread, retention.

    ROOT/
    ├── jobs/
    │   └── <job uuid>/
    │       ├── _meta.json   {"job", "created", "streams": {name: {"created", "closed"}}}
    │       ├── console      the stream's bytes, append-only
    │       └── events
    └── trash/               jobs being deleted (renamed here first, so a deletion is atomic)

A stream's length is its file's size; what the file holds at an offset never
changes once acknowledged. ``_meta.json`` changes only when a stream is
created or closed, and is replaced atomically.

Every write goes through one :class:`Writer` thread. Appends queue up while
the thread is busy and are written together as one batch, then each touched
file is ``fdatasync``-ed once (with ``fsync = "always"``): group commit without
an added delay. An append is acknowledged, and its bytes become visible to
readers and followers, only after its batch was synced. Reads run in a small
pool of reader threads, one chunk at a time (see ``follow.py``).

Appends to one stream are serialised: each one checks its offset against the
length left by the previous one (see :meth:`StreamStore.append` for the rules).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from treadmill.common.files import fsync_directory, write_json
from treadmill.logserver.names import META
from treadmill.protocol.logs import is_job, is_stream

__all__ = ["Job", "Stream", "StreamError", "StreamStore", "TooManyStreams", "Writer"]

FSYNC_POLICIES = ("always", "never")
BATCH_BYTES = 16 * 1024 * 1024  # a batch waits for at most this much data to be written
SYNC_THREADS = 32  # files a batch fdatasyncs at once


class StreamError(Exception):
    """An append or close refused because of what the stream holds.

    ``code`` is ``gap`` (the offset is past the end), ``conflict`` (the bytes
    differ from the stored ones, or a close names another length) or
    ``closed`` (new bytes for a closed stream); ``length`` is the stream's
    current length.
    """

    def __init__(self, code: str, message: str, length: int):
        super().__init__(message)
        self.code = code
        self.message = message
        self.length = length


class TooManyStreams(Exception):
    """A job has as many streams as it may have."""


class StorageError(Exception):
    """The disk refused a write (full, read-only, I/O error)."""


class Follower(Protocol):
    """What a stream tells the readers that follow it."""

    def appended(self, stream: Stream, old_length: int, data: bytes) -> None: ...

    def ended(self, stream: Stream) -> None: ...

    def shutdown(self) -> None: ...


@dataclass(slots=True, eq=False)
class Stream:
    """One stream of one job, as the reactor sees it."""

    job: Job = field(repr=False)
    name: str
    _: KW_ONLY
    length: int = 0
    closed: bool = False
    exists: bool = False
    created: float = 0.0
    followers: set[Follower] | None = field(default=None, init=False)
    lock: DeferredLock | None = field(default=None, init=False)

    @property
    def deleted(self) -> bool:
        return self.job.deleted

    @property
    def path(self) -> str:
        return os.path.join(self.job.path, self.name)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "length": self.length, "closed": self.closed}


@dataclass(slots=True, eq=False)
class Job:
    """One job's directory and streams."""

    id: str
    path: str
    _: KW_ONLY
    created: float = 0.0
    updated: float = 0.0
    on_disk: bool = False
    deleted: bool = field(default=False, init=False)
    size: int = field(default=0, init=False)
    streams: dict[str, Stream] = field(default_factory=dict, init=False)
    # What _meta.json says, including the writes submitted but not done yet: each
    # write of the file is a snapshot of this, and writes run in submission order.
    doc: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)

    def existing(self) -> list[Stream]:
        return sorted((s for s in self.streams.values() if s.exists), key=lambda s: s.name)

    def meta(self) -> dict[str, Any]:
        return {"job": self.id, "created": self.created,
                "streams": {name: dict(about) for name, about in self.doc.items()}}


# -- the writer thread ---------------------------------------------------------------------


class _Batch:
    """What one batch of writer operations touched; runs in the writer thread."""

    def __init__(self, fsync: bool, syncers: ThreadPoolExecutor | None = None):
        self.fsync = fsync
        self.syncers = syncers
        self._fds: dict[str, int] = {}
        self.written: dict[str, int] = {}  # path -> lowest offset written in this batch
        self.owners: dict[str, list[int]] = {}  # path -> indexes of the operations that wrote

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._fds[path] = fd
        return fd

    def pwrite(self, index: int, path: str, offset: int, data: bytes) -> None:
        fd = self.fd(path)
        self.written[path] = min(offset, self.written.get(path, offset))
        self.owners.setdefault(path, []).append(index)
        view = memoryview(data)
        position = offset
        try:
            while view:
                n = os.pwrite(fd, view, position)
                view = view[n:]
                position += n
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, offset)  # no partial append left behind
            raise

    def sync(self) -> dict[str, BaseException]:
        """``fdatasync`` every written file; the errors by path."""
        errors: dict[str, BaseException] = {}
        if not self.fsync:
            return errors

        def sync(path: str) -> None:
            try:
                os.fdatasync(self._fds[path])
            except OSError as e:
                errors[path] = e

        paths = list(self.written)
        if self.syncers is None or len(paths) < 2:
            for path in paths:
                sync(path)
        else:
            # Concurrent fdatasyncs of many files share the file system's journal
            # commits, where one after the other each waits for its own.
            list(self.syncers.map(sync, paths))
        return errors

    def undo(self, path: str) -> None:
        """Cut a file back to where this batch began writing it (after a failed sync)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fds[path], self.written[path])

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


class Writer:
    """One thread that runs every write, in batches, each followed by one sync per file.

    ``submit(fn)`` queues ``fn(batch, index)`` and returns a Deferred of its
    result, fired once its batch was synced. Operations run in submission
    order.
    """

    log = Logger()

    def __init__(self, reactor: Any, *, fsync: bool = True):
        self.reactor = reactor
        self.fsync = fsync
        self.pool = ThreadPool(1, 1, name="treadmill-logserver-writer")
        self.syncers: ThreadPoolExecutor | None = None
        self._queue: list[tuple[Callable[[_Batch, int], Any], Deferred[Any], int]] = []
        self._busy = False
        self.batches = 0

    def start(self) -> None:
        self.pool.start()
        if self.fsync and self.syncers is None:
            self.syncers = ThreadPoolExecutor(SYNC_THREADS, "treadmill-logserver-sync")

    def stop(self) -> None:
        self.pool.stop()  # waits for the batch under way, which waits for its syncs
        if self.syncers is not None:
            self.syncers.shutdown(wait=False)
            self.syncers = None

    @property
    def idle(self) -> bool:
        return not self._busy and not self._queue

    def submit(self, fn: Callable[[_Batch, int], Any], size: int = 0) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._queue.append((fn, d, size))
        self._next()
        return d

    def _next(self) -> None:
        if self._busy or not self._queue:
            return
        taken, total = 0, 0
        for _fn, _d, size in self._queue:
            if taken and total + size > BATCH_BYTES:
                break
            taken += 1
            total += size
        ops, self._queue = self._queue[:taken], self._queue[taken:]
        self._busy = True
        done = deferToThreadPool(self.reactor, self.pool, self._run, [fn for fn, _, _ in ops])
        done.addBoth(self._done, [d for _, d, _ in ops])

    def _run(self, fns: list[Callable[[_Batch, int], Any]]) -> list[tuple[bool, Any]]:
        batch = _Batch(self.fsync, self.syncers)
        results: list[tuple[bool, Any]] = []
        try:
            for index, fn in enumerate(fns):
                try:
                    results.append((True, fn(batch, index)))
                except Exception:
                    results.append((False, Failure()))
            for path, error in batch.sync().items():
                batch.undo(path)
                for index in batch.owners.get(path, []):
                    if results[index][0]:
                        results[index] = (False, Failure(StorageError(
                            f"sync failed: {os.strerror(getattr(error, 'errno', 0) or 0)}")))
        finally:
            batch.close()
        return results

    def _done(self, outcome: Any, deferreds: list[Deferred[Any]]) -> None:
        self._busy = False
        self.batches += 1
        if isinstance(outcome, Failure):
            for d in deferreds:
                d.errback(outcome)
        else:
            for d, (ok, value) in zip(deferreds, outcome, strict=True):
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)
        self._next()


# -- blocking file operations (writer or reader thread) ------------------------------------


def _make_job_dir(path: str, fsync: bool) -> None:
    if os.path.isdir(path):
        return
    os.makedirs(path, mode=0o750, exist_ok=True)
    if fsync:
        fsync_directory(os.path.dirname(path), strict=True)


def _read_range(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return os.pread(f.fileno(), size, offset)


def _same_bytes(path: str, offset: int, data: bytes) -> bool:
    stored = _read_range(path, offset, len(data)) if data else b""
    return stored == data


def _storage_message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the log server's disk is full"
    if isinstance(error, OSError) and error.errno == errno.EROFS:
        return "the log server's disk is read-only"
    return "the log server cannot write its storage"


def _scan(root: str) -> list[dict[str, Any]]:
    """Read what ``ROOT/jobs`` holds (blocking); empty ``ROOT/trash``."""
    jobs_dir = os.path.join(root, "jobs")
    trash = os.path.join(root, "trash")
    os.makedirs(jobs_dir, mode=0o750, exist_ok=True)
    os.makedirs(trash, mode=0o750, exist_ok=True)
    for entry in os.scandir(trash):
        shutil.rmtree(entry.path, ignore_errors=True)
    found: list[dict[str, Any]] = []
    for entry in os.scandir(jobs_dir):
        if not entry.is_dir(follow_symlinks=False) or not is_job(entry.name):
            continue
        meta: dict[str, Any] = {}
        streams: dict[str, tuple[int, float]] = {}
        updated = entry.stat(follow_symlinks=False).st_mtime
        for item in os.scandir(entry.path):
            if item.name == META:
                try:
                    with open(item.path, "rb") as f:
                        loaded = json.loads(f.read())
                    meta = loaded if isinstance(loaded, dict) else {}
                except (OSError, ValueError):
                    meta = {}
                continue
            if item.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(item.path)
                continue
            if is_stream(item.name) and item.is_file(follow_symlinks=False):
                st = item.stat(follow_symlinks=False)
                streams[item.name] = (st.st_size, st.st_mtime)
                updated = max(updated, st.st_mtime)
        found.append({"id": entry.name, "path": entry.path, "meta": meta, "streams": streams,
                      "updated": updated})
    return found


# -- the store ---------------------------------------------------------------------------


class StreamStore:
    """Every job's streams under ``root``; see the module docstring."""

    log = Logger()

    def __init__(self, reactor: Any, root: str, *, fsync: str = "always", max_streams: int = 64,
                 reader_threads: int = 4):
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}")
        self.reactor = reactor
        self.root = os.path.abspath(root)
        self.jobs_dir = os.path.join(self.root, "jobs")
        self.trash_dir = os.path.join(self.root, "trash")
        self.fsync = fsync == "always"
        self.max_streams = max_streams
        self.writer = Writer(reactor, fsync=self.fsync)
        self.readers = ThreadPool(0, reader_threads, name="treadmill-logserver-reader")
        self.jobs: dict[str, Job] = {}
        self.total_bytes = 0
        self.appended_bytes = 0
        self.deleted_jobs = 0
        self._running = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the threads and load what the root holds."""
        self.writer.start()
        self.readers.start()
        self._running = True
        found = await deferToThreadPool(self.reactor, self.readers, _scan, self.root)
        for record in found:
            meta = record["meta"]
            described = meta.get("streams") if isinstance(meta.get("streams"), dict) else {}
            created = meta.get("created") if isinstance(meta.get("created"), int | float) else 0.0
            job = Job(record["id"], record["path"], created=created or record["updated"],
                      updated=record["updated"], on_disk=True)
            for name, (size, mtime) in record["streams"].items():
                about = described.get(name) if isinstance(described.get(name), dict) else {}
                stream = Stream(job, name, length=size, exists=True,
                                closed=about.get("closed") is True,
                                created=about.get("created") or mtime)
                job.streams[name] = stream
                job.doc[name] = {"created": stream.created, "closed": stream.closed}
                job.size += size
            self.jobs[job.id] = job
            self.total_bytes += job.size
        self.log.info("Log store {root}: {jobs} jobs, {size} bytes", root=self.root,
                      jobs=len(self.jobs), size=self.total_bytes)

    def stop(self) -> None:
        """End every follower; stop the threads (waits for the batch being written)."""
        for job in list(self.jobs.values()):
            for stream in list(job.streams.values()):
                for follower in list(stream.followers or ()):
                    follower.shutdown()
        if self._running:
            self._running = False
            self.writer.stop()
            self.readers.stop()

    # -- lookups -----------------------------------------------------------------------

    def lookup(self, job_id: str, name: str) -> Stream | None:
        """The stream if it exists on disk."""
        job = self.jobs.get(job_id)
        stream = job.streams.get(name) if job is not None else None
        return stream if stream is not None and stream.exists else None

    def streams(self, job_id: str) -> list[Stream]:
        job = self.jobs.get(job_id)
        return job.existing() if job is not None else []

    def stream(self, job_id: str, name: str) -> Stream:
        """The stream, as an in-memory placeholder if it does not exist yet.

        Follow it (:meth:`watch`) or append to it at once: an unused placeholder
        is forgotten at the next :meth:`unwatch` or append.
        """
        job = self.jobs.get(job_id)
        if job is None:
            now = self.reactor.seconds()
            job = Job(job_id, os.path.join(self.jobs_dir, job_id), created=now, updated=now)
            self.jobs[job_id] = job
        stream = job.streams.get(name)
        if stream is None:
            stream = Stream(job, name)
            job.streams[name] = stream
        return stream

    def _forget_placeholder(self, stream: Stream) -> None:
        if stream.exists or stream.followers or (stream.lock and stream.lock.locked):
            return
        job = stream.job
        if job.streams.get(stream.name) is stream:
            del job.streams[stream.name]
        if not job.on_disk and not job.streams and self.jobs.get(job.id) is job:
            del self.jobs[job.id]

    # -- followers ---------------------------------------------------------------------

    def watch(self, stream: Stream, follower: Follower) -> None:
        """Tell ``follower`` about ``stream``'s appends and its end."""
        if stream.followers is None:
            stream.followers = set()
        stream.followers.add(follower)

    def unwatch(self, stream: Stream, follower: Follower) -> None:
        if stream.followers is not None:
            stream.followers.discard(follower)
            if not stream.followers:
                stream.followers = None
        self._forget_placeholder(stream)

    @property
    def follower_count(self) -> int:
        return sum(len(s.followers or ()) for job in self.jobs.values()
                   for s in job.streams.values())

    def _tell(self, stream: Stream, call: Callable[[Follower], None]) -> None:
        for follower in list(stream.followers or ()):
            try:
                call(follower)
            except Exception:
                self.log.failure("A follower of {job}/{stream} failed", job=stream.job.id,
                                 stream=stream.name)

    # -- reads -------------------------------------------------------------------------

    def read(self, stream: Stream, offset: int, size: int) -> Deferred[bytes]:
        """Bytes ``[offset, offset + size)`` of an existing stream, read in a thread."""
        return deferToThreadPool(self.reactor, self.readers, _read_range, stream.path, offset,
                                 size)

    # -- writes ------------------------------------------------------------------------

    async def append(self, job_id: str, name: str, offset: int, data: bytes, *,
                     close: bool = False) -> Stream:
        """Append ``data`` at ``offset``; close the stream after it if ``close``.

        - ``offset == length``: the bytes are appended.
        - ``offset < length``: the part that overlaps stored bytes must equal
          them (a retried append); the rest, if any, is appended. Different
          bytes: ``StreamError("conflict")``.
        - ``offset > length``: ``StreamError("gap")``.
        - New bytes for a closed stream: ``StreamError("closed")``.

        Fires once the bytes are durable (per the fsync policy) and visible.
        """
        async with self._locked(job_id, name) as stream:
            await self._append_locked(stream, offset, data, close)
        return stream

    @contextlib.asynccontextmanager
    async def _locked(self, job_id: str, name: str) -> AsyncIterator[Stream]:
        """The stream ``name`` of ``job_id``, held under its lock (made on demand, dropped
        when nobody waits for it); a placeholder left empty is forgotten after."""
        stream = self.stream(job_id, name)
        if stream.lock is None:
            stream.lock = DeferredLock()
        lock = stream.lock
        await lock.acquire()
        try:
            yield stream
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                stream.lock = None
            self._forget_placeholder(stream)

    async def _append_locked(self, stream: Stream, offset: int, data: bytes,
                             close: bool) -> None:
        length = stream.length
        if offset > length:
            raise StreamError("gap", f"offset {offset} is past the end of the stream "
                              f"({length} bytes); send from {length}", length)
        if offset < length:
            overlap = data[:length - offset]
            if overlap and not await deferToThreadPool(self.reactor, self.readers, _same_bytes,
                                                       stream.path, offset, overlap):
                raise StreamError("conflict", f"bytes at offset {offset} differ from the "
                                  "stored ones", length)
            data = data[len(overlap):]
            offset = length
        if data:
            if stream.closed:
                raise StreamError("closed", "the stream is closed", length)
            await self._write(stream, offset, data)
        if close and not stream.closed:
            await self._close(stream)

    async def close(self, job_id: str, name: str, length: int | None = None) -> Stream:
        """Close a stream (creating it empty if needed); followers end after its last byte.

        With ``length``, the stream must have exactly that many bytes:
        fewer is a ``gap``, more a ``conflict``. Closing twice is harmless.
        """
        async with self._locked(job_id, name) as stream:
            if length is not None and length > stream.length:
                raise StreamError("gap", f"the stream has {stream.length} bytes, not {length}",
                                  stream.length)
            if length is not None and length < stream.length:
                raise StreamError("conflict", f"the stream has {stream.length} bytes, "
                                  f"not {length}", stream.length)
            if not stream.closed:
                await self._close(stream)
        return stream

    def _check_new(self, stream: Stream) -> None:
        if not stream.exists and len(stream.job.existing()) >= self.max_streams:
            raise TooManyStreams(f"job {stream.job.id} already has {self.max_streams} streams")

    @staticmethod
    def _check_alive(stream: Stream) -> None:
        # Retention deleted the job while this append waited: writing now would bring
        # the directory back with a hole in it.
        if stream.deleted:
            raise StreamError("gap", "the job's logs were deleted (retention); "
                              "send from 0", 0)

    async def _write(self, stream: Stream, offset: int, data: bytes) -> None:
        self._check_alive(stream)
        self._check_new(stream)
        job = stream.job
        create = not stream.exists
        now = self.reactor.seconds()
        meta: dict[str, Any] | None = None
        if create:
            stream.created = now
            job.doc.setdefault(stream.name, {"created": now, "closed": False})
            meta = job.meta()
        path, job_path, fsync = stream.path, job.path, self.fsync

        def write(batch: _Batch, index: int) -> None:
            if meta is not None:
                _make_job_dir(job_path, fsync)
                write_json(os.path.join(job_path, META), meta, fsync, mode=0o640)
            batch.pwrite(index, path, offset, data)
            if meta is not None and fsync:
                # The new file's directory entry must survive too.
                batch.fd(path)
                fsync_directory(job_path, strict=True)

        try:
            await self.writer.submit(write, len(data))
        except Exception as e:
            cause = e.__cause__ or e
            self.log.error("Cannot write {job}/{stream}: {error}", job=job.id,
                           stream=stream.name, error=str(cause))
            raise StorageError(_storage_message(cause)) from None
        if job.deleted:
            return
        old = stream.length
        stream.exists = True
        job.on_disk = True
        stream.length = offset + len(data)
        grown = stream.length - old
        job.size += grown
        job.updated = now
        self.total_bytes += grown
        self.appended_bytes += grown
        self._tell(stream, lambda f: f.appended(stream, old, data))

    async def _close(self, stream: Stream) -> None:
        self._check_alive(stream)
        self._check_new(stream)
        job = stream.job
        stream.created = stream.created or self.reactor.seconds()
        before = job.doc.get(stream.name)
        job.doc[stream.name] = {"created": stream.created, "closed": True}
        meta = job.meta()
        path, job_path, fsync = stream.path, job.path, self.fsync

        def close(batch: _Batch, index: int) -> None:
            _make_job_dir(job_path, fsync)
            batch.fd(path)  # creates an empty stream if needed
            write_json(os.path.join(job_path, META), meta, fsync, mode=0o640)  # syncs the directory

        try:
            await self.writer.submit(close)
        except Exception as e:
            if before is None:
                job.doc.pop(stream.name, None)
            else:
                job.doc[stream.name] = before
            self.log.error("Cannot close {job}/{stream}: {error}", job=job.id,
                           stream=stream.name, error=str(e))
            raise StorageError(_storage_message(e)) from None
        if job.deleted:
            return
        stream.exists = True
        job.on_disk = True
        stream.closed = True
        self._tell(stream, lambda f: f.ended(stream))

    # -- retention ---------------------------------------------------------------------

    def expired(self, now: float, max_age: float | None, max_bytes: int | None) -> list[Job]:
        """The jobs retention would delete now: idle longer than ``max_age``, then the
        least recently written until the rest fits in ``max_bytes``."""
        jobs = sorted((j for j in self.jobs.values() if j.on_disk),
                      key=lambda j: (j.updated, j.id))
        doomed: list[Job] = []
        remaining = self.total_bytes
        for job in jobs:
            too_old = max_age is not None and job.updated <= now - max_age
            too_big = max_bytes is not None and remaining > max_bytes
            if not (too_old or too_big):
                break
            doomed.append(job)
            remaining -= job.size
        return doomed

    async def enforce_retention(self, max_age: float | None, max_bytes: int | None,
                                now: float | None = None) -> list[str]:
        """Delete what :meth:`expired` names; the deleted job ids."""
        now = self.reactor.seconds() if now is None else now
        doomed = self.expired(now, max_age, max_bytes)
        for job in doomed:
            self.log.info("Retention: deleting job {job} ({size} bytes, idle {idle:.0f} s)",
                          job=job.id, size=job.size, idle=now - job.updated)
            await self.delete(job.id)
        return [job.id for job in doomed]

    async def delete(self, job_id: str) -> bool:
        """Delete a job and its streams; its followers end."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return False
        job.deleted = True
        self.total_bytes -= job.size
        self.deleted_jobs += 1
        for stream in list(job.streams.values()):
            self._tell(stream, lambda f, s=stream: f.ended(s))
        path = job.path
        trash = os.path.join(self.trash_dir, f"{job_id}.{uuid.uuid4().hex[:8]}")

        def remove(batch: _Batch, index: int) -> None:
            try:
                os.replace(path, trash)
            except FileNotFoundError:
                return
            shutil.rmtree(trash, ignore_errors=True)

        try:
            await self.writer.submit(remove)
        except Exception:
            self.log.failure("Cannot delete job {job}", job=job_id)
        return True

    def summary(self) -> dict[str, Any]:
        return {"root": self.root, "jobs": len([j for j in self.jobs.values() if j.on_disk]),
                "bytes": self.total_bytes, "followers": self.follower_count,
                "appended_bytes": self.appended_bytes, "deleted_jobs": self.deleted_jobs,
                "fsync": "always" if self.fsync else "never"}

