"""JSON messages over a WebSocket: one object per frame with a string ``type``,
checked against the protocol's JSON Schema.

Shared by the switchboard ↔ supervisor protocol (``treadmill.protocol.supervisor``)
and the proxy's control protocol (``treadmill.protocol.proxy``); each passes its own
error type, so a caller sees the protocol it speaks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from jsonschema.exceptions import best_match

from treadmill.common.http import loads
from treadmill.common.schema import validator


def check(message: Any, schema: dict[str, Any], error: type[Exception]) -> None:
    """Raise ``error`` unless ``message`` is valid against ``schema``."""
    found = best_match(validator(schema).iter_errors(message))
    if found is not None:
        where = ".".join(str(p) for p in found.absolute_path) or "message"
        kind = message.get("type") if isinstance(message, dict) else None
        raise error(f"invalid {kind or 'message'}: {where}: {found.validator} check failed")


def decode(payload: bytes, *, expect: tuple[str, ...], max_bytes: int,
           error: type[Exception], validate: Callable[[Any], None]) -> dict[str, Any]:
    """Decode one received message of one of the ``expect`` types (at most
    ``max_bytes``, strict JSON), then ``validate`` it; raise ``error`` if it is not one."""
    if len(payload) > max_bytes:
        raise error(f"message of {len(payload)} bytes exceeds {max_bytes}")
    try:
        message = loads(payload)
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"malformed JSON: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise error("a message is a JSON object with a string 'type'")
    if message["type"] not in expect:
        raise error(f"unexpected message type {message['type'][:64]!r}")
    validate(message)
    return message


def encode(message: dict[str, Any]) -> bytes:
    """A message as compact UTF-8 JSON."""
    return json.dumps(message, separators=(",", ":")).encode("utf-8")
