"""Jobs (``/api/v1/jobs``): enqueued, listed, read, stopped, extended, and the
tokens for their logs and consoles."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import jwt
from twisted.web.iweb import IRequest

from treadmill.common.captoken import MAX_TTL, Access
from treadmill.common.http import ApiError, query_arg, read_json, respond
from treadmill.protocol.supervisor import RESERVATION_PARAMETER
from treadmill.switchboard import schemas, views
from treadmill.switchboard.access import Principal, effective
from treadmill.switchboard.api.args import (
    console_patterns,
    decode_cursor,
    dumps_canonical,
    encode_cursor,
    idempotency_key,
    int_arg,
    prefix_range,
    uuid_arg,
)
from treadmill.switchboard.api.base import Routes
from treadmill.switchboard.jobstart import TOKEN_SLACK
from treadmill.switchboard.jobstate import Reason, State
from treadmill.switchboard.store.errors import Conflict, NotFound
from treadmill.switchboard.store.jobs import JobSpec

app = Routes.app


class JobRoutes(Routes):
    """Jobs as their owners, grantees and admins see and change them."""

    @app.route("/api/v1/jobs", methods=["POST"])
    async def enqueue(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        body = read_json(request, schemas.JOB_CREATE)
        key = idempotency_key(request)
        if key is None:
            spec = await self._job_spec(principal, body)
            row = await self.store.enqueue(principal.user_id, spec)
            return respond(request, views.job(row), 201)
        # A retry (same user, key and body) gets the first answer, not a second job.
        fingerprint = hashlib.sha256(dumps_canonical(body)).digest()
        answer = await self.store.remembered_job(principal.user_id, key, fingerprint)
        if answer is None:
            spec = await self._job_spec(principal, body)
            answer = await self.store.enqueue_once(principal.user_id, spec, key, fingerprint,
                                                   views.job)
        return respond(request, answer, 201)

    async def _job_spec(self, principal: Principal, body: dict[str, Any]) -> JobSpec:
        limits = self.limits
        timeout = body.get("timeout", limits.default_timeout)
        if timeout > limits.max_timeout:
            raise ApiError(400, f"timeout: at most {limits.max_timeout:g} seconds")
        hold = body.get("hold_on_failure")
        if hold is not None and hold > limits.max_hold:
            raise ApiError(400, f"hold_on_failure: at most {limits.max_hold:g} seconds")
        if hold is not None and timeout + hold > MAX_TTL - TOKEN_SLACK:
            # The host's tokens for the job (log shipping, tunnels) must outlive the hold.
            raise ApiError(400, "hold_on_failure: the job's timeout plus its hold may be at "
                           f"most {MAX_TTL - TOKEN_SLACK:g} seconds")
        queue_timeout = body.get("queue_timeout", limits.default_queue_timeout)
        if queue_timeout > limits.max_queue_timeout:
            raise ApiError(400, f"queue_timeout: at most {limits.max_queue_timeout:g} seconds")
        image = body.get("image") or (limits.reservation_image if body.get("reservation")
                                      else "")
        if not image:
            raise ApiError(400, "image: required" + (
                " (this switchboard boots no default image for reservations: "
                "jobs.reservation_image)" if body.get("reservation") else ""))
        name: str | None
        default_tags: list[str] = []
        image_results = None
        kind: str | None = None
        if image.startswith("sha256:"):
            name, digest = None, image
            usable = [row for row in await self.store.images_by_digest(digest, principal)
                      if "use" in effective("image", principal, row["owner_id"], row["grants"])]
            stores = sorted({store for row in usable for store in row["stores"]})
            kinds = {row["kind"] for row in usable} - {None}
            kind = kinds.pop() if len(kinds) == 1 else None  # unknown: any host
            # Stores are read by repository, and a host's registry token names its jobs'
            # images: the first usable entry (by name) that its namespace lends names it.
            for row in usable:
                if principal.admin or await self.store.image_lends(row["name"]):
                    name = row["name"]
                    break
        else:
            # An image that exists but is not the caller's to use answers exactly
            # like one that does not exist.
            refusal = ApiError(400, f"image: no image named {image!r} that you may use")
            try:
                row = await self.store.get_image(image, principal)
            except NotFound:
                raise refusal from None
            if "use" not in effective("image", principal, row["owner_id"], row["grants"]):
                raise refusal
            if not principal.admin and not await self.store.image_lends(row["name"]):
                raise ApiError(403, f"image: {row['name']!r} lies in another user's namespace "
                                    "that its owner may not write; an admin must move or "
                                    "re-register it")
            name, digest, stores = row["name"], row["digest"], row["stores"]
            default_tags, kind = row["host_tags"], row["kind"]
            image_results = row["results"]
        parameters = {key: {"value": p["value"], "secret": p.get("secret", False)}
                      for key, p in body.get("parameters", {}).items()}
        if RESERVATION_PARAMETER in parameters:
            raise ApiError(400, f"parameters.{RESERVATION_PARAMETER}: reserved; "
                                "ask for a reservation with \"reservation\": true")
        for key, p in parameters.items():
            if len(p["value"].encode("utf-8")) > 4096:
                raise ApiError(400, f"parameters.{key}.value: longer than 4 KiB in UTF-8")
        return JobSpec(image_name=name, image_digest=digest, image_stores=stores,
                       tags=body["tags"] if "tags" in body else default_tags,
                       parameters=parameters, timeout=timeout,
                       queue_timeout=queue_timeout, max_restarts=body.get("max_restarts", 0),
                       label=body.get("label", ""), log_servers=self._pick_log_servers(),
                       results=console_patterns(body) or image_results, image_kind=kind,
                       reservation=body.get("reservation", False), hold_on_failure=hold)

    def _pick_log_servers(self) -> tuple[str, ...]:
        """``log_replicas`` of the configured log servers, rotating the first choice."""
        servers = self.limits.log_servers
        if not servers:
            return ()
        self._log_rotation = (getattr(self, "_log_rotation", -1) + 1) % len(servers)
        count = min(self.limits.log_replicas, len(servers))
        return tuple(servers[(self._log_rotation + i) % len(servers)] for i in range(count))

    @app.route("/api/v1/jobs", methods=["GET"])
    async def list_jobs(self, request: IRequest) -> bytes:
        principal = await self.auth.principal(request)
        limit = int_arg(request, "limit", 100, 1, self.limits.max_page)
        try:
            states = [part.decode("utf-8") for value in request.args.get(b"state", [])
                      for part in value.split(b",")]
        except UnicodeDecodeError:
            raise ApiError(400, "state: not UTF-8") from None
        for state in states:
            if state not in State.__members__.values():
                raise ApiError(400, f"state: no state {state!r}")
        cursor = query_arg(request, "cursor")
        prefix = query_arg(request, "id_prefix")
        restart_of = query_arg(request, "restart_of")
        owner = query_arg(request, "owner")
        if owner is not None and not re.fullmatch(schemas.NAME_PATTERN, owner):
            raise ApiError(400, "owner: not a user name")
        rows = await self.store.list_jobs(
            principal, states=states, owner=owner,
            before_seq=decode_cursor(cursor) if cursor else None, limit=limit + 1,
            id_range=prefix_range(prefix) if prefix is not None else None,
            restart_of=uuid_arg(restart_of, "restart_of") if restart_of is not None else None)
        page = rows[:limit]
        body: dict[str, Any] = {"jobs": [views.job(row) for row in page]}
        if len(rows) > limit:
            body["next_cursor"] = encode_cursor(page[-1]["seq"])
        return respond(request, body)

    @app.route("/api/v1/jobs/<job_id>", methods=["GET"])
    async def show_job(self, request: IRequest, job_id: str) -> bytes:
        _, row = await self._job(request, job_id, "read")
        return respond(request, views.job(row))

    @app.route("/api/v1/jobs/<job_id>/terminate", methods=["POST"])
    async def terminate(self, request: IRequest, job_id: str) -> bytes:
        principal, row = await self._job(request, job_id, "stop")
        if row["state"] == State.TERMINATED.value and row["held_until"] is not None:
            # An ended job's held host (docs/jobs.md): the cancel releases it.
            await self.store.audited(
                lambda store: store.release_hold(row["id"]),
                lambda changed: self.audit.entry(request, principal, "job.cancel", "job",
                                                 row["id"], subject_user=row["owner"],
                                                 state=row["state"], changed=changed,
                                                 released=True))
            return respond(request, views.job(await self.store.get_job(row["id"], principal)))
        await self.store.audited(
            lambda store: store.request_termination(row["id"], Reason.USER_TERMINATED,
                                                    message=f"terminated by {principal.name}"),
            lambda changed: self.audit.entry(request, principal, "job.cancel", "job",
                                             row["id"], subject_user=row["owner"],
                                             state=row["state"], changed=changed))
        return respond(request, views.job(await self.store.get_job(row["id"], principal)))

    @app.route("/api/v1/jobs/<job_id>/extend", methods=["POST"])
    async def extend(self, request: IRequest, job_id: str) -> bytes:
        """Move a job's deadline later (a reservation's end), or the end of an ended job's
        held host (at most ``jobs.max_hold`` from now): manage privilege."""
        principal, row = await self._job(request, job_id, "manage")
        by = read_json(request, schemas.JOB_EXTEND)["by"]
        ended = row["state"] == State.TERMINATED.value  # only its held host may be extended
        key = "held_until" if ended else "deadline"

        async def change(store: Any) -> dict:
            if ended:  # bounded by max_hold, and by what the host's tokens can cover
                longest = min(self.limits.max_hold, MAX_TTL - TOKEN_SLACK)
                return await store.extend_hold(row["id"], by, longest)
            return await store.extend_job(row["id"], by, self.limits.max_timeout)

        try:
            await self.store.audited(change, lambda updated: self.audit.entry(
                request, principal, "job.extend", "job", row["id"], subject_user=row["owner"],
                by=by, **{key: updated[key].isoformat() if updated[key] else None}))
        except Conflict:
            raise
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return respond(request, views.job(await self.store.get_job(row["id"], principal)))

    @app.route("/api/v1/jobs/<job_id>/logs/token", methods=["POST"])
    async def job_logs_token(self, request: IRequest, job_id: str) -> bytes:
        """A short-lived read token for the job's logs, and where they are."""
        principal, row = await self._job(request, job_id, "read")
        ttl = self.limits.log_read_ttl
        token = self.signer.sign(principal.name, self.limits.log_service,
                                 [Access("job", row["id"], ("read",))], ttl)
        return respond(request, {"servers": row["log_servers"], "token": token,
                                 "expires_in": int(ttl)})

    @app.route("/api/v1/jobs/<job_id>/console-token", methods=["POST"])
    async def job_console_token(self, request: IRequest, job_id: str) -> bytes:
        """A short-lived token for the job's consoles on its proxies: ``read`` watches
        (needs read on the job), ``manage`` types (needs manage)."""
        body = read_json(request, schemas.CONSOLE_TOKEN, empty=dict)
        access = body.get("access", "manage")
        principal, row = await self._job(request, job_id, access)
        ttl = self.limits.console_token_ttl
        actions = ("read", "manage") if access == "manage" else ("read",)
        token = self.signer.sign(principal.name, self.limits.proxy_service,
                                 [Access("tunnel", row["id"], actions)], ttl)
        # The token's id (not a secret) is what the proxy logs with each connection.
        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        await self.audit.record(request, principal, "job.console_token", "job", row["id"],
                                subject_user=row["owner"], access=access,
                                expires_in=int(ttl), token_jti=jti)
        return respond(request, {"token": token, "access": access, "expires_in": int(ttl),
                                 "endpoints": row["endpoints"] or []})
