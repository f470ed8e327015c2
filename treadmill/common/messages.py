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
from treadmill.common.schemacheck import compiled

_BY_TYPE: dict[int, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {}


def _type_branch(entry: Any) -> str | None:
    """``T`` if ``entry`` is ``{"if": {"properties": {"type": {"const": T}}}, "then": …}``."""
    if not isinstance(entry, dict) or set(entry) != {"if", "then"}:
        return None
    condition = entry["if"]
    if not isinstance(condition, dict) or set(condition) != {"properties"}:
        return None
    properties = condition["properties"]
    if not isinstance(properties, dict) or set(properties) != {"type"}:
        return None
    kind = properties["type"]
    return kind["const"] if isinstance(kind, dict) and set(kind) == {"const"} else None


def _by_type(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For each message type ``T`` of ``schema``'s ``allOf`` if/then branches, the
    same schema with only ``T``'s branch applied: what the whole schema checks of a
    message whose ``type`` is ``T``, without evaluating (and failing) every other
    branch's condition. A schema's parts are cached with it (``schema`` must stay
    alive and unchanged, as for :func:`~treadmill.common.schema.validator`)."""
    found = _BY_TYPE.get(id(schema))
    if found is not None and found[0] is schema:
        return found[1]
    branches = [(_type_branch(e), e) for e in schema.get("allOf", [])]
    others = [e for kind, e in branches if kind is None]
    kinds = [kind for kind, _ in branches if kind is not None]
    parts: dict[str, dict[str, Any]] = {}
    if len(set(kinds)) == len(kinds):  # Two branches of one type: check the whole.
        base = {k: v for k, v in schema.items() if k != "allOf"}
        parts = {kind: {**base, "allOf": [*others, e["then"]]}
                 for kind, e in branches if kind is not None}
    _BY_TYPE[id(schema)] = (schema, parts)
    return parts


def check(message: Any, schema: dict[str, Any], error: type[Exception]) -> None:
    """Raise ``error`` unless ``message`` is valid against ``schema``.

    A message whose ``type`` selects one of the schema's if/then branches is checked
    against that branch alone (:func:`_by_type`): the same verdict, a fraction of
    the work (each other branch's failed condition cost a ValidationError). That
    schema's compiled predicate (:func:`~treadmill.common.schemacheck.compiled`)
    accepts a valid message; jsonschema judges and words the others, and checks
    everything under a schema the compiler does not handle.
    """
    kind = message.get("type") if isinstance(message, dict) else None
    part = _by_type(schema).get(kind) if isinstance(kind, str) else None
    target = part if part is not None else schema
    fast = compiled(target)
    if fast is not None and fast(message):
        return
    found = best_match(validator(target).iter_errors(message))
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
