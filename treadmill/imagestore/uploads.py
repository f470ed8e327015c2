"""Blob uploads: sessions on disk, request bodies streamed to them, atomic commits.

An upload session is a directory ``uploads/<uuid>/`` with ``state.json``
(its repository and start time) and ``data`` (the bytes received so far, in
order). A request body that adds to it (``POST``, ``PATCH``, ``PUT``) is
not buffered by twisted.web: :class:`BodySink` receives the chunks as they
arrive (see ``RegistryRequest`` in :mod:`~treadmill.imagestore.site`) and
hands them, in batches, to a thread of the store's pool that appends them
to ``data`` and feeds the running sha256. At most one batch per upload is in
flight; while more than :data:`HIGH_WATER` bytes wait, the sink pauses the
connection's transport (TCP backpressure) and resumes it below
:data:`LOW_WATER`, so the store's memory does not grow with the blob.

The running hash lives in memory (``hashlib`` cannot persist its state).
After a restart, a session is resumed by re-hashing its ``data`` in a
thread before the next chunk is appended; a connection dropped mid-request
keeps the bytes that arrived, and the client asks ``GET`` for the new
offset and carries on.

A commit (``PUT …?digest=``) checks the digest and the size against what was
received *before* anything becomes visible, fsyncs ``data``, and hard-links
it to ``blobs/sha256/<hh>/<hex>`` (atomic; if the blob is already there the
upload is simply dropped, so two clients uploading one blob at once end with
one correct blob), fsyncs the directory, links the blob into the repository,
then removes the session. A store killed at any point leaves either no blob
or a complete one; sessions idle for ``uploads.max_age`` are removed at
start and periodically.

Limits: each session belongs to the token subject that opened it (kept in
``state.json``); one subject may hold ``quota.uploads_per_subject`` open
sessions (``429 TOOMANYREQUESTS`` beyond, :meth:`Uploads.check_sessions`).
The bytes a session has received are charged to its repository's namespace
(:class:`~treadmill.imagestore.quota.Ledger`), each batch before it is
written, and freed by its commit, cancel or expiry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from treadmill.common.files import write_all
from treadmill.images.oci import is_repository
from treadmill.imagestore.errors import OCIError
from treadmill.imagestore.gc import SharedExclusiveLock, under_lock
from treadmill.imagestore.names import UPLOAD_ID
from treadmill.imagestore.quota import Ledger
from treadmill.imagestore.storage import Storage

#: Bytes queued for the disk before the connection is paused.
HIGH_WATER = 4 * 1024 * 1024
#: Bytes queued for the disk below which a paused connection resumes.
LOW_WATER = 1 * 1024 * 1024
_REHASH_BLOCK = 1024 * 1024


class Upload:
    """One upload session."""

    def __init__(self, upload_id: str, repository: str, directory: str, *, size: int,
                 started: float, updated: float, hasher: Any = None,
                 subject: str | None = None):
        self.id = upload_id
        self.repository = repository
        # Who opened it (the token's ``sub``; None without authentication): the
        # per-subject session limit counts it.
        self.subject = subject
        self.directory = directory
        self.size = size
        self.started = started
        self.updated = updated
        # None: the hash of ``data`` must be recomputed before appending (after a restart).
        self.hasher = hasher
        self.holder: Any = None  # the BodySink writing to it, if any
        self.gone = False
        self._idle: list[Deferred[None]] = []

    @property
    def data_path(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def range_header(self) -> str:
        """The OCI ``Range`` of the bytes received (``0-0`` when there are none)."""
        return f"0-{max(self.size - 1, 0)}"

    def wait_idle(self) -> Deferred[None]:
        if self.holder is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def release(self, holder: Any) -> None:
        if self.holder is not holder:
            return
        self.holder = None
        waiters, self._idle = self._idle, []
        for d in waiters:
            d.callback(None)


class BodySink:
    """Receives one request body and streams it into an upload, with backpressure.

    Chunks written before the upload is known (while the request is being
    authorised and its session looked up) wait in memory, within the same
    bounds. After :meth:`fail` the rest of the body is read and dropped.
    """

    log = Logger()

    def __init__(self, producer: IPushProducer | None, *, high: int = HIGH_WATER,
                 low: int = LOW_WATER):
        self.producer = producer
        self.high = high
        self.low = low
        self.upload: Upload | None = None
        self.plan: dict[str, Any] = {}
        self.received = 0
        self.written = 0
        self.receiving = True
        self.aborted = False
        self.error: OCIError | None = None
        self._append: Callable[[list[bytes]], Deferred[int]] | None = None
        self._pending: list[bytes] = []
        self._queued = 0  # pending + in flight
        self._inflight = False
        self._paused = False
        self._discarding = False
        self._outcome: Any = None
        self._done = False
        self._waiters: list[Deferred[Upload | None]] = []
        self._on_abort: list[Callable[[BodySink], Any]] = []
        self._release = False

    # -- from the request ------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.error is not None or self._discarding:
            return
        self._pending.append(data)
        self._queued += len(data)
        if self._queued > self.high and not self._paused and self.producer is not None \
                and self.receiving:
            self._paused = True
            self.producer.pauseProducing()
        self._pump()

    def finish(self) -> None:
        """The whole body has arrived."""
        self.receiving = False
        self._pump()

    def abort(self) -> None:
        """The connection was lost before the body ended."""
        if not self.receiving:
            return
        self.receiving = False
        self.aborted = True
        self.producer = None
        self._pump()

    # -- from the preparation ----------------------------------------------------

    def attach(self, upload: Upload, append: Callable[[list[bytes]], Deferred[int]]) -> None:
        """Start writing to ``upload`` (which this sink holds)."""
        self.upload = upload
        self._append = append
        self._pump()

    def discard(self) -> None:
        """Drop the body (a request that needs none, such as a mount)."""
        self._discarding = True
        self._drop_pending()
        self._pump()

    def fail(self, error: OCIError | Failure) -> None:
        """Refuse the request: drop the body and answer ``error`` once it has arrived."""
        if isinstance(error, Failure):
            if error.check(OCIError):
                error = error.value
            else:
                self.log.failure("Preparing an upload failed", error)
                error = OCIError("UNKNOWN", "internal error")
        if self.error is None:
            self.error = error
        self._drop_pending()
        self._pump()

    def on_abort(self, callback: Callable[[BodySink], Any]) -> None:
        """Call ``callback(sink)`` once an aborted body has been written (or dropped)."""
        self._on_abort.append(callback)

    # -- to the handler ------------------------------------------------------------

    def result(self) -> Deferred[Upload | None]:
        """Fires once the body has arrived and is on disk: the upload, or the error."""
        d: Deferred[Upload | None] = Deferred()
        if self._done:
            d.callback(self._outcome)
        else:
            self._waiters.append(d)
        return d

    def release(self) -> None:
        """The handler is done with the upload (effective once every write is on disk)."""
        self._release = True
        if self._done and self.upload is not None:
            self.upload.release(self)

    # -- internals -------------------------------------------------------------------

    def _drop_pending(self) -> None:
        if not self._inflight:
            self._pending.clear()
            self._queued = 0
        else:
            self._queued -= sum(len(c) for c in self._pending)
            self._pending.clear()
        self._maybe_resume(force=True)

    def _maybe_resume(self, force: bool = False) -> None:
        if self._paused and (force or self._queued < self.low):
            self._paused = False
            if self.producer is not None:
                self.producer.resumeProducing()

    def _pump(self) -> None:
        if self._done:
            return
        if (self._append is not None and self.error is None and not self._inflight
                and self._pending):
            batch, self._pending = self._pending, []
            self._inflight = True
            size = sum(len(c) for c in batch)
            self._append(batch).addCallbacks(self._written, self._write_failed,
                                             callbackArgs=(size,), errbackArgs=(size,))
            return
        if self.receiving or self._inflight:
            return
        if self.error is None and not self._discarding:
            if self._append is None:
                return  # still being prepared
            if self._pending:
                return
        self._complete()

    def _written(self, count: int, size: int) -> None:
        self._inflight = False
        self._queued -= size
        self.written += count
        self._maybe_resume()
        self._pump()

    def _write_failed(self, failure: Failure, size: int) -> None:
        self._inflight = False
        self._queued -= size
        if failure.check(OCIError):
            self.fail(failure)
        else:
            self.log.failure("Writing an upload failed", failure)
            reason = getattr(failure.value, "strerror", None) or type(failure.value).__name__
            self.fail(OCIError("BLOB_UPLOAD_INVALID", f"cannot store the upload: {reason}",
                               status=500))

    def _complete(self) -> None:
        self._done = True
        self._maybe_resume(force=True)
        self._outcome = Failure(self.error) if self.error is not None else self.upload
        if self.aborted or self.error is not None:
            # Nobody will commit: let the next request have the upload.
            self._release = True
        if self._release and self.upload is not None:
            self.upload.release(self)
        if self.aborted:
            for callback in self._on_abort:
                try:
                    callback(self)
                except Exception:
                    self.log.failure("Upload abort hook failed")
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self._outcome)


@dataclass(eq=False)
class Uploads:
    """The upload sessions of a store."""

    log = Logger()

    reactor: Any
    storage: Storage
    pool: Any
    lock: SharedExclusiveLock
    _: KW_ONLY
    max_age: float = 3600.0
    # Byte quotas (None: none) and the open sessions one subject may have (0: any).
    ledger: Ledger | None = None
    per_subject: int = 0
    refused_sessions: int = field(default=0, init=False)
    active: dict[str, Upload] = field(default_factory=dict, init=False)
    bytes_received: int = field(default=0, init=False)
    committed: int = field(default=0, init=False)
    # Told ``(digest, size, new)`` after each commit (the image cache's accounting).
    on_commit: Callable[[str, int, bool], None] | None = field(default=None, init=False)

    def _thread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    # -- sessions --------------------------------------------------------------

    def _create(self, upload_id: str, repository: str, now: float,
                subject: str | None) -> str:
        directory = self.storage.upload_dir(upload_id)
        os.mkdir(directory, 0o700)
        with open(os.path.join(directory, "data"), "xb"):
            pass
        state = {"id": upload_id, "repository": repository, "started": now,
                 "subject": subject}
        with open(os.path.join(directory, "state.json"), "x") as f:
            json.dump(state, f)
        return directory

    @property
    def expiry_interval(self) -> float:
        """Seconds between runs of :meth:`expire`: ``max_age/4``, within 1 s and 1 h."""
        return max(1.0, min(3600.0, self.max_age / 4))

    def sessions_of(self, subject: str | None) -> list[Upload]:
        """The open sessions ``subject`` started."""
        return [u for u in self.active.values() if u.subject == subject and not u.gone]

    def check_sessions(self, subject: str | None) -> None:
        """Raise ``429 TOOMANYREQUESTS`` if ``subject`` may not open another session.

        ``Retry-After`` says when the expiry will have removed its longest-idle
        session (the subject may also finish or cancel one, ``DELETE``, at once).
        """
        if self.per_subject <= 0:
            return
        sessions = self.sessions_of(subject)
        if len(sessions) < self.per_subject:
            return
        now = self.reactor.seconds()
        first = min(u.updated for u in sessions) + self.max_age
        wait = max(1, min(math.ceil(first - now), math.ceil(self.max_age))
                   + math.ceil(self.expiry_interval))
        self.refused_sessions += 1
        who = f"subject {subject}" if subject is not None else "anonymous clients"
        self.log.info("Quota: refused an upload session to {who} ({count} open)", who=who,
                      count=len(sessions))
        raise OCIError(
            "TOOMANYREQUESTS",
            f"too many open upload sessions: {who} has {len(sessions)} of the "
            f"{self.per_subject} allowed (quota.uploads_per_subject); finish or cancel "
            f"one (DELETE its Location), or retry after {wait} s when an idle one expires",
            detail={"subject": subject, "open": len(sessions), "limit": self.per_subject},
            headers={"Retry-After": str(wait)})

    async def create(self, repository: str, subject: str | None = None) -> Upload:
        """A new session of ``repository`` for ``subject`` (``429`` beyond the limit)."""
        self.check_sessions(subject)
        upload_id = str(uuid.uuid4())
        now = self.reactor.seconds()
        directory = self.storage.upload_dir(upload_id)
        upload = Upload(upload_id, repository, directory, size=0, started=now, updated=now,
                        hasher=hashlib.sha256(), subject=subject)
        # Counted from now on, so that concurrent requests cannot overshoot the limit.
        self.active[upload_id] = upload
        try:
            await self._thread(self._create, upload_id, repository, now, subject)
        except BaseException:
            upload.gone = True
            self.active.pop(upload_id, None)
            raise
        if self.ledger is not None:
            self.ledger.set_upload(upload_id, repository, 0)
        return upload

    def _load(self, upload_id: str) -> Upload | None:
        directory = self.storage.upload_dir(upload_id)
        try:
            with open(os.path.join(directory, "state.json")) as f:
                state = json.load(f)
            st = os.stat(os.path.join(directory, "data"))
        except (OSError, ValueError):
            return None
        repository = state.get("repository") if isinstance(state, dict) else None
        started = state.get("started") if isinstance(state, dict) else None
        subject = state.get("subject") if isinstance(state, dict) else None
        if not isinstance(repository, str) or not is_repository(repository):
            return None
        if isinstance(started, bool) or not isinstance(started, int | float):
            started = st.st_mtime
        return Upload(upload_id, repository, directory, size=st.st_size, started=started,
                      updated=st.st_mtime, hasher=None,
                      subject=subject if isinstance(subject, str) else None)

    def _load_all(self) -> list[Upload]:
        try:
            entries = sorted(os.listdir(self.storage.uploads))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            if UPLOAD_ID.fullmatch(entry):
                upload = self._load(entry)
                if upload is not None:
                    found.append(upload)
        return found

    async def load(self) -> int:
        """Know every session on disk (at start, after :meth:`expire`): the session
        limits and the quotas count them. Returns how many."""
        found = await self._thread(self._load_all)
        for upload in found:
            if upload.id in self.active:
                continue
            self.active[upload.id] = upload
            if self.ledger is not None:
                self.ledger.set_upload(upload.id, upload.repository, upload.size)
        return len(found)

    def get(self, upload_id: str, repository: str) -> Upload:
        """The session ``upload_id`` of ``repository`` (loaded from disk after a restart).

        The lookup from disk is two small reads, done on the reactor thread so
        that one session never has two :class:`Upload` objects.
        """
        upload = self.active.get(upload_id)
        if upload is None and UPLOAD_ID.fullmatch(upload_id):
            upload = self._load(upload_id)
            if upload is not None:
                self.active[upload_id] = upload
                if self.ledger is not None:
                    self.ledger.set_upload(upload_id, upload.repository, upload.size)
        if upload is None or upload.gone or upload.repository != repository:
            raise OCIError("BLOB_UPLOAD_UNKNOWN", "unknown upload")
        return upload

    async def acquire(self, upload: Upload, holder: Any) -> None:
        """Hold ``upload`` for one request; another request still sending a body wins."""
        while upload.holder is not None:
            current = upload.holder
            if isinstance(current, BodySink) and current.receiving:
                raise OCIError("BLOB_UPLOAD_INVALID",
                               "another request is writing to this upload", status=416,
                               headers={"Range": upload.range_header})
            await upload.wait_idle()
        if upload.gone:
            raise OCIError("BLOB_UPLOAD_UNKNOWN", "unknown upload")
        upload.holder = holder
        if isinstance(holder, BodySink):
            holder.upload = upload

    async def settle(self, upload: Upload) -> None:
        """Wait until no body that has stopped arriving is still being written."""
        while (upload.holder is not None and not (isinstance(upload.holder, BodySink)
                                                  and upload.holder.receiving)):
            await upload.wait_idle()

    # -- writing ---------------------------------------------------------------

    def _rehash(self, upload: Upload) -> None:
        hasher = hashlib.sha256()
        size = 0
        with open(upload.data_path, "rb") as f:
            while True:
                block = f.read(_REHASH_BLOCK)
                if not block:
                    break
                hasher.update(block)
                size += len(block)
        upload.size = size
        upload.hasher = hasher

    async def ensure_hash(self, upload: Upload) -> None:
        """Re-hash ``data`` if its running hash is unknown (after a restart or an error)."""
        if upload.hasher is None:
            self.log.info("Re-hashing upload {id} ({size} bytes) to resume it",
                          id=upload.id, size=upload.size)
            await self._thread(self._rehash, upload)

    def _append(self, upload: Upload, chunks: list[bytes]) -> int:
        fd = os.open(upload.data_path, os.O_WRONLY | os.O_APPEND)
        written = 0
        try:
            for chunk in chunks:
                write_all(fd, chunk)
                upload.hasher.update(chunk)
                written += len(chunk)
        except BaseException:
            # The file and the hash may disagree now: re-hash before going on.
            upload.hasher = None
            with contextlib.suppress(OSError):
                upload.size = os.fstat(fd).st_size
            raise
        finally:
            os.close(fd)
        return written

    def appender(self, upload: Upload) -> Callable[[list[bytes]], Deferred[int]]:
        """The sink's writer for ``upload``: one batch at a time, in the pool."""

        def append(chunks: list[bytes]) -> Deferred[int]:
            if upload.gone:
                raise OCIError("BLOB_UPLOAD_UNKNOWN", "the upload was cancelled")
            ledger = self.ledger
            if ledger is not None:
                # Charged before the write, atomically with the check: the batch that
                # would cross the namespace's limit is refused, nothing of it stored.
                ledger.reserve_upload(upload.id, upload.repository,
                                      sum(len(c) for c in chunks))
            d = self._thread(self._append, upload, chunks)

            def done(count: int) -> int:
                upload.size += count
                upload.updated = self.reactor.seconds()
                self.bytes_received += count
                return count

            def settle(result: Any) -> Any:
                # What is really in ``data`` now (a failed write may have stored part).
                if ledger is not None and not upload.gone:
                    ledger.set_upload(upload.id, upload.repository, upload.size)
                return result

            return d.addCallback(done).addBoth(settle)

        def safe(chunks: list[bytes]) -> Deferred[int]:
            # Never raise: the sink waits for this Deferred (an exception would leave it
            # waiting forever, and the request with it).
            try:
                return append(chunks)
            except Exception:
                return fail()

        return safe

    # -- commit, cancel, expiry -----------------------------------------------------

    def _commit(self, upload: Upload, digest: str) -> bool:
        st = os.stat(upload.data_path)
        if st.st_size != upload.size or upload.hasher is None:
            raise OCIError("BLOB_UPLOAD_INVALID", "the upload's data changed on disk")
        actual = "sha256:" + upload.hasher.hexdigest()
        if actual != digest:
            raise OCIError("DIGEST_INVALID", "the content does not match the digest",
                           detail={"expected": digest, "size": upload.size})
        fd = os.open(upload.data_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        new = self.storage.commit_file(upload.data_path, digest)
        self.storage.link_blob(upload.repository, digest)
        self.storage.remove_upload(upload.id)
        if self.ledger is not None:
            self.ledger.drop_upload(upload.id)
        return new

    async def commit(self, upload: Upload, digest: str) -> bool:
        """Verify and publish the upload as blob ``digest``; True if the blob is new.

        A wrong digest removes the session (nothing becomes visible). The
        caller must hold the upload until this has finished: shield it from
        cancellation (:func:`~treadmill.imagestore.gc.shield`).
        """
        try:
            new = await under_lock(self.lock,
                                   lambda: self._thread(self._commit, upload, digest))
        except OCIError as e:
            if e.code == "DIGEST_INVALID":
                await self.cancel(upload)
            raise
        except FileNotFoundError:
            raise OCIError("BLOB_UPLOAD_UNKNOWN", "the upload was cancelled") from None
        upload.gone = True
        self.active.pop(upload.id, None)
        self.committed += 1
        if self.on_commit is not None:
            try:
                self.on_commit(digest, upload.size, new)
            except Exception:
                self.log.failure("Commit hook failed")
        return new

    async def cancel(self, upload: Upload) -> None:
        """Forget the session and delete its files (a request still writing fails)."""
        upload.gone = True
        self.active.pop(upload.id, None)
        await self._thread(self.storage.remove_upload, upload.id)
        if self.ledger is not None:
            self.ledger.drop_upload(upload.id)

    def _expired(self, cutoff: float, busy: set[str]) -> list[str]:
        removed = []
        try:
            entries = os.listdir(self.storage.uploads)
        except FileNotFoundError:
            return removed
        for entry in entries:
            if entry in busy:
                continue
            directory = os.path.join(self.storage.uploads, entry)
            newest = 0.0
            for name in ("data", "state.json", ""):
                with contextlib.suppress(OSError):
                    newest = max(newest, os.stat(os.path.join(directory, name)).st_mtime)
            if newest < cutoff or not UPLOAD_ID.fullmatch(entry):
                _remove_any(directory)
                removed.append(entry)
        return removed

    async def expire(self) -> int:
        """Remove sessions idle for longer than ``max_age``; return how many."""
        now = self.reactor.seconds()
        cutoff = now - self.max_age
        busy = {uid for uid, u in self.active.items()
                if u.holder is not None or u.updated >= cutoff}
        removed = await self._thread(self._expired, cutoff, busy)
        for uid in removed:
            upload = self.active.pop(uid, None)
            if upload is not None:
                upload.gone = True
            if self.ledger is not None:
                self.ledger.drop_upload(uid)
        if removed:
            self.log.info("Removed {count} expired uploads", count=len(removed))
        return len(removed)


def _remove_any(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)

