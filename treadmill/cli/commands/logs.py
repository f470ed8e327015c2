"""``tml job logs``: read or follow a job's log streams from its log servers.

The switchboard says where a job's logs are and hands out a short-lived read
token (``POST /api/v1/jobs/{id}/logs/token``). The streams are read from the
first log server that answers; a follower that loses its server carries on
from the same byte offset on another replica, so no byte is shown twice or
skipped.
"""

from __future__ import annotations

from typing import Any

import treq
from twisted.internet.task import deferLater

from treadmill.cli.context import EXIT_ERROR, EXIT_OK, Context

_READ_TIMEOUT = 30.0


class ConsoleWriter:
    """Console bytes to stdout: raw when stdout is a byte stream, else decoded."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.buffer = getattr(ctx.stdout, "buffer", None)
        self.count = 0

    def __call__(self, data: bytes) -> None:
        self.count += len(data)
        if self.buffer is not None:
            self.buffer.write(data)
            self.buffer.flush()
        else:
            self.ctx.stdout.write(data.decode("utf-8", "replace"))
            self.ctx.stdout.flush()


async def _access(ctx: Context, job_id: str) -> dict[str, Any]:
    return await ctx.api.post("jobs", job_id, "logs", "token")


async def job_logs(ctx: Context) -> int:
    """Print a job's log stream; with ``--follow``, keep printing as it grows."""
    a = ctx.args
    return await read_stream(ctx, a.id, a.stream, a.follow, ConsoleWriter(ctx))


async def read_stream(ctx: Context, job_id: str, stream: str, follow: bool,
                      write: Any) -> int:
    """Write a job's stream with ``write(bytes)``; follow it until it closes if asked."""
    access = await _access(ctx, job_id)
    if not access.get("servers"):
        ctx.note(f"tml: job {job_id} has no log servers (the switchboard configures none)")
        return EXIT_ERROR
    offset = 0
    failures = 0
    servers = list(access["servers"])
    while True:
        server = servers[failures % len(servers)]
        url = f"{server.rstrip('/')}/v1/jobs/{job_id}/streams/{stream}"
        params = {"offset": str(offset)}
        if follow:
            params["follow"] = "1"
        try:
            response = await treq.get(url, params=params, unbuffered=True,
                                      timeout=None if follow else _READ_TIMEOUT,
                                      headers={"Authorization": f"Bearer {access['token']}"})
            if response.code == 401:
                await treq.content(response)
                access = await _access(ctx, job_id)  # The token expired: a fresh one.
                failures += 1
                continue
            if response.code == 404 and not follow:
                await treq.content(response)
                ctx.note(f"tml: job {job_id} has no {stream} stream yet")
                return EXIT_OK
            if response.code == 416:
                await treq.content(response)
                return EXIT_OK  # Nothing past what we have.
            if response.code not in (200, 206):
                body = (await treq.content(response))[:300].decode("utf-8", "replace")
                raise OSError(f"HTTP {response.code}: {body}")
            before = write.count
            try:
                await treq.collect(response, write)
            finally:
                # Also when the server vanished mid-stream: resume after what was shown.
                offset += write.count - before
            return EXIT_OK
        except Exception as e:
            failures += 1
            if failures > 3 * len(servers) + 20:
                ctx.note(f"tml: giving up on the logs of job {job_id}: {e}")
                return EXIT_ERROR
            ctx.note(f"tml: log server {server} failed ({type(e).__name__}: {e}); "
                     f"resuming at byte {offset} on another")
            await deferLater(ctx.reactor, min(5.0, 0.2 * failures), lambda: None)


def add_arguments(p: Any) -> None:
    p.add_argument("id", metavar="ID")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new output until the job's stream closes")
    p.add_argument("--stream", default="console", metavar="NAME",
                   help="the stream to read: console (default) or events")



