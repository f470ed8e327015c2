"""Proxy control protocol v1: the code's messages and the committed JSON Schema agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from treadmill.protocol import proxy as p

CONN = "c" * 32

BUILT = {
    "welcome": p.welcome("job-1", 40000, False, "proxy.example", 30.0, ["ssh"]),
    "publish": p.publish(1, "ssh", tcp=True, websocket=True, authenticates=True),
    "published": p.published(1, "ssh", "proxy.example", tcp_port=40001,
                             ws_path="/v1/tunnels/" + CONN, ws_url="ws://p/v1/tunnels/x",
                             auth="service"),
    "unpublish": p.unpublish(2, "ssh"),
    "unpublished": p.unpublished(2, "ssh"),
    "connect": p.connect(CONN, "ssh"),
    "connect_failed": p.connect_failed(CONN, "refused"),
    "error": p.error(3, "not_published", "no such service", service="ssh"),
    "protocol_error": p.protocol_error("bad"),
    "console": p.console("opened", CONN, "console", "alice", "manage", "192.0.2.7",
                         1765000000.5, jti="j" * 22),
}


def test_every_type_has_a_constructor_and_a_schema() -> None:
    in_schema = set(p.schema()["properties"]["type"]["enum"])
    assert in_schema == set(p.TO_PROXY) | set(p.TO_SUPERVISOR) == set(BUILT)
    for kind in in_schema:
        assert callable(getattr(p, kind, None)), f"no constructor for {kind}"
    defs = {rule["then"]["$ref"].split("/")[-1] for rule in p.schema()["allOf"]}
    assert len(defs) == len(in_schema)


def test_error_codes_match_the_schema() -> None:
    assert set(p.schema()["$defs"]["Error"]["properties"]["code"]["enum"]) == set(p.ERROR_CODES)


@pytest.mark.parametrize("kind", sorted(BUILT))
def test_built_messages_validate(kind: str) -> None:
    p.validate(BUILT[kind])
    direction = p.TO_SUPERVISOR if kind in p.TO_SUPERVISOR else p.TO_PROXY
    assert p.parse(p.encode(BUILT[kind]), expect=direction) == BUILT[kind]


def test_minimal_constructors_validate() -> None:
    for message in (p.publish(1, "echo"), p.published(1, "echo", "h"), p.connect_failed(CONN),
                    p.error(1, "internal_error", "x" * 5000)):
        p.validate(message)


@pytest.mark.parametrize("kind", sorted(BUILT))
def test_unknown_fields_are_violations(kind: str) -> None:
    with pytest.raises(p.ProtocolError):
        p.validate({**BUILT[kind], "surprise": 1})


@pytest.mark.parametrize("payload", [b"", b"{", b"[]", b"null", b'{"type": 5}', b'{"x": 1}',
                                     b'{"type": "connect"}', b"[" * 100000])
def test_garbage_is_a_violation(payload: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse(payload, expect=p.TO_SUPERVISOR + p.TO_PROXY)


def test_direction_is_enforced() -> None:
    with pytest.raises(p.ProtocolError, match="unexpected"):
        p.parse(p.encode(BUILT["connect"]), expect=p.TO_PROXY)


def test_console_notices_are_bounded_and_checked() -> None:
    """``console`` (minor 1): long subjects and peers are cut to the schema's bounds; a
    notice without a token's access, or with another, is a violation."""
    long = p.console("closed", CONN, "console", "u" * 500, "read", "p" * 500, 0.0, "j" * 500)
    p.validate(long)
    assert len(long["subject"]) == 128 and len(long["peer"]) == 200 and len(long["jti"]) == 128
    assert "jti" not in p.console("opened", CONN, "console", "bob", "read", "::1", 1.0)
    for bad in ({"access": "admin"}, {"event": "reopened"}, {"at": -1}, {"subject": ""},
                {"conn_id": "short"}):
        with pytest.raises(p.ProtocolError):
            p.validate({**BUILT["console"], **bad})


@pytest.mark.parametrize(("header", "minor"), [
    (None, 0), ("0", 0), ("1", 1), (str(p.MINOR + 3), p.MINOR), ("-4", 0), ("x", 0),
    (b"1", 1), ("", 0), ("2", 2),
])
def test_control_minor_negotiation(header: str | bytes | None, minor: int) -> None:
    """An older supervisor (no header) or a garbled one gets minor 0: no ``console``."""
    assert p.negotiate_minor(header) == minor
    assert p.CONSOLE_MINOR <= p.MINOR


def test_data_header_round_trip() -> None:
    line = p.data_header(CONN, "tok.en")
    assert p.parse_data_header(line.rstrip(b"\n")) == (CONN, "tok.en")
    with pytest.raises(p.ProtocolError):
        p.parse_data_header(b"TREADMILL-DATA/2 " + CONN.encode() + b" t")


def test_pool_lines_round_trip_and_refuse_anything_else() -> None:
    """Minor 2: the pooled data connection's header and the proxy's join line."""
    job = "3b1f5c9e-0c4e-4c38-9d4e-7f2b8a1c0d11"
    line = p.pool_header(job, "tok.en")
    assert line.endswith(b"\n") and p.parse_pool_header(line[:-1]) == (job, "tok.en")
    for bad in (b"TREADMILL-POOL/1 " + job.encode(), b"TREADMILL-POOL/2 j t",
                b"TREADMILL-POOL/1 -job t", b"TREADMILL-POOL/1 j t x",
                b"TREADMILL-POOL/1 " + b"j" * 129 + b" t", b"TREADMILL-POOL/1 j t\x00",
                p.data_header(CONN, "t").rstrip(b"\n")):
        with pytest.raises(p.ProtocolError):
            p.parse_pool_header(bad)
    join = p.join_line("ssh")
    assert join == b"TREADMILL-JOIN/1 ssh\n" and p.parse_join_line(join[:-1]) == "ssh"
    assert len(p.join_line("s" * 63)) <= p.MAX_JOIN_BYTES
    for bad in (b"TREADMILL-JOIN/1", b"TREADMILL-JOIN/1 -ssh", b"TREADMILL-JOIN/1 a b",
                b"TREADMILL-JOIN/2 ssh", b"TREADMILL-JOIN/1 " + b"s" * 64):
        with pytest.raises(p.ProtocolError):
            p.parse_join_line(bad)


def test_welcome_names_a_pool_only_when_given() -> None:
    assert "pool" not in BUILT["welcome"]
    offered = p.welcome("job-1", 40000, False, "h", 30.0, [], pool=8)
    p.validate(offered)
    assert offered["pool"] == 8
    for bad in (-1, p.MAX_POOL + 1, 1.5, True):
        with pytest.raises(p.ProtocolError):
            p.validate({**offered, "pool": bad})
    assert p.CONSOLE_MINOR < p.POOL_MINOR <= p.MINOR


def test_documentation_lists_every_type_and_close_code() -> None:
    text = (Path(__file__).parents[2] / "docs" / "proxy.md").read_text(encoding="utf-8")
    for kind in BUILT:
        assert f"| `{kind}` |" in text, kind
    documented = {int(code) for code in re.findall(r"^\| (\d{4}) \|", text, re.M)}
    assert {int(code) for code in p.CloseCode} | {int(code) for code in p.ConsoleCloseCode} \
        <= documented


def _schema_accepts(message: dict) -> bool:
    from treadmill.common.messages import check

    try:
        check(message, p.schema(), p.ProtocolError)
    except p.ProtocolError:
        return False
    return True


@pytest.mark.parametrize("message", [
    {"type": "connect", "conn_id": CONN, "service": "ssh"},
    {"type": "connect", "conn_id": "a" * 16, "service": "a"},
    {"type": "connect", "conn_id": "A-_" * 21 + "x", "service": "s." + "x" * 61},
    {"type": "connect", "conn_id": "a" * 15, "service": "ssh"},
    {"type": "connect", "conn_id": "a" * 65, "service": "ssh"},
    {"type": "connect", "conn_id": CONN + "\n", "service": "ssh"},
    {"type": "connect", "conn_id": CONN, "service": "ssh\n"},
    {"type": "connect", "conn_id": CONN, "service": "-ssh"},
    {"type": "connect", "conn_id": CONN, "service": "s" * 64},
    {"type": "connect", "conn_id": CONN, "service": "ß"},
    {"type": "connect", "conn_id": CONN + "=", "service": "ssh"},
    {"type": "connect", "conn_id": 5, "service": "ssh"},
    {"type": "connect", "conn_id": CONN, "service": ["ssh"]},
    {"type": "connect", "conn_id": CONN},
    {"type": "connect", "conn_id": CONN, "service": "ssh", "x": None},
])
def test_the_fast_connect_check_agrees_with_the_schema(message: dict) -> None:
    """``connect`` is checked by hand on the hot path; it accepts exactly what the schema
    accepts, and a refusal still names what is wrong (the schema's message)."""
    fast = p._valid_connect(message)
    assert fast == _schema_accepts(message), message
    if not fast:
        with pytest.raises(p.ProtocolError):
            p.validate(message)
