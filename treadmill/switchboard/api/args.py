"""Reading requests: query arguments, path ids, cursors, the Idempotency-Key
header and console patterns, each with the error it answers."""

from __future__ import annotations

import base64
import json
import re
import uuid
from typing import Any

from twisted.web.iweb import IRequest

from treadmill.common.http import ApiError, query_arg
from treadmill.protocol.results import ResultsError, check_patterns


def path_uuid(value: str, what: str) -> str:
    """A path's id, canonical; ``404`` (no such ``what``) if it is no UUID."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ApiError(404, f"no {what} {value}") from None


def int_arg(request: IRequest, name: str, default: int, low: int, high: int) -> int:
    """Query argument ``name`` as an integer from ``low`` to ``high`` (else ``default``)."""
    raw = query_arg(request, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: expected an integer") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name}: must be between {low} and {high}")
    return value


def console_patterns(body: dict[str, Any]) -> dict[str, str] | None:
    """A body's console patterns (``results``), compiled and checked (docs/results.md)."""
    patterns = body.get("results")
    if patterns is None:
        return None
    try:
        return check_patterns(patterns)
    except ResultsError as e:
        raise ApiError(400, str(e)) from None


def encode_cursor(seq: int, tag: str = "j") -> str:
    """The opaque paging cursor for position ``seq`` of a listing (``tag``: which)."""
    return base64.urlsafe_b64encode(f"{tag}{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str, tag: str = "j") -> int:
    """The position in an :func:`encode_cursor` cursor; ``400`` for any other."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith(tag) or not 0 <= int(raw[1:]) < 2 ** 63:
            raise ValueError(raw)
        return int(raw[1:])
    except ValueError:
        raise ApiError(400, "cursor: not a cursor this API issued") from None


def uuid_arg(value: str, name: str) -> str:
    """Query argument ``name``'s job id, canonical; ``400`` if it is no UUID."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ApiError(400, f"{name}: not a job id") from None


ID_PREFIX = re.compile(r"[0-9a-fA-F-]{1,36}")


def prefix_range(prefix: str) -> tuple[str, str]:
    """The lowest and highest UUIDs starting with ``prefix`` (hex digits, dashes ignored)."""
    digits = prefix.replace("-", "").lower()
    if not ID_PREFIX.fullmatch(prefix) or not digits or len(digits) > 32:
        raise ApiError(400, "id_prefix: expected 1 to 32 hexadecimal digits of a job id")

    def uuid_of(hex32: str) -> str:
        return str(uuid.UUID(hex32))

    return uuid_of(digits.ljust(32, "0")), uuid_of(digits.ljust(32, "f"))


IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")


def idempotency_key(request: IRequest) -> str | None:
    """The request's ``Idempotency-Key`` header (1 to 255 printable ASCII characters)."""
    values = request.requestHeaders.getRawHeaders(b"idempotency-key")
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, "Idempotency-Key: send it once")
    try:
        key = values[0].decode("ascii")
    except UnicodeDecodeError:
        key = ""
    if not IDEMPOTENCY_KEY.fullmatch(key) or not key.strip():
        raise ApiError(400, "Idempotency-Key: 1 to 255 printable ASCII characters")
    return key


def dumps_canonical(value: Any) -> bytes:
    """``value`` as JSON with sorted keys: equal requests, equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")
