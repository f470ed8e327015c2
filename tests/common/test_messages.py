"""``check``'s per-type fast path gives the whole schema's verdict and message."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema.exceptions import best_match

from treadmill.common import messages
from treadmill.common.schema import validator
from treadmill.protocol import proxy, supervisor

VALUES: list[Any] = [None, -1, 1.5, True, "", ["mock"], {"id": 1},
                     "5b7c0c9e-8a41-4f7e-b1b4-3c2d9e0f1a22"]


def _whole(message: Any, schema: dict[str, Any]) -> str | None:
    """The verdict of the whole schema, as ``check`` words it (None: valid)."""
    found = best_match(validator(schema).iter_errors(message))
    if found is None:
        return None
    where = ".".join(str(p) for p in found.absolute_path) or "message"
    return f"invalid {message['type'] or 'message'}: {where}: {found.validator} check failed"


def _fast(message: Any, schema: dict[str, Any]) -> str | None:
    try:
        messages.check(message, schema, ValueError)
    except ValueError as e:
        return str(e)
    return None


def _variants(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Messages of every type (and an unknown one), each property set to each value."""
    keys = {"type", "extra"}
    for part in schema["$defs"].values():
        keys.update(part.get("properties", {}))
    out = []
    for kind in [*schema["properties"]["type"]["enum"], "nope"]:
        out.append({"type": kind})
        for key in sorted(keys - {"type"}):
            out.extend({"type": kind, key: value} for value in VALUES)
    return out


@pytest.mark.parametrize("protocol", [supervisor, proxy], ids=["supervisor", "proxy"])
def test_the_per_type_check_agrees_with_the_whole_schema(protocol: Any) -> None:
    schema = protocol.schema()
    assert messages._by_type(schema), "every message type has its own branch"
    variants = _variants(schema)
    assert len(variants) > 300
    for message in variants:
        assert _fast(message, schema) == _whole(message, schema), json.dumps(message)[:200]


def test_valid_messages_pass_and_the_branch_is_the_only_one_applied() -> None:
    ok = supervisor.status(3, None, kinds=["mock"])
    messages.check(ok, supervisor.schema(), ValueError)
    with pytest.raises(ValueError, match="invalid status: request_id: type check failed"):
        messages.check({**ok, "request_id": "3"}, supervisor.schema(), ValueError)


def test_schemas_with_two_branches_of_one_type_are_checked_whole() -> None:
    branch = {"if": {"properties": {"type": {"const": "a"}}},
              "then": {"required": ["n"]}}
    other = {"if": {"properties": {"type": {"const": "a"}}},
             "then": {"properties": {"n": {"type": "integer"}}}}
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
              "required": ["type"], "allOf": [branch, other]}
    assert messages._by_type(schema) == {}
    with pytest.raises(ValueError, match="required"):
        messages.check({"type": "a"}, schema, ValueError)
    with pytest.raises(ValueError, match="n: type"):
        messages.check({"type": "a", "n": "x"}, schema, ValueError)
    messages.check({"type": "a", "n": 1}, schema, ValueError)


def test_other_allof_entries_still_apply_to_every_type() -> None:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
              "required": ["type"],
              "allOf": [{"if": {"properties": {"type": {"const": "a"}}},
                         "then": {"required": ["n"]}},
                        {"properties": {"v": {"const": 1}}}]}
    with pytest.raises(ValueError, match="v: const"):
        messages.check({"type": "a", "n": 1, "v": 2}, schema, ValueError)
    with pytest.raises(ValueError, match="v: const"):
        messages.check({"type": "b", "v": 2}, schema, ValueError)
    messages.check({"type": "a", "n": 1, "v": 1}, schema, ValueError)
