"""The log server's HTTP API: appends at offsets, reads, listing, names and tokens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted

from tests.logserver.support import Keys, LogClient, Running, new_job, start_logserver

# -- appends -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_append_at_the_end_and_idempotent_retries(client: LogClient, keys: Keys) -> None:
    job = new_job()
    w = keys.token(job, "append")
    first = await client.append(job, "console", 0, b"hello ", w)
    assert (first.code, first.body) == (200, {"length": 6, "closed": False})
    assert first.header("x-stream-length") == "6"
    assert (await client.append(job, "console", 6, b"world", w)).body["length"] == 11
    # A retried append of bytes already stored: success, nothing added.
    retry = await client.append(job, "console", 6, b"world", w)
    assert (retry.code, retry.body["length"]) == (200, 11)
    assert (await client.append(job, "console", 0, b"hello world", w)).body["length"] == 11
    # Partly stored, partly new: the new part is appended.
    extended = await client.append(job, "console", 6, b"world!!", w)
    assert (extended.code, extended.body["length"]) == (200, 13)
    # An empty append at the end changes nothing.
    assert (await client.append(job, "console", 13, b"", w)).body["length"] == 13
    read = await client.read(job, "console", keys.token(job, "read"))
    assert read.body == b"hello world!!"


@pytest_twisted.ensureDeferred
async def test_a_gap_is_refused_with_the_length(client: LogClient, keys: Keys) -> None:
    job = new_job()
    w = keys.token(job, "append")
    await client.append(job, "console", 0, b"12345", w)
    gap = await client.append(job, "console", 9, b"x", w)
    assert gap.code == 409 and gap.error == "gap"
    assert gap.body["length"] == 5 and gap.header("x-stream-length") == "5"
    # The first append of a stream must start at 0.
    fresh = await client.append(job, "events", 3, b"x", w)
    assert (fresh.code, fresh.error, fresh.body["length"]) == (409, "gap", 0)
    listing = await client.list(job, w)
    assert [s["name"] for s in listing.body["streams"]] == ["console"]


@pytest_twisted.ensureDeferred
async def test_overlap_with_different_bytes_is_refused(client: LogClient, keys: Keys) -> None:
    job = new_job()
    w = keys.token(job, "append")
    await client.append(job, "console", 0, b"abcdef", w)
    for offset, data in ((0, b"abcdeX"), (2, b"cX"), (4, b"eG-and-more")):
        refused = await client.append(job, "console", offset, data, w)
        assert (refused.code, refused.error, refused.body["length"]) == (409, "conflict", 6)
    assert (await client.read(job, "console", keys.token(job, "read"))).body == b"abcdef"


@pytest_twisted.ensureDeferred
async def test_oversized_appends_are_refused(client: LogClient, keys: Keys) -> None:
    job = new_job()
    w = keys.token(job, "append")
    too_big = await client.append(job, "console", 0, b"x" * (1024 * 1024 + 1), w)
    assert (too_big.code, too_big.error) == (413, "too_large")
    exact = await client.append(job, "console", 0, b"x" * (1024 * 1024), w)
    assert (exact.code, exact.body["length"]) == (200, 1024 * 1024)


@pytest.mark.parametrize("query", ["", "?offset=", "?offset=-1", "?offset=1.5", "?offset=x",
                                   "?offset=99999999999999999999", "?offset=0&close=maybe"])
@pytest_twisted.ensureDeferred
async def test_bad_offsets(client: LogClient, keys: Keys, query: str) -> None:
    job = new_job()
    answer = await client.call("POST", f"/v1/jobs/{job}/streams/console{query}",
                               keys.token(job, "append"), data=b"x")
    assert (answer.code, answer.error) == (400, "bad_request")


@pytest_twisted.ensureDeferred
async def test_close_and_append_after_close(client: LogClient, keys: Keys) -> None:
    job = new_job()
    w = keys.token(job, "append")
    await client.append(job, "console", 0, b"last words", w)
    short = await client.close(job, "console", w, length=20)
    assert (short.code, short.error, short.body["length"]) == (409, "gap", 10)
    long = await client.close(job, "console", w, length=5)
    assert (long.code, long.error) == (409, "conflict")
    closed = await client.close(job, "console", w, length=10)
    assert (closed.code, closed.body) == (200, {"length": 10, "closed": True})
    assert (await client.close(job, "console", w)).code == 200  # twice: harmless
    late = await client.append(job, "console", 10, b"more", w)
    assert (late.code, late.error, late.body["length"]) == (409, "closed", 10)
    # A retry of stored bytes is still fine.
    retry = await client.append(job, "console", 5, b"words", w)
    assert (retry.code, retry.body) == (200, {"length": 10, "closed": True})
    # Append and close in one request; closing a stream never written creates it empty.
    both = await client.append(job, "serial", 0, b"bye", w, close=True)
    assert both.body == {"length": 3, "closed": True}
    assert (await client.close(job, "events", w)).body == {"length": 0, "closed": True}
    listing = await client.list(job, keys.token(job, "read"))
    assert listing.body["streams"] == [
        {"name": "console", "length": 10, "closed": True},
        {"name": "events", "length": 0, "closed": True},
        {"name": "serial", "length": 3, "closed": True}]


@pytest_twisted.ensureDeferred
async def test_too_many_streams(tmp_path: Path, keys: Keys) -> None:
    server = await start_logserver(tmp_path / "logs", keys, max_streams=2)
    try:
        client = LogClient(server.url)
        job = new_job()
        w = keys.token(job, "append")
        assert (await client.append(job, "a", 0, b"1", w)).code == 200
        assert (await client.append(job, "b", 0, b"1", w)).code == 200
        third = await client.append(job, "c", 0, b"1", w)
        assert (third.code, third.error) == (409, "too_many_streams")
        assert (await client.append(job, "a", 1, b"2", w)).code == 200
    finally:
        await server.stop()


# -- names -------------------------------------------------------------------------------


@pytest.mark.parametrize("segment", ["a%2Fb", "%2E%2E", "a..b", "%00", "a%00b", "Console",
                                     "_meta.json", "x" * 65, "caf%C3%A9", "a%5Cb"])
@pytest_twisted.ensureDeferred
async def test_invalid_stream_names_are_refused(client: LogClient, keys: Keys,
                                                logserver: Running, segment: str) -> None:
    job, w, r = keys.new_job()
    for method, path, token in (("POST", f"{segment}?offset=0", w), ("GET", segment, r),
                                ("POST", f"{segment}/close", w), ("GET", f"{segment}/follow", r)):
        answer = await client.call(method, f"/v1/jobs/{job}/streams/{path}", token, data=b"x")
        assert (answer.code, answer.error) == (400, "bad_request"), (method, path, answer)
        message = answer.body["error"]["message"]
        # A NUL is refused for any request, before routing (treadmill.common.http).
        assert "invalid stream name" in message or (
            "%00" in segment and "control character" in message), message
    assert not os.listdir(logserver.root / "jobs")


@pytest.mark.parametrize("job", ["not-a-uuid", "3F1C9A0B-E27D-4C55-9D1E-0123456789AB", "..",
                                 "%2E%2E"])
@pytest_twisted.ensureDeferred
async def test_invalid_job_ids_are_refused(client: LogClient, keys: Keys, job: str) -> None:
    answer = await client.call("POST", f"/v1/jobs/{job}/streams/console?offset=0",
                               keys.token(job.replace("%2E", "."), "append"), data=b"x")
    assert (answer.code, answer.error) == (400, "bad_request")
    listing = await client.call("GET", f"/v1/jobs/{job}/streams", keys.token(job, "read"))
    assert listing.code in (400, 404)


# -- tokens ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tokens_are_checked(client: LogClient, keys: Keys, tmp_path: Path) -> None:
    job, other = new_job(), new_job()
    w = keys.token(job, "append")
    await client.append(job, "console", 0, b"secret output", w)
    (tmp_path / "stranger").mkdir()
    stranger = Keys(tmp_path / "stranger")  # signs with a key the server does not know
    cases = [
        # (token, method, expected status, words in the message)
        (None, "read", 401, "required"),
        ("garbage", "read", 401, "malformed"),
        ("a.b.c", "read", 401, "malformed"),
        (keys.expired(job, "read"), "read", 401, "expired"),
        (keys.token(job, "read", audience="treadmill-imagestore"), "read", 401,
         "wrong_audience"),
        (stranger.token(job, "read"), "read", 401, "unknown_key"),
        (keys.token(other, "read"), "read", 403, "does not grant read"),
        (w, "read", 403, "does not grant read"),
        (keys.token(job, "read"), "append", 403, "does not grant append"),
        (keys.token(other, "append"), "append", 403, "does not grant append"),
        (keys.expired(job, "append"), "append", 401, "expired"),
        (keys.token(job, "read"), "close", 403, "does not grant append"),
    ]
    for token, action, status, words in cases:
        if action == "read":
            answer = await client.read(job, "console", token)
        elif action == "append":
            answer = await client.append(job, "console", 13, b"!", token)
        else:
            answer = await client.close(job, "console", token)
        assert answer.code == status, (action, words, answer.body)
        assert answer.error == ("unauthenticated" if status == 401 else "forbidden")
        assert words in answer.body["error"]["message"], answer.body
        if status == 401:
            assert answer.header("www-authenticate") is not None
    # Nothing leaked, nothing changed.
    read = await client.read(job, "console", keys.token(job, "read"))
    assert read.body == b"secret output"
    # Listing takes either action, for this job only.
    assert (await client.list(job, w)).code == 200
    assert (await client.list(job, keys.token(job, "read"))).code == 200
    assert (await client.list(job, keys.token(other, "read"))).code == 403


# -- reads -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_range_reads(client: LogClient, keys: Keys) -> None:
    job = new_job()
    data = bytes(range(256)) * 16 * 1024  # 4 MiB: many chunks
    w, r = keys.token(job, "append"), keys.token(job, "read")
    for offset in range(0, len(data), 1024 * 1024):
        assert (await client.append(job, "console", offset,
                                    data[offset:offset + 1024 * 1024], w)).code == 200
    whole = await client.read(job, "console", r)
    assert whole.code == 200 and whole.body == data
    assert whole.header("accept-ranges") == "bytes"
    for header, start, end in (("bytes=2-4", 2, 5), ("bytes=100000-", 100000, len(data)),
                               ("bytes=-3", len(data) - 3, len(data)),
                               ("bytes=5-99999999999", 5, len(data))):
        part = await client.read(job, "console", r, headers={"range": header})
        assert part.code == 206 and part.body == data[start:end], header
        assert part.header("content-range") == f"bytes {start}-{end - 1}/{len(data)}"
    for header in (f"bytes={len(data)}-", "bytes=-0"):
        refused = await client.read(job, "console", r, headers={"range": header})
        assert refused.code == 416 and refused.header("content-range") == f"bytes */{len(data)}"
    ignored = await client.read(job, "console", r, headers={"range": "bytes=0-1,5-6"})
    assert ignored.code == 200 and len(ignored.body) == len(data)
    tail = await client.read(job, "console", r, "?offset=4194300")
    assert tail.code == 200 and tail.body == data[4194300:]
    assert (await client.read(job, "console", r, f"?offset={len(data)}")).body == b""
    past = await client.read(job, "console", r, f"?offset={len(data) + 1}")
    assert past.code == 416
    head = await client.call("HEAD", f"/v1/jobs/{job}/streams/console", r)
    assert head.code == 200 and head.header("x-stream-length") == str(len(data))
    assert head.header("x-stream-closed") == "0"
    missing = await client.read(job, "nothing", r)
    assert (missing.code, missing.error) == (404, "not_found")


@pytest_twisted.ensureDeferred
async def test_list_streams(client: LogClient, keys: Keys) -> None:
    job, w, r = keys.new_job()
    assert (await client.list(job, r)).body == {"job": job, "streams": []}
    await client.append(job, "events", 0, b'{"state":"ready"}\n', w)
    await client.append(job, "console", 0, b"boot", w)
    listing = await client.list(job, r)
    assert listing.body == {"job": job, "streams": [
        {"name": "console", "length": 4, "closed": False},
        {"name": "events", "length": 18, "closed": False}]}


@pytest_twisted.ensureDeferred
async def test_streams_survive_a_restart(tmp_path: Path, keys: Keys) -> None:
    root = tmp_path / "logs"
    job, w, r = keys.new_job()
    server = await start_logserver(root, keys, fsync="always")
    client = LogClient(server.url)
    await client.append(job, "console", 0, b"before", w)
    await client.append(job, "events", 0, b"e1\n", w, close=True)
    await server.stop()
    assert sorted(os.listdir(root / "jobs" / job)) == ["_meta.json", "console", "events"]
    server = await start_logserver(root, keys)
    try:
        client = LogClient(server.url)
        assert (await client.list(job, r)).body["streams"] == [
            {"name": "console", "length": 6, "closed": False},
            {"name": "events", "length": 3, "closed": True}]
        assert (await client.append(job, "console", 6, b" after", w)).body["length"] == 12
        assert (await client.append(job, "console", 0, b"befoRE", w)).error == "conflict"
        assert (await client.append(job, "events", 3, b"e2", w)).error == "closed"
        assert (await client.read(job, "console", r)).body == b"before after"
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_unknown_endpoints_and_methods(client: LogClient, keys: Keys) -> None:
    job = new_job()
    r = keys.token(job, "read")
    assert (await client.call("GET", "/v1/nothing", r)).code == 404
    missing = await client.call("GET", f"/v1/jobs/{job}/streams/console/bogus", r)
    assert (missing.code, missing.error) == (404, "not_found")
    wrong = await client.call("DELETE", f"/v1/jobs/{job}/streams", r)
    assert (wrong.code, wrong.error) == (405, "method_not_allowed")
    assert (await client.call("GET", "/healthz")).body == {"status": "ok"}
