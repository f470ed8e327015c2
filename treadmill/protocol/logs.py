"""The log server's wire contract (``docs/logserver.md``): names, URLs, close codes.

Shared by the log server (which checks names and serves the routes), the
supervisor's log shipper (which appends and closes streams) and ``tml job logs``
(which reads and follows them). The routes, under a server's base URL:

    GET  /v1/jobs/{job}/streams                     list            (streams_url)
    POST /v1/jobs/{job}/streams/{stream}?offset=N   append [&close=1] (append_url)
    POST /v1/jobs/{job}/streams/{stream}/close      close [?length=N] (close_url)
    GET  /v1/jobs/{job}/streams/{stream}            read            (stream_url)
    GET  /v1/jobs/{job}/streams/{stream}/follow     WebSocket        (follow_url)

A job is named by its id, a UUID in canonical lowercase form; a stream name is
``[a-z0-9][a-z0-9._-]{0,63}`` without ``..`` (it becomes a file name on the server).

A failed job whose host is held keeps its streams open until the hold ends; its
``console`` marks where the held host's console begins and ends (:func:`hold_marker`,
:func:`hold_end_marker`; :func:`hold_resumed_marker` where a restarted supervisor took the
held host over again), so that a reader can tell the run's output from the hold's.
"""

from __future__ import annotations

import re

__all__ = ["FOLLOW_CLOSE_CODES", "FOLLOW_SUBPROTOCOL", "HOLD_MARKER", "JOB_RE", "STREAM_RE",
           "append_url", "close_url", "follow_url", "hold_end_marker", "hold_extended_marker",
           "hold_marker", "hold_resumed_marker", "is_job", "is_stream", "stream_url", "streams_url"]

STREAM_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
JOB_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

FOLLOW_SUBPROTOCOL = "treadmill.logs.v1"
FOLLOW_CLOSE_CODES = {"deleted": 4004, "error": 4011, "shutdown": 4005}
"""A follower WebSocket's close codes other than 1000 (the stream is closed and every
byte was sent), by reason. ``error`` is 1011 (internal error) shifted into the private
range: Autobahn lets an application send only 1000 and 3000-4999."""

HOLD_MARKER = b"[treadmill: the job has ended; its host is held"
"""How the ``console`` line that ends a held job's run begins (:func:`hold_marker`)."""


def hold_marker(until: str) -> bytes:
    """The ``console`` line put where a failed job's run ends and its held host's console
    begins; ``until`` is when the hold ends (RFC 3339)."""
    return (b"\r\n" + HOLD_MARKER
            + f" until {until}; what follows is the held host's console]\r\n".encode())


def hold_resumed_marker() -> bytes:
    """The ``console`` line put where a restarted supervisor re-adopted a held host: what
    the host printed while no supervisor read its console is missing before it."""
    return (b"\r\n[treadmill: the supervisor restarted and re-adopted the held host; what "
            b"the host printed while it was down is not here]\r\n")


def hold_extended_marker(until: str) -> bytes:
    """The ``console`` line put where a held host's hold was extended (``tml job extend``);
    ``until`` is when it ends now (RFC 3339)."""
    return f"\r\n[treadmill: the hold is extended until {until}]\r\n".encode()


def hold_end_marker(message: str) -> bytes:
    """The ``console`` line put where a held host's console ends (``message``: why)."""
    return f"\r\n[treadmill: the hold is over: {message}]\r\n".encode("utf-8", "replace")


def is_stream(name: object) -> bool:
    """Whether ``name`` is a valid stream name."""
    return isinstance(name, str) and STREAM_RE.fullmatch(name) is not None and ".." not in name


def is_job(job: object) -> bool:
    """Whether ``job`` is a job id in canonical form."""
    return isinstance(job, str) and JOB_RE.fullmatch(job) is not None


def streams_url(base: str, job: str) -> str:
    """The list of a job's streams on the log server at ``base``."""
    return f"{base.rstrip('/')}/v1/jobs/{job}/streams"


def stream_url(base: str, job: str, stream: str) -> str:
    """One stream: ``GET`` reads it (``?offset=``, ``?follow=1``), ``HEAD`` gives its length."""
    return f"{streams_url(base, job)}/{stream}"


def append_url(base: str, job: str, stream: str, offset: int, *, close: bool = False) -> str:
    """``POST`` the bytes at ``offset`` (and close the stream after them if ``close``)."""
    return f"{stream_url(base, job, stream)}?offset={offset}" + ("&close=1" if close else "")


def close_url(base: str, job: str, stream: str, length: int | None = None) -> str:
    """``POST`` to close the stream (at ``length`` bytes, checked, if given)."""
    url = f"{stream_url(base, job, stream)}/close"
    return url if length is None else f"{url}?length={length}"


def follow_url(base: str, job: str, stream: str, offset: int | None = None) -> str:
    """The WebSocket that follows the stream live (``ws``/``wss`` for ``http``/``https``)."""
    url = f"{stream_url(base, job, stream)}/follow"
    url = "ws" + url[4:] if url.startswith("http") else url
    return url if offset is None else f"{url}?offset={offset}"
