"""Kept disks and snapshots: an ended job's overlay becomes a new image's top layer.

When a job ends and QEMU is gone, the driver moves the job's overlay out of
its work directory into ``qemu.kept_dir`` as ``JOB.qcow2`` (a rename), beside
``JOB.json``: what a snapshot needs (the job's image manifest and digest, its
repository, the top layer's digest and the local path of every layer). The
last ``qemu.keep_disks`` disks are kept, each for ``qemu.keep_time`` seconds
(a reactor timer; stale ones are removed at start-up), and the job image's
blobs stay pinned in the image fetcher meanwhile, so that the layers below
the overlay are still there when a snapshot uploads them.

A snapshot (:meth:`KeptDisks.snapshot`) rebases the kept overlay's own
backing-file field to ``disk-N.qcow2`` (its lower layer's file name in a
``tml image pull`` directory; QEMU ignores the field, the manifest chains by
digest), hashes it, and pushes the job's image plus that layer, annotated
``org.treadmill.qcow2.lower = <old top>``, as a new manifest.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from treadmill.images import format as fmt
from treadmill.images.oci import RegistryError, check_store_url, hash_file, repository_of
from treadmill.supervisor.drivers import SnapshotError
from treadmill.supervisor.drivers.qemu.command import rebase_command
from treadmill.supervisor.drivers.qemu.process import ToolError, run_tool
from treadmill.supervisor.drivers.qemu.settings import QemuSettings
from treadmill.supervisor.fetch import FetchedImage

__all__ = ["ANN_BASE_DIGEST", "KEPT_FORMAT", "KeptDisk", "KeptDisks", "disk_info",
           "snapshot_manifest"]

KEPT_FORMAT = 1
ANN_BASE_DIGEST = "org.opencontainers.image.base.digest"


def disk_info(job: Mapping[str, Any], fetched: FetchedImage) -> dict[str, Any] | None:
    """What a snapshot of ``job``'s disk needs (``JOB.json``); None without a qcow2 chain."""
    image = fetched.image
    if image.top is None:
        return None
    ref = dict(job.get("image") or {})
    name = ref.get("name") or fetched.name
    try:
        repository = repository_of(str(name)) if name else None
    except ValueError:
        repository = None
    return {"format": KEPT_FORMAT, "job": str(job["id"]), "image": ref,
            "digest": fetched.digest, "repository": repository, "top": image.top.digest,
            "manifest": base64.b64encode(fetched.manifest).decode("ascii"),
            "layers": dict(fetched.paths)}


def snapshot_manifest(manifest: bytes, layer: fmt.Blob) -> dict[str, Any]:
    """The job image's manifest plus ``layer`` as the new top of its qcow2 chain.

    Everything else is kept (kernel, initrd, firmware, command line, other
    annotations) but a ``subject``; ``org.opencontainers.image.base.digest``
    names the job's image. Raises :class:`~treadmill.images.format.ManifestError`.
    """
    old = fmt.load_manifest(manifest)
    image = fmt.parse_image(old)
    if image.kind != "qemu" or image.top is None:
        raise fmt.ManifestError(fmt.MANIFEST_INVALID, "not a QEMU image with a qcow2 chain")
    layers = [dict(d) for d in old["layers"]]
    last = max(i for i, d in enumerate(layers) if d.get("mediaType") == fmt.MT_QCOW2)
    layers.insert(last + 1, {"mediaType": fmt.MT_QCOW2, "digest": layer.digest,
                             "size": layer.size,
                             "annotations": {fmt.ANN_LOWER: image.top.digest}})
    new = {k: v for k, v in old.items() if k != "subject"}
    new["layers"] = layers
    new["annotations"] = {**(old.get("annotations") or {}),
                          ANN_BASE_DIGEST: fmt.digest_of(manifest)}
    fmt.parse_image(new)  # raises if it would not validate
    return new


@dataclass(eq=False)
class KeptDisk:
    """One ended job's disk in ``qemu.kept_dir``."""

    job_id: str
    path: str  # kept_dir/JOB.qcow2
    info: dict[str, Any]
    kept_at: float
    timer: Any = None
    busy: int = 0  # snapshots under way
    dropped: bool = False  # no longer offered; deleted once not busy
    layer: fmt.Blob | None = None  # the rebased disk's digest and size, once known
    lock: DeferredLock = field(default_factory=DeferredLock)

    @property
    def pinned(self) -> list[str]:
        return [str(self.info["digest"]), *self.info["layers"]]

    @property
    def manifest(self) -> bytes:
        return base64.b64decode(self.info["manifest"])


class KeptDisks:
    """The kept disks of a QEMU driver, and snapshots made from them.

    ``fetcher`` is the supervisor's :class:`~treadmill.supervisor.fetch.ImageFetcher`
    (``pin``, ``release_digests``, ``registry_client``); ``in_thread`` runs
    blocking file work off the reactor.
    """

    log = Logger()

    def __init__(self, reactor: Any, settings: QemuSettings, fetcher: Any,
                 in_thread: Callable[..., Deferred[Any]]):
        self.reactor = reactor
        self.settings = settings
        self.fetcher = fetcher
        self.in_thread = in_thread
        self.dir = settings.kept_dir
        self.disks: dict[str, KeptDisk] = {}  # oldest first
        self._restored: Deferred[None] | None = None

    # -- keeping ---------------------------------------------------------------------

    def restore(self) -> Deferred[None]:
        """At start-up: take over the disks a previous run kept that are still fresh,
        delete the others (and any half-kept leftovers)."""
        if self._restored is None:
            self._restored = Deferred.fromCoroutine(self._restore())
            self._restored.addErrback(lambda f: self.log.failure(
                "qemu: restoring kept disks from {dir}", f, dir=self.dir))
        return self._restored

    async def _restore(self) -> None:
        found, junk = await self.in_thread(_scan, self.dir)
        now = self.reactor.seconds()
        fresh = sorted(((info["kept_at"], job, info) for job, info in found.items()
                        if info is not None and now - info["kept_at"] < self.settings.keep_time),
                       key=lambda t: t[0])
        keep = fresh[len(fresh) - self.settings.keep_disks:] if self.settings.keep_disks else []
        kept = {job for _, job, _ in keep}
        stale = [job for job in found if job not in kept and job not in self.disks]
        if stale or junk:
            self.log.info("qemu: removing {count} stale kept disks from {dir}",
                          count=len(stale), dir=self.dir)
            await self.in_thread(_remove, self.dir, stale, junk)
        for kept_at, job, info in keep:
            if job not in self.disks:
                self._add(job, info, kept_at)
        await self._limit()

    async def keep(self, job_id: str, overlay: str, info: dict[str, Any]) -> KeptDisk | None:
        """Move a job's ``overlay`` (QEMU is gone) into the kept directory with ``info``
        (from :func:`disk_info`); None when disks are not kept or there is no overlay."""
        if self.settings.keep_disks <= 0:
            return None
        await self.restore()
        kept_at = self.reactor.seconds()
        info = {**info, "kept_at": kept_at}
        path = await self.in_thread(_move_in, overlay, self.dir, job_id, info)
        if path is None:
            return None
        old = self.disks.pop(job_id, None)
        if old is not None:
            self._drop(old, "kept again", delete=False)
        disk = self._add(job_id, info, kept_at)
        self.log.info("qemu: job {job}: disk kept as {path} for {seconds:g} s (snapshots)",
                      job=job_id, path=path, seconds=self.settings.keep_time)
        await self._limit()
        return disk

    def _add(self, job_id: str, info: dict[str, Any], kept_at: float) -> KeptDisk:
        disk = KeptDisk(job_id, os.path.join(self.dir, f"{job_id}.qcow2"), info, kept_at)
        if self.fetcher is not None:
            self.fetcher.pin(disk.pinned, image=info.get("image") or None)
        left = max(0.0, kept_at + self.settings.keep_time - self.reactor.seconds())
        disk.timer = self.reactor.callLater(left, self._expired, disk)
        self.disks[job_id] = disk
        return disk

    async def _limit(self) -> None:
        deleting = []
        while len(self.disks) > self.settings.keep_disks:
            oldest = next(iter(self.disks.values()))
            d = self._drop(oldest, f"more than qemu.keep_disks ({self.settings.keep_disks})")
            if d is not None:
                deleting.append(d)
        for d in deleting:
            await d

    def _expired(self, disk: KeptDisk) -> None:
        disk.timer = None
        self._drop(disk, f"kept for qemu.keep_time ({self.settings.keep_time:g} s)")

    def _drop(self, disk: KeptDisk, why: str, delete: bool = True) -> Deferred[None] | None:
        """Offer ``disk`` no more; delete it (now, or after the snapshots under way).
        Returns the deletion's Deferred if it began (it never fails)."""
        if self.disks.get(disk.job_id) is disk:
            del self.disks[disk.job_id]
        if disk.timer is not None and disk.timer.active():
            disk.timer.cancel()
        disk.timer = None
        if disk.dropped:
            return None
        disk.dropped = True
        if self.fetcher is not None:
            self.fetcher.release_digests(disk.pinned)
        self.log.info("qemu: job {job}: kept disk dropped ({why})", job=disk.job_id, why=why)
        if delete and not disk.busy:
            return self._delete(disk)
        return None

    def _delete(self, disk: KeptDisk) -> Deferred[None] | None:
        if disk.job_id in self.disks:  # kept again meanwhile: the files are the new ones
            return None
        d: Deferred[None] = self.in_thread(_remove, self.dir, [disk.job_id], [])
        return d.addErrback(lambda f: self.log.failure("qemu: deleting the kept disk of {job}",
                                                       f, job=disk.job_id))

    def get(self, job_id: str) -> KeptDisk | None:
        return self.disks.get(job_id)

    def close(self) -> None:
        """The supervisor stops: stop the timers, keep the files (restored at the next start)."""
        for disk in self.disks.values():
            if disk.timer is not None and disk.timer.active():
                disk.timer.cancel()
            disk.timer = None

    # -- snapshots -------------------------------------------------------------------

    async def snapshot(self, job_id: str, repository: str, store: str) -> str:
        """Push job ``job_id``'s kept disk as a new image; the manifest's digest."""
        await self.restore()
        disk = self.disks.get(job_id)
        if disk is None:
            raise SnapshotError("unknown_job", f"no disk of job {job_id} is kept on this host "
                                f"(the last {self.settings.keep_disks} jobs' disks are kept "
                                f"for {self.settings.keep_time:g} s)")
        try:
            if repository_of(repository) != repository:
                raise ValueError(f"{repository!r} is not a repository name (lowercase)")
            store = check_store_url(store)
        except ValueError as e:
            raise SnapshotError("failed", str(e)) from None
        if self.fetcher is None:
            raise SnapshotError("failed", "qemu: the supervisor has no image fetcher")
        where = f"{store}/{repository}"
        self.log.info("qemu: job {job}: snapshot into {where}", job=job_id, where=where)
        disk.busy += 1
        try:
            layer = await self._prepare(disk)
            manifest = fmt.manifest_bytes(snapshot_manifest(disk.manifest, layer))
            digest = await self._upload(disk, layer, manifest, repository, store)
        except ToolError as e:
            raise SnapshotError("failed", f"snapshot of job {job_id}: {e}") from None
        except fmt.ManifestError as e:
            raise SnapshotError("failed", f"snapshot of job {job_id}: the new manifest is "
                                f"invalid: {e.message}") from None
        except RegistryError as e:
            raise SnapshotError("failed", f"snapshot of job {job_id}: uploading to {where}: "
                                f"{e.message}") from None
        except OSError as e:
            raise SnapshotError("failed", f"snapshot of job {job_id}: {e.filename or ''}: "
                                f"{e.strerror or e}") from None
        finally:
            disk.busy -= 1
            if disk.dropped and not disk.busy:
                self._delete(disk)
        self.log.info("qemu: job {job}: snapshot {digest} pushed to {where}", job=job_id,
                      digest=digest, where=where)
        return digest

    async def _prepare(self, disk: KeptDisk) -> fmt.Blob:
        """Rebase the kept overlay's backing-file field (once), then hash it."""
        await disk.lock.acquire()
        try:
            if disk.layer is None:
                lower = len(fmt.parse_image(fmt.load_manifest(disk.manifest)).qcow2) - 1
                await run_tool(self.reactor, rebase_command(self.settings, disk.path,
                                                            f"disk-{lower}.qcow2"),
                               "rebasing the kept disk")
                disk.layer = await self.in_thread(hash_file, disk.path)
            return disk.layer
        finally:
            disk.lock.release()

    async def _upload(self, disk: KeptDisk, layer: fmt.Blob, manifest: bytes,
                      repository: str, store: str) -> str:
        image = fmt.parse_image(fmt.load_manifest(disk.manifest))
        client = self.fetcher.registry_client(store)
        try:
            await client.push_bytes(repository, fmt.EMPTY_BLOB)
            done: set[str] = set()
            for _, desc in image.files():
                if desc.digest not in done:
                    done.add(desc.digest)
                    await client.push_file(repository, disk.info["layers"][desc.digest],
                                           blob=desc.blob)
            await client.push_file(repository, disk.path, blob=layer)
            return str(await client.put_manifest(repository, fmt.digest_of(manifest), manifest))
        finally:
            await client.close()


# -- blocking helpers (run in threads) ---------------------------------------------------


def _move_in(overlay: str, kept_dir: str, job_id: str, info: dict[str, Any]) -> str | None:
    """Rename ``overlay`` to ``kept_dir/JOB.qcow2``, then write ``JOB.json``."""
    if not os.path.isfile(overlay):
        return None
    os.makedirs(kept_dir, mode=0o700, exist_ok=True)
    path = os.path.join(kept_dir, f"{job_id}.qcow2")
    shutil.move(overlay, path)  # a rename on the same file system
    meta = os.path.join(kept_dir, f"{job_id}.json")
    try:
        with open(meta + ".tmp", "w") as f:
            json.dump(info, f)
        os.replace(meta + ".tmp", meta)
    except BaseException:
        _remove(kept_dir, [job_id], [meta + ".tmp"])
        raise
    return path


def _valid(job: str, info: Any) -> bool:
    return (isinstance(info, dict) and info.get("job") == job
            and info.get("format") == KEPT_FORMAT
            and isinstance(info.get("kept_at"), (int, float))
            and fmt.is_digest(info.get("digest")) and isinstance(info.get("manifest"), str)
            and isinstance(info.get("layers"), dict))


def _scan(kept_dir: str) -> tuple[dict[str, dict[str, Any] | None], list[str]]:
    """``({job: its info, or None if unusable}, [other files])``."""
    try:
        names = os.listdir(kept_dir)
    except FileNotFoundError:
        return {}, []
    found: dict[str, dict[str, Any] | None] = {}
    junk = []
    for name in names:
        job, ext = os.path.splitext(name)
        if ext not in (".json", ".qcow2"):
            junk.append(os.path.join(kept_dir, name))
            continue
        found.setdefault(job, None)
    for job in found:
        if not os.path.isfile(os.path.join(kept_dir, f"{job}.qcow2")):
            continue
        try:
            with open(os.path.join(kept_dir, f"{job}.json")) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if _valid(job, info):
            found[job] = info
    return found, junk


def _remove(kept_dir: str, jobs: list[str], files: list[str]) -> None:
    paths = [*files]
    for job in jobs:
        paths += [os.path.join(kept_dir, f"{job}.json"), os.path.join(kept_dir, f"{job}.qcow2")]
    for path in paths:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
