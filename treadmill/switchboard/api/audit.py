"""The audit log (``/api/v1/audit``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from twisted.web.iweb import IRequest

from treadmill.common.http import ApiError, query_arg, respond
from treadmill.switchboard import views
from treadmill.switchboard.api.args import decode_cursor, encode_cursor, int_arg, uuid_arg
from treadmill.switchboard.api.base import Routes

app = Routes.app


class AuditRoutes(Routes):
    """Audit records, filtered and paged."""

    @app.route("/api/v1/audit", methods=["GET"])
    async def audit_log(self, request: IRequest) -> bytes:
        """Audit records, newest first: an admin's all, a user's those about themselves
        and the jobs, hosts and images they may read (docs/api.md, "Audit log")."""
        principal = await self.auth.principal(request)
        limit = int_arg(request, "limit", 100, 1, self.limits.max_page)
        filters: dict[str, Any] = {}
        for name in ("user", "host", "image", "action"):
            value = query_arg(request, name)
            if value is not None:
                if not value or len(value) > 256 or "\x00" in value:
                    raise ApiError(400, f"{name}: between 1 and 256 characters")
                filters[name] = value
        job = query_arg(request, "job")
        if job is not None:
            filters["job"] = uuid_arg(job, "job")
        after = query_arg(request, "after")
        if after is not None:
            try:
                moment = datetime.fromisoformat(after)
            except ValueError:
                raise ApiError(400, "after: not an RFC 3339 time") from None
            filters["after"] = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        cursor = query_arg(request, "cursor")
        rows = await self.store.audit_list(
            principal, before_id=decode_cursor(cursor, "a") if cursor else None,
            limit=limit + 1, **filters)
        page = rows[:limit]
        body: dict[str, Any] = {"entries": [views.audit_entry(row) for row in page]}
        if len(rows) > limit:
            body["next_cursor"] = encode_cursor(page[-1]["id"], "a")
        return respond(request, body)
