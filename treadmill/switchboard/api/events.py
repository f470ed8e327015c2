"""A job's events (``/api/v1/jobs/ID/events``), read or watched live."""

from __future__ import annotations

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.web.iweb import IRequest

from treadmill.common.http import dumps, respond
from treadmill.switchboard import views
from treadmill.switchboard.api.args import int_arg
from treadmill.switchboard.api.base import RETRY_AFTER, Routes
from treadmill.switchboard.database import unavailable

app = Routes.app
MAX_SEQ = 2**31 - 1


def last_event_id(request: IRequest) -> int | None:
    """The ``Last-Event-ID`` a reconnecting EventSource sends (the last ``id:`` it got),
    if it is one of ours: a sequence number."""
    raw = request.getHeader(b"last-event-id")
    if raw is None or not raw.isdigit() or len(raw) > 10:
        return None
    value = int(raw)
    return value if value <= MAX_SEQ else None


class EventRoutes(Routes):
    """Events read in pages, or streamed as server-sent events."""

    @app.route("/api/v1/jobs/<job_id>/events", methods=["GET"])
    async def job_events(self, request: IRequest, job_id: str) -> bytes:
        _, row = await self._job(request, job_id, "read")
        after = int_arg(request, "after", 0, 0, MAX_SEQ)
        rows = await self.store.job_events(row["id"], after)
        return respond(request, {"events": [views.event(r) for r in rows]})

    @app.route("/api/v1/jobs/<job_id>/events/watch", methods=["GET"])
    async def watch_job(self, request: IRequest, job_id: str) -> Deferred[bytes] | bytes:
        _, row = await self._job(request, job_id, "read")
        after = int_arg(request, "after", 0, 0, MAX_SEQ)
        resumed = last_event_id(request)
        if resumed is not None:  # an EventSource reconnecting: on from what it saw
            after = max(after, resumed)
            if row["state"] == "terminated" and not await self.store.job_events(
                    row["id"], after):
                request.setResponseCode(204)  # all sent: an EventSource stops at a 204
                return b""
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b": watching job events\n\n")
        return await ensureDeferred(self._stream_events(request, row["id"], after))

    async def _stream_events(self, request: IRequest, job_id: str, after: int) -> bytes:
        finished = [False]
        request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))
        try:
            async for event in self.watchers.events(job_id, after, self.limits.keepalive):
                if finished[0]:
                    break
                if event is None:
                    request.write(b": keepalive\n\n")
                    continue
                request.write(b"id: %d\nevent: job\ndata: %s\n\n" % (
                    event["seq"], dumps(views.event(event))))
        except Exception as e:
            if not unavailable(e):
                raise
            # The status line is gone: end the stream; the client reconnects with ?after=.
            self.log.warn("Watch of job {job} ended: the database is unavailable ({error})",
                          job=job_id, error=type(e).__name__)
            if not finished[0]:
                request.write(b": the database is unavailable\nretry: %d\n\n"
                              % (int(RETRY_AFTER) * 1000))
        return b""
