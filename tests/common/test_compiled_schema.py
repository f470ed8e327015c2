"""The compiled schemas (``treadmill.common.schemacheck``) give jsonschema's verdict."""

from __future__ import annotations

import copy
import json
import random
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema.exceptions import SchemaError

from treadmill.common import messages, schemacheck
from treadmill.common.schema import validator
from treadmill.common.schemacheck import compile_schema, compiled
from treadmill.protocol import proxy as px
from treadmill.protocol import supervisor as sv

DRAFT = "https://json-schema.org/draft/2020-12/schema"
JOB = str(uuid.uuid4())
CONN = "c" * 32
URLS = [{"url": "http://logs:1", "token": "t" * 40}]
START = {"id": JOB, "image": {"digest": "sha256:" + "a" * 64, "name": "demo", "stores": ["s"]},
         "parameters": {"A": {"value": "x", "secret": False}}, "timeout": 5.0,
         "tags": ["t"], "label": "l", "hold_on_failure": 60, "ssh_keys": ["ssh-ed25519 AAAA a"],
         "proxies": [{"url": "ws://proxy:1", "token": "u"}], "log_servers": URLS,
         "results": {"test_case": "^case (\\w+)", "pass": "ok", "fail": "FAIL", "end": "done"}}

SUPERVISOR = [
    sv.start_job(1, START),
    sv.start_job(2, {**START, "image": {"digest": "sha256:" + "b" * 64, "name": None,
                                        "stores": []}, "parameters": {}}),
    sv.stop_job(2, JOB, "user_terminated"),
    sv.status_request(3),
    sv.status(3, None),
    sv.status(3, {"id": JOB, "state": "ready", "stage": None, "timeout": 30},
              kinds=["mock", "qemu"], held=JOB, held_for=1.5, held_timeout=60),
    sv.status(3, {"id": JOB, "state": "initializing", "stage": "booting"}),
    sv.job_event(4, JOB, "ready", stage="booting"),
    sv.job_event(4, JOB, "terminated", reason="workload_exited", exit_status=-2147483648,
                 message="done", held=True),
    sv.ack(4),
    sv.ack(4, ("already_running", "busy")),
    sv.unavailable(4),
    sv.job_endpoints(5, JOB, []),
    sv.job_endpoints(5, JOB, [{"service": "ssh", "proxy": "http://p:1", "host": "p.example",
                               "port": 40022, "url": "ws://p/x", "auth": "token"}],
                     ssh_host_keys=["ssh-ed25519 AAAA"]),
    sv.protocol_error("violation", "bad"),
    sv.snapshot_job(6, JOB, JOB, "alice/snap__x-y", "https://store:5000/v2"),
    sv.snapshot_result(6, JOB, JOB, digest="sha256:" + "b" * 64),
    sv.snapshot_result(6, JOB, JOB, error=("unknown_job", "gone")),
    sv.console_event(7, JOB, event="opened", conn_id="c" * 22, service="console",
                     proxy="ws://proxy:8200", user="alice", jti="j" * 22, access="manage",
                     peer="192.0.2.7", at=1765000000.5, suppressed=3),
    sv.console_event(7, JOB, event="closed", conn_id="c" * 16, service="s", user="é",
                     access="read", peer="", at=0),
    sv.renew_tokens(8, JOB, 65.0, log_servers=URLS, proxies=URLS, held_for=0),
]
PROXY = [
    px.welcome("job-1", 40000, False, "proxy.example", 30.0, ["ssh"]),
    px.welcome("j", 1, True, "h", 0, []),
    px.publish(1, "ssh", tcp=True, websocket=True, authenticates=True),
    px.publish(1, "echo"),
    px.published(1, "ssh", "proxy.example", tcp_port=40001, ws_path="/v1/tunnels/" + CONN,
                 ws_url="ws://p/v1/tunnels/x", auth="service"),
    px.published(1, "echo", "h"),
    px.unpublish(2, "ssh"),
    px.unpublished(2, "ssh"),
    px.connect(CONN, "ssh"),
    px.connect_failed(CONN, "refused"),
    px.connect_failed(CONN),
    px.error(3, "not_published", "no such service", service="ssh"),
    px.protocol_error("bad"),
    px.console("opened", CONN, "console", "alice", "manage", "192.0.2.7", 1765000000.5,
               jti="j" * 22),
]

NEAR_MISSES = [  # Invalid in one place: mutations of them are valid again.
    {**sv.snapshot_result(6, JOB, JOB, error=("failed", "x")), "digest": "sha256:" + "c" * 64},
    sv.status(3, {"id": JOB, "state": "queued", "stage": None}),
    {**px.welcome("j", 1, True, "h", 0, []), "data_port": 0},
]
LENGTHS = [0, 1, 15, 16, 31, 32, 63, 64, 65, 128, 129, 255, 256, 1024, 1025, 4096, 4097]
VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 0.0, 1.0, 1.5, -0.5, 65535, 65536, 65535.0, 2**31, -2**31 - 1,
    2**53 - 1, 2**53, 2**64, -2**64, 1e300, float("inf"), "", "x", "0", "alice\n", "\u00e9",
    "Upper", "sha256:" + "a" * 64, JOB, JOB.upper(), "/v1/tunnels/" + CONN, "http://s x",
    [], ["x"], ["x", "x"], [1, True], [1, 1.0], [None], {}, {"a": 1}, {"a": [{"b": None}]},
    *("a" * n for n in LENGTHS), *("\u00e9" * n for n in LENGTHS),
]


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place inside ``value`` (dict keys, list indexes), depth first."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*path, key)
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield (*path, i)
            yield from _paths(item, (*path, i))


def _mutated(message: Any, path: tuple[Any, ...], how: str, value: Any = None) -> Any:
    """A copy of ``message`` with the item at ``path`` replaced, dropped, or (in a dict at
    ``path``) beside an unknown key."""
    out = copy.deepcopy(message)
    parent = out
    for step in path[:-1]:
        parent = parent[step]
    if how == "set":
        parent[path[-1]] = copy.deepcopy(value)
    elif how == "drop":
        del parent[path[-1]]
    elif isinstance(parent[path[-1]], dict):
        parent[path[-1]]["surprise"] = 1
    return out


def _cases(message: dict[str, Any]) -> Iterator[Any]:
    yield message
    yield {**message, "surprise": None}
    for path in _paths(message):
        yield _mutated(message, path, "drop")
        yield _mutated(message, path, "add")
        for value in VALUES:
            yield _mutated(message, path, "set", value)


def _random_cases(pool: list[dict[str, Any]], count: int, seed: int) -> Iterator[Any]:
    """Messages with two to four random changes each (seeded)."""
    rng = random.Random(seed)
    for _ in range(count):
        message = copy.deepcopy(rng.choice(pool))
        for _ in range(rng.randint(2, 4)):
            paths = list(_paths(message))
            if not paths:
                break
            path = rng.choice(paths)
            how = rng.choice(["set", "set", "set", "drop", "add"])
            message = _mutated(message, path, how, rng.choice(VALUES))
        yield message


def _agree(schema: dict[str, Any], cases: Iterator[Any]) -> tuple[int, int]:
    """Assert the compiled predicate and jsonschema agree on every case (per-type part
    and whole schema); return how many were valid and invalid."""
    whole = compiled(schema)
    assert whole is not None
    parts = messages._by_type(schema)
    counts = [0, 0]
    for message in cases:
        kind = message.get("type") if isinstance(message, dict) else None
        part = parts.get(kind) if isinstance(kind, str) else None
        target = part if part is not None else schema
        fast = compiled(target)
        assert fast is not None
        verdict = validator(target).is_valid(message)
        assert fast(message) is verdict, json.dumps(message, default=str)[:300]
        if part is None:
            assert whole(message) is verdict
        counts[verdict] += 1
    return counts[True], counts[False]


@pytest.mark.parametrize(("protocol", "built"), [(sv, SUPERVISOR), (px, PROXY)],
                         ids=["supervisor", "proxy"])
def test_every_built_message_and_its_mutations_agree(protocol: Any, built: list[Any]) -> None:
    kinds = protocol.schema()["properties"]["type"]["enum"]
    assert {m["type"] for m in built} == set(kinds)
    for message in built:
        protocol.validate(message)
    near = [m for m in NEAR_MISSES if m["type"] in kinds]
    for message in near:
        with pytest.raises(protocol.ProtocolError):
            protocol.validate(message)
    valid, invalid = _agree(protocol.schema(),
                            (c for m in [*built, *near] for c in _cases(m)))
    assert valid > 500 and invalid > 4_000, (valid, invalid)


@pytest.mark.parametrize(("protocol", "built"), [(sv, SUPERVISOR), (px, PROXY)],
                         ids=["supervisor", "proxy"])
def test_random_changes_agree(protocol: Any, built: list[Any]) -> None:
    valid, invalid = _agree(protocol.schema(), _random_cases(built, 3_000, seed=13))
    assert valid > 50 and invalid > 1_000, (valid, invalid)


def test_the_whole_schemas_agree_too() -> None:
    """Messages of no known type, and of every type, against the whole schema."""
    for protocol, built in [(sv, SUPERVISOR), (px, PROXY)]:
        whole = compiled(protocol.schema())
        assert whole is not None
        for message in [*built[:4], {"type": "nope"}, {"x": 1}, [], "s", None, {"type": 5}]:
            assert whole(message) is validator(protocol.schema()).is_valid(message)


# The semantics a careless compiler gets wrong: (schema, instance, jsonschema's verdict).
EDGES: list[tuple[dict[str, Any], Any, bool]] = [
    ({"type": "integer"}, True, False),
    ({"type": "integer"}, 1.0, True),
    ({"type": "integer"}, 1.5, False),
    ({"type": "integer"}, 2**64, True),
    ({"type": "number"}, False, False),
    ({"type": "boolean"}, 0, False),
    ({"type": "null"}, 0, False),
    ({"type": "object"}, [], False),
    ({"type": "array"}, {}, False),
    ({"type": ["string", "null"]}, None, True),
    ({"type": ["string", "null"]}, 1, False),
    ({"const": True}, 1, False),
    ({"const": 1}, True, False),
    ({"const": 1}, 1.0, True),
    ({"const": False}, 0, False),
    ({"const": [1]}, [True], False),
    ({"const": {"a": 0}}, {"a": 0.0}, True),
    ({"const": "a"}, ["a"], False),
    ({"enum": [1, "x"]}, True, False),
    ({"enum": [1, "x"]}, 1.0, True),
    ({"enum": ["x"]}, ["x"], False),
    ({"maxLength": 3}, "\u00e9\u00e9\u00e9", True),
    ({"maxLength": 3}, "\U0001f600" * 4, False),
    ({"minLength": 2}, "\U0001f600", False),
    ({"maxLength": 1}, 12345, True),
    ({"pattern": "^a$"}, "a\n", False),
    ({"pattern": "b"}, "abc", True),
    ({"pattern": "^b"}, 5, True),
    ({"minimum": 0}, -1e-300, False),
    ({"maximum": 9007199254740991}, 9007199254740992, False),
    ({"maximum": 1}, True, True),
    ({"exclusiveMinimum": 0}, 0, False),
    ({"exclusiveMinimum": 0}, 0.0, False),
    ({"exclusiveMinimum": 0}, "x", True),
    ({"uniqueItems": True}, [1, True], True),
    ({"uniqueItems": True}, [1, 1.0], False),
    ({"uniqueItems": True}, [{"a": 1}, {"a": True}], True),
    ({"uniqueItems": True}, [[1], [1.0]], False),
    ({"uniqueItems": False}, [1, 1], True),
    ({"maxItems": 1, "items": {"type": "string"}}, ["a", 1], False),
    ({"maxProperties": 1}, {"a": 1, "b": 2}, False),
    ({"minProperties": 1}, {}, False),
    ({"required": ["a"]}, [], True),
    ({"additionalProperties": False, "properties": {"a": True}}, {"a": 1, "b": 1}, False),
    ({"additionalProperties": {"type": "string"}, "properties": {"a": {}}}, {"a": 1}, True),
    ({"additionalProperties": {"type": "string"}}, {"b": 1}, False),
    ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, 1, False),
    ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, 1.5, True),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, None, False),
    ({"allOf": [{"type": "number"}, {"minimum": 2}]}, 1, False),
    ({"if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, {"a": 1}, False),
    ({"if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, {"a": 2}, True),
    ({"if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, {}, False),
    ({"if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, [], True),
    ({"if": {"const": 1}}, 2, True),
    ({"then": False}, 2, True),
    ({"$defs": {"N": {"type": "integer"}}, "properties": {"n": {"$ref": "#/$defs/N"}}},
     {"n": "1"}, False),
    ({"$defs": {"N": {"type": "integer"}}, "$ref": "#/$defs/N", "minimum": 3}, 2, False),
    ({"$defs": {"a/b": {"const": 1}}, "$ref": "#/$defs/a~1b"}, 2, False),
    ({"properties": {"next": {"$ref": "#"}}, "required": ["v"]}, {"v": 1, "next": {}}, False),
    ({"properties": {"next": {"$ref": "#"}}, "required": ["v"]}, {"v": 1, "next": {"v": 2}},
     True),
]


@pytest.mark.parametrize(("schema", "instance", "verdict"), EDGES,
                         ids=[json.dumps(e[0])[:40] + " " + repr(e[1])[:20] for e in EDGES])
def test_edge_cases_as_jsonschema_judges_them(schema: dict[str, Any], instance: Any,
                                              verdict: bool) -> None:
    schema = {"$schema": DRAFT, **schema}
    assert validator(schema).is_valid(instance) is verdict
    assert compile_schema(schema)(instance) is verdict


@pytest.mark.parametrize("schema", [
    {"else": {"type": "string"}, "if": {"type": "integer"}},
    {"format": "email"},
    {"patternProperties": {"^a": {"type": "string"}}},
    {"properties": {"a": {"minItems": 1}}},
    {"$ref": "https://example.com/other.json"},
    {"$ref": "#/$defs/Missing", "$defs": {}},
    {"items": {"$id": "https://example.com/x", "type": "string"}},
], ids=lambda s: json.dumps(s)[:40])
def test_a_keyword_the_compiler_does_not_know_leaves_the_schema_to_jsonschema(
        schema: dict[str, Any]) -> None:
    with pytest.raises(schemacheck.Unsupported):
        compile_schema(schema)
    with pytest.raises(schemacheck.Unsupported):
        compile_schema({"properties": {"a": {"items": [schema]}}})
    assert compiled({"$schema": DRAFT, **schema}) is None


def test_an_uncompiled_schema_is_still_checked_by_jsonschema() -> None:
    schema = {"$schema": DRAFT, "type": "object", "required": ["type"],
              "if": {"properties": {"n": {"type": "integer"}}}, "else": {"required": ["x"]}}
    assert compiled(schema) is None
    messages.check({"type": "a", "n": 1}, schema, ValueError)
    with pytest.raises(ValueError, match="invalid a: message: required check failed"):
        messages.check({"type": "a", "n": "1"}, schema, ValueError)


def test_a_valid_message_never_reaches_jsonschema(monkeypatch: pytest.MonkeyPatch) -> None:
    for message in SUPERVISOR:
        sv.validate(message)  # The validators are made and cached first.

    def refused(schema: Any) -> Any:
        raise AssertionError("jsonschema was asked")
    monkeypatch.setattr(messages, "validator", refused)
    for message in SUPERVISOR:
        sv.validate(message)
    with pytest.raises(AssertionError, match="jsonschema was asked"):
        sv.validate({**SUPERVISOR[0], "request_id": -1})


def test_a_compiled_schema_is_checked_and_cached_once() -> None:
    schema = {"$schema": DRAFT, "type": "integer"}
    assert compiled(schema) is compiled(schema)
    with pytest.raises(SchemaError):
        compiled({"$schema": DRAFT, "type": 5})
