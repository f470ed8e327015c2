"""The image cache's own HTTP API: ``/cache/leases``, ``/cache/replicate``, ``/admin/evict``.

The routes live in :class:`~treadmill.imagestore.api.RegistryAPI` (one Klein
app); they call :class:`CacheRoutes`, which is given the authorizer and the
cache, parses bodies, authorises and answers JSON
(:func:`treadmill.common.http.respond`). Errors use the store's OCI error
shape. ``docs/imagestore.md`` documents the API.
"""

from __future__ import annotations

import json
import math
from typing import Any

from twisted.internet.defer import TimeoutError
from twisted.web.iweb import IRequest

from treadmill.common.http import respond
from treadmill.images.oci import check_store_url
from treadmill.imagestore.auth import Authorizer
from treadmill.imagestore.cache import Cache, url_under
from treadmill.imagestore.errors import OCIError
from treadmill.imagestore.leases import DIGESTS_MAX, HOLDER_MAX, LEASE_ID, rfc3339
from treadmill.imagestore.names import check_digest, check_name, check_reference

MAX_WAIT = 300.0
LEASE_GRANT = ("cache", "leases", "lease")
REPLICATE_GRANT = ("cache", "replicate", "*")


def _invalid(message: str) -> OCIError:
    return OCIError("REQUEST_INVALID", message)


def _number(value: Any, what: str, *, minimum: float = 0.0, maximum: float | None = None
            ) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(f"{what} must be a number")
    if value < minimum or (maximum is not None and value > maximum):
        raise _invalid(f"{what} must be between {minimum:g} and {maximum:g}"
                       if maximum is not None else f"{what} must be at least {minimum:g}")
    return float(value)


def _wait_arg(request: IRequest) -> float:
    values = request.args.get(b"wait")
    if not values:
        return 0.0
    try:
        seconds = float(values[-1].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise _invalid("wait must be a number of seconds") from None
    return _number(seconds, "wait", maximum=MAX_WAIT)


class CacheRoutes:
    """Handlers of the cache's routes (see the module docstring)."""

    def __init__(self, auth: Authorizer, cache: Cache):
        self.auth = auth
        self.cache = cache

    # -- helpers --------------------------------------------------------------------

    def _body(self, request: IRequest) -> dict[str, Any]:
        if getattr(request, "too_large", False):
            raise OCIError("SIZE_INVALID", "request body too large", status=413)
        raw = request.content.read() if request.content is not None else b""
        try:
            value = json.loads(raw or b"null")
        except (UnicodeDecodeError, ValueError):
            raise _invalid("the body must be a JSON object") from None
        if not isinstance(value, dict):
            raise _invalid("the body must be a JSON object")
        return value

    # -- leases ---------------------------------------------------------------------

    async def post_lease(self, request: IRequest) -> bytes:
        body = self._body(request)
        repository = body.get("repository")
        if repository is not None:
            if not isinstance(repository, str):
                raise _invalid("repository must be a string")
            repository = check_name(repository)
        grants = [LEASE_GRANT]
        if repository is not None:
            grants.append(("repository", repository, "pull"))
        index, claims = self.auth.require_one(request, grants)
        lease_id = body.get("lease")
        if lease_id is not None and (not isinstance(lease_id, str)
                                     or not LEASE_ID.fullmatch(lease_id)):
            raise _invalid("lease must be 1-128 characters of [A-Za-z0-9._-], starting with "
                           "a letter or digit")
        holder = body.get("holder")
        if not isinstance(holder, str) or not holder or len(holder) > HOLDER_MAX \
                or not holder.isprintable():
            raise _invalid(f"holder must be a printable string of 1-{HOLDER_MAX} characters "
                           "(a host or job id)")
        digests = body.get("digests")
        if digests is not None:
            if not isinstance(digests, list) or not 0 < len(digests) <= DIGESTS_MAX \
                    or not all(isinstance(d, str) for d in digests):
                raise _invalid(f"digests must be a list of 1-{DIGESTS_MAX} digests")
            digests = list(dict.fromkeys(check_digest(d) for d in digests))
        ttl = body.get("ttl")
        if ttl is not None:
            ttl = _number(ttl, "ttl", minimum=1.0)
        fetch = body.get("fetch", repository is not None)
        if not isinstance(fetch, bool):
            raise _invalid("fetch must be a boolean")
        if fetch and repository is None:
            raise _invalid("fetch needs a repository to fetch from")
        wait = _number(body.get("wait", 0), "wait", maximum=MAX_WAIT)
        lease, created = await self.cache.put_lease(
            lease_id=lease_id, holder=holder, digests=digests, ttl=ttl,
            repository=repository, owner=claims.subject if claims is not None else None,
            owner_bound=index == 1)
        if fetch:
            self.cache.start_fetch(lease)
            await self.cache.wait_fetch(lease.id, wait)
        status = await self.cache.lease_status(lease)
        request.setHeader(b"location", f"/cache/leases/{lease.id}".encode())
        return respond(request, status, 201 if created else 200)

    def _lease_for(self, request: IRequest, lease_id: str) -> Any:
        lease = self.cache.leases.get(lease_id, self.cache.now()) \
            if LEASE_ID.fullmatch(lease_id) else None
        grants = [LEASE_GRANT]
        if lease is not None and lease.repository is not None:
            grants.append(("repository", lease.repository, "pull"))
        index, claims = self.auth.require_one(request, grants)
        if lease is None:
            raise OCIError("LEASE_UNKNOWN", f"no lease {lease_id} (expired or deleted?)")
        if index == 1 and (claims is None or claims.subject != lease.owner):
            raise OCIError("DENIED", f"lease {lease_id} is not yours")
        return lease

    async def get_lease(self, request: IRequest, lease_id: str) -> bytes:
        lease = self._lease_for(request, lease_id)
        await self.cache.wait_fetch(lease.id, _wait_arg(request))
        return respond(request, await self.cache.lease_status(lease))

    async def delete_lease(self, request: IRequest, lease_id: str) -> bytes:
        lease = self._lease_for(request, lease_id)
        await self.cache.delete_lease(lease.id)
        request.setResponseCode(204)
        return b""

    def list_leases(self, request: IRequest) -> bytes:
        self.auth.require_one(request, [LEASE_GRANT])
        leases = sorted(self.cache.leases.active(self.cache.now()), key=lambda le: le.id)
        return respond(request, {"leases": [
            {"lease": le.id, "holder": le.holder, "digests": le.digests,
             "repository": le.repository, "expires_at": rfc3339(le.expires_at)}
            for le in leases]})

    # -- replication ------------------------------------------------------------------

    def post_replicate(self, request: IRequest) -> bytes:
        self.auth.require_one(request, [REPLICATE_GRANT])
        body = self._body(request)
        repository, reference = body.get("repository"), body.get("reference")
        target, target_repository = body.get("target"), body.get("target_repository")
        if not isinstance(repository, str) or not isinstance(reference, str):
            raise _invalid("repository and reference (a tag or digest) are required")
        repository = check_name(repository)
        check_reference(reference)
        if target_repository is None:
            target_repository = repository
        if not isinstance(target_repository, str):
            raise _invalid("target_repository must be a string")
        target_repository = check_name(target_repository)
        if not isinstance(target, str):
            raise _invalid("target (the URL of an image store) is required")
        try:
            target = check_store_url(target)
        except ValueError as e:
            raise _invalid(str(e)) from None
        allowed = self.cache.config.replicate_targets
        if allowed and not url_under(target, allowed):
            raise OCIError("DENIED", f"{target} is not among this cache's replication "
                           "targets (replicate.targets)")
        job = self.cache.replicator.start(repository, reference, target, target_repository)
        request.setHeader(b"location", f"/cache/replicate/{job.id}".encode())
        return respond(request, job.to_json(), 202)

    async def get_replicate(self, request: IRequest, job_id: str) -> bytes:
        self.auth.require_one(request, [REPLICATE_GRANT])
        job = self.cache.replicator.get(job_id)
        if job is None:
            raise OCIError("REPLICATION_UNKNOWN", f"no replication {job_id}")
        wait = _wait_arg(request)
        if wait > 0 and job.state == "running":
            d = job.finished.wait()
            d.addTimeout(wait, self.cache.reactor)
            try:
                await d
            except TimeoutError:
                pass
        return respond(request, job.to_json())

    # -- operators ----------------------------------------------------------------------

    async def evict(self, request: IRequest) -> bytes:
        self.auth.require(request, "registry", "gc", "*")
        return respond(request, await self.cache.maintain())
