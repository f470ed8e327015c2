"""``tml job logs``: read or follow a job's log streams from its log servers.

The switchboard says where a job's logs are and hands out a short-lived read
token (``POST /api/v1/jobs/{id}/logs/token``). The streams are read from the
first log server that answers; a follower that loses its server carries on
from the same byte offset on another replica, so no byte is shown twice or
skipped. Failures are retried with backoff and a bound (:func:`read_stream`).
"""

from __future__ import annotations

from typing import Any

import treq

from treadmill.cli import output
from treadmill.cli.client import ApiError, Unreachable, describe_transport_error
from treadmill.cli.context import EXIT_ERROR, EXIT_OK, Context
from treadmill.cli.retry import Retry

_READ_TIMEOUT = 30.0
GIVE_UP_AFTER = 60.0  # seconds of failures without progress
RETRY_INITIAL = 0.5  # the first pause, doubling up to RETRY_MAX (with jitter)
RETRY_MAX = 5.0
MAX_REFUSALS = 5  # fresh read tokens refused in a row


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


async def _access(ctx: Context, job_id: str, retry: Retry) -> dict[str, Any]:
    """A read token and the job's log servers; a switchboard that is away (unreachable,
    503) is asked again, backing off, until ``retry`` gives up."""
    while True:
        try:
            return await ctx.api.post("jobs", job_id, "logs", "token")
        except (Unreachable, ApiError) as e:
            if isinstance(e, ApiError) and e.status != 503:
                raise
            delay = retry.next_delay()
            if delay is None:
                reason = (e.reason if isinstance(e, Unreachable) else
                          f"the switchboard is unavailable (HTTP 503: {output.clean(e.message)})")
                raise Unreachable(ctx.api.base_url, f"{reason}; {retry.summary()}") from None
            await retry.sleep(delay)


async def job_logs(ctx: Context) -> int:
    """Print a job's log stream; with ``--follow``, keep printing as it grows."""
    a = ctx.args
    return await read_stream(ctx, a.id, a.stream, a.follow, ConsoleWriter(ctx))


class _Refused(Exception):
    """A log server refused the read token."""


def _reason(e: BaseException) -> str:
    return describe_transport_error(e) or str(e) or type(e).__name__


async def read_stream(ctx: Context, job_id: str, stream: str, follow: bool,
                      write: Any) -> int:
    """Write a job's stream with ``write(bytes)``; follow it until it closes if asked.

    Failures (a log server down or refusing the token, the switchboard away) are
    retried on the next replica, backing off with jitter; after ``GIVE_UP_AFTER``
    seconds without progress, or ``MAX_REFUSALS`` refused tokens in a row, it
    gives up with a message.
    """
    retry = Retry(ctx.reactor, give_up_after=GIVE_UP_AFTER, initial=RETRY_INITIAL,
                  max_delay=RETRY_MAX)
    access = await _access(ctx, job_id, retry)
    if not access.get("servers"):
        ctx.note(f"tml: job {job_id} has no log servers (the switchboard configures none)")
        return EXIT_ERROR
    offset = 0
    turn = 0
    refusals = 0
    servers = list(access["servers"])
    while True:
        server = servers[turn % len(servers)]
        url = f"{server.rstrip('/')}/v1/jobs/{job_id}/streams/{stream}"
        params = {"offset": str(offset)}
        if follow:
            params["follow"] = "1"
        before = write.count
        try:
            response = await treq.get(url, params=params, unbuffered=True,
                                      timeout=None if follow else _READ_TIMEOUT,
                                      headers={"Authorization": f"Bearer {access['token']}"})
            if response.code == 401:
                body = (await treq.content(response))[:300].decode("utf-8", "replace")
                raise _Refused(f"the log server refused the read token ({body.strip()})")
            if response.code == 404 and not follow:
                await treq.content(response)
                ctx.note(f"tml: job {job_id} has no {stream} stream yet")
                return EXIT_OK
            if response.code == 416:
                await treq.content(response)
                return EXIT_OK  # Nothing past what we have.
            if response.code not in (200, 206):
                body = (await treq.content(response))[:300].decode("utf-8", "replace")
                raise OSError(f"HTTP {response.code}: {body.strip()}")
            refusals = 0
            try:
                await treq.collect(response, write)
            finally:
                # Also when the server vanished mid-stream: resume after what was shown.
                offset += write.count - before
            return EXIT_OK
        except Exception as e:
            if write.count > before:
                retry.reset()  # it got somewhere: a new episode of failures
            refused = isinstance(e, _Refused)
            refusals = refusals + 1 if refused else 0
            delay = retry.next_delay() if refusals < MAX_REFUSALS else None
            if delay is None:
                why = (f"{refusals} fresh read tokens in a row were refused" if refused
                       else retry.summary())
                ctx.note(output.clean(f"tml: giving up on the logs of job {job_id}: "
                                      f"{_reason(e)}; {why}"))
                return EXIT_ERROR
            turn += 1
            ctx.note(output.clean(f"tml: log server {server}: {_reason(e)}; "
                                  f"retrying in {delay:.1f} s at byte {offset}"))
            await retry.sleep(delay)
            if refused:
                access = await _access(ctx, job_id, retry)  # a fresh token
                servers = list(access.get("servers") or servers)


def add_arguments(p: Any) -> None:
    p.add_argument("id", metavar="ID")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new output until the job's stream closes")
    p.add_argument("--stream", default="console", metavar="NAME",
                   help="the stream to read: console (default) or events")



