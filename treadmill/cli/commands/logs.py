"""``tml job logs``: read or follow a job's log streams from its log servers.

The switchboard says where a job's logs are and hands out a short-lived read
token (``POST /api/v1/jobs/{id}/logs/token``). The streams are read from the
first log server that answers; a follower that loses its server carries on
from the same byte offset on another replica, so no byte is shown twice or
skipped. Failures are retried with backoff and a bound (:func:`read_stream`).
"""

from __future__ import annotations

import codecs
import json
from typing import Any, BinaryIO

import treq

from treadmill.cli import output
from treadmill.cli.client import (
    ApiError,
    Cancelled,
    Unreachable,
    cancellable,
    collect,
    plain_error,
)
from treadmill.cli.context import EXIT_ERROR, EXIT_OK, Context, add_job_id
from treadmill.cli.retry import Retry
from treadmill.protocol.logs import HOLD_MARKER, stream_url

_READ_TIMEOUT = 30.0
GIVE_UP_AFTER = 60.0  # seconds of failures without progress
RETRY_INITIAL = 0.5  # the first pause, doubling up to RETRY_MAX (with jitter)
RETRY_MAX = 5.0
MAX_REFUSALS = 5  # fresh read tokens refused in a row


class ConsoleWriter:
    """Console bytes to stdout: raw when stdout is a byte stream, else decoded.

    It remembers whether the console stopped mid-line, so that a line printed
    between its bytes (a job event) starts on a line of its own: :meth:`end_line`;
    and whether it wrote the line that begins a held host's console (:attr:`held`).
    """

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.buffer = getattr(ctx.stdout, "buffer", None)
        self.count = 0
        self.mid_line = False
        self.held = False  # the console reached the start of the held host's (HOLD_MARKER)
        self._recent = b""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def __call__(self, data: bytes) -> None:
        if not data:
            return
        self.count += len(data)
        self.mid_line = not data.endswith(b"\n")
        if not self.held:
            recent = self._recent + data
            self.held = HOLD_MARKER in recent
            self._recent = recent[-len(HOLD_MARKER):]
        if self.buffer is not None:
            self.buffer.write(data)
            self.buffer.flush()
        else:
            self.ctx.stdout.write(self._decoder.decode(data))
            self.ctx.stdout.flush()

    def end_line(self) -> None:
        """Finish the console's last line if it stopped mid-line."""
        if self.mid_line:
            self.mid_line = False
            self.ctx.write("\n")


class FileWriter:
    """Stream bytes appended to a binary file (``tml job run --artifacts``)."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.count = 0

    def __call__(self, data: bytes) -> None:
        self.count += len(data)
        self.file.write(data)


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
    """Print a job's log stream; with ``--follow``, keep printing as it grows, until the
    job (or the last job restarting it) ended and its stream was read."""
    a = ctx.args
    if not a.follow:
        return await read_stream(ctx, a.id, a.stream, False, ConsoleWriter(ctx))
    from treadmill.cli.commands.follow import JobFollower  # follow.py imports this module

    follower = JobFollower(ctx, a.id, events=False, stream=a.stream, notes=False,
                           through_hold=True)
    return (await follower.run()).stream_status


class _Refused(Exception):
    """A log server refused the read token."""


def _reason(e: BaseException) -> str:
    return plain_error(e)


async def read_stream(ctx: Context, job_id: str, stream: str, follow: bool,
                      write: Any, *, quiet_missing: bool = False) -> int:
    """Write a job's stream with ``write(bytes)``; follow it until it closes if asked.

    Failures (a log server down or refusing the token, the switchboard away) are
    retried on the next replica, backing off with jitter; after ``GIVE_UP_AFTER``
    seconds without progress, or ``MAX_REFUSALS`` refused tokens in a row, it
    gives up with a message. Cancelling it stops it at once (:class:`Cancelled`).
    Without ``follow``, a stream that does not exist is noted (unless
    ``quiet_missing``) and answers 0 with nothing written.
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
        url = stream_url(server, job_id, stream)
        params = {"offset": str(offset)}
        if follow:
            params["follow"] = "1"
        before = write.count
        try:
            response = await cancellable(treq.get(
                url, params=params, unbuffered=True,
                timeout=None if follow else _READ_TIMEOUT,
                headers={"Authorization": f"Bearer {access['token']}"}))
            if response.code == 401:
                body = await _error_text(response)
                raise _Refused(f"the log server refused the read token ({body})")
            if response.code == 404 and not follow:
                await cancellable(treq.content(response))
                if not quiet_missing:
                    ctx.note(f"tml: job {job_id} has no {stream} stream yet")
                return EXIT_OK
            if response.code == 416:
                await cancellable(treq.content(response))
                return EXIT_OK  # Nothing past what we have.
            if response.code not in (200, 206):
                raise OSError(f"HTTP {response.code}: {await _error_text(response)}")
            refusals = 0
            try:
                await collect(response, write)
            finally:
                # Also when the server vanished mid-stream: resume after what was shown.
                offset += write.count - before
            return EXIT_OK
        except Cancelled:
            raise
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


async def _error_text(response: Any) -> str:
    """An error answer's message (``{"error": {"message"}}``) or the start of its body."""
    body = (await cancellable(treq.content(response)))[:300].decode("utf-8", "replace")
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.strip()


def add_arguments(p: Any) -> None:
    add_job_id(p)
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new output until the job's stream closes")
    p.add_argument("--stream", default="console", metavar="NAME",
                   help="the stream to read: console (default) or events")



