"""Replication: an image cache uploads an image to another store.

``POST /cache/replicate`` starts a job and answers at once; ``GET
/cache/replicate/<id>`` reports it. A job:

1. resolves the manifest (pulling it through from the upstreams if the
   cache lacks it) and, for an index, every child manifest;
2. makes sure every blob they need is in the cache (pulling through what is
   missing) and pins them, so that eviction leaves them alone meanwhile;
3. uploads with :class:`treadmill.images.oci.RegistryClient` to the
   target: a blob ``HEAD`` first (a blob the target has is skipped), then a
   monolithic or chunked upload (``replicate.chunk_size``), resumed after a
   failure; child manifests by digest, then the manifest by the tag it was
   asked by (or by digest).

The :class:`Replicator` is given what it uses, not the cache: the storage,
the pull-through, the manifest lookup, pin/unpin and ``connect`` (a client
for a target, with the credentials of the settings: ``replicate.token``, or
``replicate.user`` + ``replicate.token_file`` for the registry token flow).
Jobs live in memory: a restart forgets them (a repeated request is cheap,
since blobs the target has are skipped).
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from treadmill.images.format import Blob
from treadmill.images.oci import RegistryClient, RegistryError
from treadmill.imagestore import manifests
from treadmill.imagestore.errors import OCIError
from treadmill.imagestore.leases import rfc3339
from treadmill.imagestore.names import check_reference
from treadmill.imagestore.pullthrough import Flight, PullThrough, UpstreamNotFound
from treadmill.imagestore.storage import Storage

#: A manifest's digest, media type and bytes, by repository and reference,
#: pulled through if need be (:meth:`treadmill.imagestore.cache.Cache.manifest_for`).
ManifestLookup = Callable[[str, str], Awaitable[tuple[str, str, bytes]]]

KEEP_FINISHED = 200


@dataclass
class Job:
    id: str
    repository: str
    reference: str
    target: str
    target_repository: str
    state: str = "running"  # running, done, failed
    manifest: str | None = None
    bytes_total: int = 0
    bytes_done: int = 0
    blobs_total: int = 0
    blobs_done: int = 0
    blobs_uploaded: int = 0
    manifests_total: int = 0
    error: str | None = None
    started_at: float = 0.0
    finished_at: float | None = None
    work: Deferred[Any] | None = field(default=None, repr=False)
    finished: Flight = field(default_factory=Flight, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "repository": self.repository,
                "reference": self.reference, "target": self.target,
                "target_repository": self.target_repository, "manifest": self.manifest,
                "bytes_total": self.bytes_total, "bytes_done": self.bytes_done,
                "blobs_total": self.blobs_total, "blobs_done": self.blobs_done,
                "blobs_uploaded": self.blobs_uploaded, "manifests": self.manifests_total,
                "error": self.error, "started_at": rfc3339(self.started_at),
                "finished_at": rfc3339(self.finished_at) if self.finished_at else None}


@dataclass
class _Plan:
    blobs: dict[str, int] = field(default_factory=dict)  # digest -> size, in upload order
    # (digest, media type, bytes) of child manifests, children before parents
    manifests: list[tuple[str, str, bytes]] = field(default_factory=list)


class Replicator:
    """Replication jobs of one cache.

    ``pin``/``unpin`` keep a blob from eviction while a job uses it;
    ``connect(url)`` gives a client for a target store.
    """

    log = Logger()

    def __init__(self, storage: Storage, pull: PullThrough, *, manifest_for: ManifestLookup,
                 pin: Callable[[str], None], unpin: Callable[[str], None],
                 connect: Callable[[str], RegistryClient]):
        self.storage = storage
        self.pull = pull
        self.manifest_for = manifest_for
        self.pin = pin
        self.unpin = unpin
        self.connect = connect
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def start(self, repository: str, reference: str, target: str,
              target_repository: str) -> Job:
        job = Job(str(uuid.uuid4()), repository, reference, target, target_repository,
                  started_at=time.time())
        self.jobs[job.id] = job
        self._trim()
        job.work = Deferred.fromCoroutine(self._run(job))
        job.work.addBoth(lambda _: job.finished.fire(job))
        return job

    def _trim(self) -> None:
        finished = [j for j in self.jobs.values() if j.state != "running"]
        for job in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self.jobs[job.id]

    def stop(self) -> None:
        for job in self.jobs.values():
            if job.work is not None and not job.work.called:
                job.work.cancel()

    async def _plan(self, job: Job, digest: str, media_type: str, body: bytes, plan: _Plan,
                    depth: int = 0) -> None:
        if depth > 8:
            raise OCIError("MANIFEST_INVALID", "manifests nest too deeply")
        try:
            manifest = json.loads(body)
        except ValueError:
            raise OCIError("MANIFEST_INVALID", f"manifest {digest} is not JSON") from None
        blobs, children = manifests.parts(manifest, media_type)
        sizes: dict[str, int] = {}
        for key in ("config", "layers", "blobs"):
            values = manifest.get(key)
            for desc in values if isinstance(values, list) else [values]:
                if isinstance(desc, dict) and isinstance(desc.get("size"), int):
                    sizes[str(desc.get("digest"))] = desc["size"]
        for child in children:
            _d, child_type, child_body = await self.manifest_for(job.repository, child)
            await self._plan(job, child, child_type, child_body, plan, depth + 1)
            plan.manifests.append((child, child_type, child_body))
        for blob in blobs:
            if blob not in plan.blobs:
                plan.blobs[blob] = sizes.get(blob, 0)

    async def _run(self, job: Job) -> None:
        pinned: list[str] = []
        client = None
        try:
            tag, _digest = check_reference(job.reference)
            digest, media_type, body = await self.manifest_for(job.repository, job.reference)
            job.manifest = digest
            plan = _Plan()
            await self._plan(job, digest, media_type, body, plan)
            job.blobs_total = len(plan.blobs)
            job.manifests_total = len(plan.manifests) + 1
            job.bytes_total = sum(plan.blobs.values())
            for d in [digest, *plan.blobs, *(m[0] for m in plan.manifests)]:
                self.pin(d)
                pinned.append(d)
            client = self.connect(job.target)
            done_before = 0
            for blob, size in plan.blobs.items():
                try:
                    await self.pull.ensure_blob(job.repository, blob)
                except UpstreamNotFound:
                    raise OCIError("BLOB_UNKNOWN", f"blob {blob} of {job.repository} is "
                                   "neither in the cache nor upstream") from None
                info = self.storage.blob_info(blob)
                if info is None:
                    raise OCIError("BLOB_UNKNOWN", f"blob {blob} vanished from the cache")
                if size != info.size:
                    job.bytes_total += info.size - size

                def progress(done: int, _total: int, base: int = done_before) -> None:
                    job.bytes_done = base + done

                _blob, uploaded = await client.push_file(
                    job.target_repository, info.path, Blob(blob, info.size), progress)
                done_before += info.size
                job.bytes_done = done_before
                job.blobs_done += 1
                job.blobs_uploaded += int(uploaded)
            for child, child_type, child_body in plan.manifests:
                await client.put_manifest(job.target_repository, child, child_body, child_type)
            await client.put_manifest(job.target_repository, tag or digest, body, media_type)
            job.state = "done"
            self.log.info("Replicated {repo}:{ref} ({digest}) to {target}/{trepo}: {n} blobs, "
                          "{up} uploaded", repo=job.repository, ref=job.reference, digest=digest,
                          target=job.target, trepo=job.target_repository, n=job.blobs_total,
                          up=job.blobs_uploaded)
        except CancelledError:
            job.state, job.error = "failed", "cancelled (the cache stopped)"
        except OCIError as e:
            job.state, job.error = "failed", f"{e.code}: {e.message}"
        except UpstreamNotFound:
            job.state = "failed"
            job.error = f"MANIFEST_UNKNOWN: {job.repository}:{job.reference} is neither in " \
                        "the cache nor upstream"
        except RegistryError as e:
            job.state = "failed"
            job.error = f"the target refused: {e.code}: {e.message}" if e.status \
                else f"the target is unreachable: {e.message}"
        except Exception as e:
            self.log.failure("Replication {id} failed", id=job.id)
            job.state, job.error = "failed", f"internal error: {type(e).__name__}: {e}"
        finally:
            for d in pinned:
                self.unpin(d)
            if client is not None:
                await client.close()
            job.finished_at = time.time()
        if job.state == "failed":
            self.log.warn("Replication of {repo}:{ref} to {target} failed: {error}",
                          repo=job.repository, ref=job.reference, target=job.target,
                          error=job.error)
