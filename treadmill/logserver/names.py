"""What a job id and a stream name may be.

A stream name becomes a file name under the job's directory, so the rules are
strict: ``[a-z0-9][a-z0-9._-]{0,63}`` and no ``..`` anywhere. That refuses
path separators, NUL, dots-only names and anything a shell or a file system
could misread. A job id is a UUID in its canonical lowercase form (the form
the switchboard puts in capability tokens), so one job has exactly one
directory.
"""

from __future__ import annotations

import re

__all__ = ["InvalidName", "check_job", "check_stream", "is_job", "is_stream"]

STREAM_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
JOB_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

# The metadata file of a job directory: not a valid stream name (leading "_").
META = "_meta.json"


class InvalidName(ValueError):
    """A job id or stream name that is not allowed."""


def is_stream(name: object) -> bool:
    return isinstance(name, str) and STREAM_RE.fullmatch(name) is not None and ".." not in name


def is_job(job: object) -> bool:
    return isinstance(job, str) and JOB_RE.fullmatch(job) is not None


def check_stream(name: object) -> str:
    """``name`` if it is a valid stream name, else :class:`InvalidName`."""
    if not is_stream(name):
        raise InvalidName("invalid stream name: expected 1 to 64 characters of a-z, 0-9, "
                          "'.', '_' and '-', starting with a letter or digit, without '..'")
    return name  # type: ignore[return-value]


def check_job(job: object) -> str:
    """``job`` if it is a canonical job id, else :class:`InvalidName`."""
    if not is_job(job):
        raise InvalidName("invalid job id: expected a UUID in lowercase canonical form")
    return job  # type: ignore[return-value]
