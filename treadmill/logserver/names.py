"""What a job id and a stream name may be, checked.

The grammar is the wire contract's (:mod:`treadmill.protocol.logs`). A stream
name becomes a file name under the job's directory, so the rules are strict:
``[a-z0-9][a-z0-9._-]{0,63}`` and no ``..`` anywhere. That refuses path
separators, NUL, dots-only names and anything a shell or a file system could
misread. A job id is a UUID in its canonical lowercase form (the form the
switchboard puts in capability tokens), so one job has exactly one directory.
"""

from __future__ import annotations

from treadmill.protocol.logs import is_job, is_stream

__all__ = ["META", "InvalidName", "check_job", "check_stream"]

# The metadata file of a job directory: not a valid stream name (leading "_").
META = "_meta.json"


class InvalidName(ValueError):
    """A job id or stream name that is not allowed."""


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
