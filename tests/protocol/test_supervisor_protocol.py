"""Protocol v1: the code's messages and the committed JSON Schema agree."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from treadmill.protocol import supervisor as p

JOB = str(uuid.uuid4())
START = {"id": JOB, "image": {"digest": "sha256:" + "a" * 64, "name": None, "stores": []},
         "parameters": {"A": {"value": "x", "secret": False}}, "timeout": 5.0}

BUILT = {
    "start_job": p.start_job(1, START),
    "stop_job": p.stop_job(2, JOB, "user_terminated"),
    "status_request": p.status_request(3),
    "status": p.status(3, {"id": JOB, "state": "ready", "stage": None}),
    "job_event": p.job_event(4, JOB, "terminated", reason="workload_exited", exit_status=0,
                             message="done"),
    "ack": p.ack(4, ("already_running", "busy")),
    "job_endpoints": p.job_endpoints(5, JOB, [{"service": "ssh", "proxy": "http://p:1",
                                               "host": "p.example", "port": 40022}]),
    "protocol_error": p.protocol_error("violation", "bad"),
    "snapshot_job": p.snapshot_job(6, JOB, JOB, "alice/snap", "http://store:5000"),
    "snapshot_result": p.snapshot_result(6, JOB, JOB, digest="sha256:" + "b" * 64),
    "console_event": p.console_event(7, JOB, event="opened", conn_id="c" * 22,
                                     service="console", proxy="ws://proxy:8200", user="alice",
                                     jti="j" * 22, access="manage", peer="192.0.2.7",
                                     at=1765000000.5, suppressed=3),
    "renew_tokens": p.renew_tokens(8, JOB, 65.0,
                                   log_servers=[{"url": "http://logs:1", "token": "t" * 40}],
                                   proxies=[{"url": "ws://proxy:1", "token": "u" * 40}]),
}


def test_a_snapshot_result_has_a_digest_or_an_error() -> None:
    failed = p.snapshot_result(7, JOB, JOB, error=("unknown_job", "the disk is gone"))
    p.validate(failed)
    with pytest.raises(p.ProtocolError):
        p.validate({**failed, "digest": "sha256:" + "b" * 64})
    with pytest.raises(p.ProtocolError):
        p.validate({k: v for k, v in failed.items() if k != "error"})
    with pytest.raises(p.ProtocolError):
        p.validate(p.snapshot_job(8, JOB, JOB, "Upper/Case", "http://s"))


def test_every_type_has_a_constructor_and_a_schema() -> None:
    in_schema = set(p.schema()["properties"]["type"]["enum"])
    assert in_schema == set(p.MESSAGE_TYPES) == set(BUILT)
    defs = {rule["then"]["$ref"].split("/")[-1] for rule in p.schema()["allOf"]}
    assert len(defs) == len(in_schema)


@pytest.mark.parametrize("kind", sorted(BUILT))
def test_built_messages_validate(kind: str) -> None:
    p.validate(BUILT[kind])
    direction = p.TO_SUPERVISOR if kind in p.TO_SUPERVISOR else p.TO_SWITCHBOARD
    assert p.parse(p.encode(BUILT[kind]), expect=direction) == BUILT[kind]


@pytest.mark.parametrize("kind", sorted(BUILT))
def test_unknown_fields_are_violations(kind: str) -> None:
    with pytest.raises(p.ProtocolError):
        p.validate({**BUILT[kind], "surprise": 1})


@pytest.mark.parametrize("payload", [b"", b"{", b"[]", b"null", b'{"type": 5}', b'{"x": 1}',
                                     b'{"type": "status"}', b"[" * 100000,
                                     b'{"type": "ack", "request_id": NaN, "ok": true}'])
def test_garbage_is_a_violation(payload: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse(payload, expect=p.MESSAGE_TYPES)


def test_direction_is_enforced() -> None:
    with pytest.raises(p.ProtocolError, match="unexpected"):
        p.parse(p.encode(BUILT["start_job"]), expect=p.TO_SWITCHBOARD)


def test_trailing_newline_in_an_id_is_refused() -> None:
    with pytest.raises(p.ProtocolError):
        p.validate(p.stop_job(1, JOB + "\n", "user_terminated"))


def test_minor_version_negotiation() -> None:
    assert p.negotiate_minor(None) == 0
    assert p.negotiate_minor(str(p.MINOR + 5)) == p.MINOR
    assert p.negotiate_minor("0") == 0
    for bad in ("x", "-1", ""):
        with pytest.raises(p.ProtocolError):
            p.negotiate_minor(bad)


def test_documentation_lists_every_type_and_close_code() -> None:
    text = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    for kind in p.MESSAGE_TYPES:
        assert f"`{kind}`" in text, kind
    documented = {int(code) for code in re.findall(r"^\| (\d{4}) \|", text, re.M)}
    assert {int(code) for code in p.CloseCode} == documented


def test_the_unavailable_ack_is_valid_and_the_only_retryable_one() -> None:
    """Minor 4: ``unavailable`` means "not stored, send again"; other refusals mean dropped."""
    message = p.unavailable(9)
    p.validate(message)
    assert p.parse(p.encode(message), expect=p.TO_SUPERVISOR) == message
    assert message["ok"] is False and message["error"]["code"] == p.UNAVAILABLE == "unavailable"
    assert p.is_retryable(message)
    assert not p.is_retryable(p.ack(9))
    assert not p.is_retryable(p.ack(9, ("not_your_job", "no")))
    assert not p.is_retryable({"type": "ack", "request_id": 9, "ok": True,
                               "error": {"code": "unavailable", "message": ""}})
    assert p.MINOR >= p.UNAVAILABLE_MINOR == 4


def test_console_events_are_minor_7_and_checked() -> None:
    """``console_event``: required fields, no others, and the constructor refuses a typo."""
    assert p.CONSOLE_MINOR == 7 <= p.MINOR
    minimal = p.console_event(1, JOB, event="closed", conn_id="c" * 16, service="s",
                              user="bob", access="read", peer="", at=0)
    p.validate(minimal)
    for missing in ("event", "conn_id", "service", "user", "access", "peer", "at"):
        with pytest.raises(p.ProtocolError):
            p.validate({k: v for k, v in minimal.items() if k != missing})
    for bad in ({"job_id": "not-a-uuid"}, {"access": "write"}, {"suppressed": -1},
                {"user": "u" * 129}, {"conn_id": "c" * 16 + "\n"}):
        with pytest.raises(p.ProtocolError):
            p.validate({**minimal, **bad})
    with pytest.raises(TypeError):
        p.console_event(1, JOB, evnet="opened")


def test_the_document_states_the_current_minor() -> None:
    text = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")
    assert f"This document is minor {p.MINOR};" in text


def test_renew_tokens_is_minor_8_and_status_may_say_the_timeout() -> None:
    """``renew_tokens`` (to the supervisor only) names the job and its new timeout; its token
    lists are optional, their entries as strict as ``start_job``'s; ``status.job.timeout``
    (the timeout the supervisor knows) is optional and positive."""
    assert p.RENEW_MINOR == 8 <= p.MINOR
    bare = p.renew_tokens(1, JOB, 10.0)
    assert bare == {"type": "renew_tokens", "request_id": 1, "job_id": JOB, "timeout": 10.0}
    p.validate(bare)
    with pytest.raises(p.ProtocolError, match="unexpected"):
        p.parse(p.encode(bare), expect=p.TO_SWITCHBOARD)
    for bad in ({"timeout": 0}, {"timeout": "10"}, {"job_id": "x"},
                {"log_servers": [{"url": "http://l"}]},
                {"proxies": [{"url": "ws://p", "token": "t", "extra": 1}]},
                {"log_servers": [{"url": "http://l", "token": "t"}] * 9}):
        with pytest.raises(p.ProtocolError):
            p.validate({**bare, **bad})
    reported = {"id": JOB, "state": "ready", "stage": None, "timeout": 65.0}
    p.validate(p.status(2, reported))
    for bad_timeout in (0, -1, "65"):
        with pytest.raises(p.ProtocolError):
            p.validate(p.status(2, {**reported, "timeout": bad_timeout}))
