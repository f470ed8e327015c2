"""The incremental Server-Sent Events parser, fed in awkward pieces."""

from __future__ import annotations

import pytest

from treadmill.cli.sse import SSEError, SSEMessage, SSEParser, json_objects

STREAM = (
    "\ufeff: comment line\n"
    "retry: 1000\n"
    "\n"
    'data: {"seq": 1, "msg": "caf\u00e9 \u2603 \U0001f600"}\r\n'
    "\r\n"
    "event: job\n"
    "id: 7\n"
    'data:{"seq": 2}\r'
    "\r"
    "data: first\n"
    "data\n"
    "data:  two spaces\n"
    "\n"
).encode()

EXPECTED = [
    SSEMessage("message", '{"seq": 1, "msg": "caf\u00e9 \u2603 \U0001f600"}', None),
    SSEMessage("job", '{"seq": 2}', "7"),
    SSEMessage("message", "first\n\n two spaces", "7"),
]


def parse_in_chunks(data: bytes, sizes: list[int]) -> list[SSEMessage]:
    parser = SSEParser()
    out: list[SSEMessage] = []
    pos = 0
    for size in sizes:
        out += parser.feed(data[pos : pos + size])
        pos += size
    out += parser.feed(data[pos:])
    out += parser.close()
    return out


def test_whole_stream():
    assert parse_in_chunks(STREAM, []) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13])
def test_fixed_size_chunks(size):
    assert parse_in_chunks(STREAM, [size] * (len(STREAM) // size + 1)) == EXPECTED


def test_every_single_split_point():
    for i in range(len(STREAM) + 1):
        assert parse_in_chunks(STREAM, [i]) == EXPECTED, i


def test_crlf_split_between_chunks_is_one_line_break():
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r") == []
    a, b = SSEMessage("message", "a"), SSEMessage("message", "b")
    assert parser.feed(b"\ndata: b\n\n") == [a, b]


def test_lone_cr_at_end_of_stream_ends_the_line():
    parser = SSEParser()
    assert parser.feed(b"data: a\r\r") == []  # the second \r may yet become \r\n
    assert parser.feed(b"data: b\r") == [SSEMessage("message", "a")]
    assert parser.close() == [SSEMessage("message", "b")]


def test_messages_returned_as_soon_as_complete():
    parser = SSEParser()
    assert parser.feed(b"data: 1\n") == []
    assert parser.feed(b"\n") == [SSEMessage("message", "1")]


def test_close_keeps_last_complete_line_but_drops_partial_line():
    parser = SSEParser()
    parser.feed(b"data: complete\n")
    assert parser.close() == [SSEMessage("message", "complete")]
    parser = SSEParser()
    parser.feed(b"data: complete\ndata: trunc")
    assert parser.close() == []


def test_event_type_resets_after_dispatch_and_on_empty_message():
    parser = SSEParser()
    out = parser.feed(b"event: ping\n\ndata: x\n\n")
    assert out == [SSEMessage("message", "x")]


def test_overlong_line_is_refused():
    parser = SSEParser()
    with pytest.raises(SSEError):
        parser.feed(b"data: " + b"x" * (1 << 20) + b"x")


def test_json_objects_whole_data_or_one_per_line():
    assert json_objects(SSEMessage("message", '{"a": 1}')) == [{"a": 1}]
    assert json_objects(SSEMessage("message", '{\n"a": 1\n}')) == [{"a": 1}]
    assert json_objects(SSEMessage("message", '{"a": 1}\n{"a": 2}')) == [{"a": 1}, {"a": 2}]
    with pytest.raises(SSEError):
        json_objects(SSEMessage("message", "[1]"))
    with pytest.raises(SSEError):
        json_objects(SSEMessage("message", "not json"))
