"""The log server's wire contract: the name grammar and the URLs of its routes."""

from __future__ import annotations

import pytest

from treadmill.protocol import logs

JOB = "3f1c9a0b-e27d-4c55-9d1e-0123456789ab"


@pytest.mark.parametrize("name", ["console", "events", "serial.1", "qemu-monitor", "a" * 64])
def test_valid_stream_names(name: str) -> None:
    assert logs.is_stream(name)


@pytest.mark.parametrize("name", ["", "Console", "_meta.json", ".x", "a..b", "a/b", "a" * 65,
                                  "a\n", None, 5])
def test_invalid_stream_names(name: object) -> None:
    assert not logs.is_stream(name)


def test_job_ids_are_canonical_uuids() -> None:
    assert logs.is_job(JOB)
    assert not logs.is_job(JOB.upper())
    assert not logs.is_job(JOB + "\n")
    assert not logs.is_job(None)


def test_urls() -> None:
    base = "https://logs.example/"
    stream = f"https://logs.example/v1/jobs/{JOB}/streams/console"
    assert logs.streams_url(base, JOB) == f"https://logs.example/v1/jobs/{JOB}/streams"
    assert logs.stream_url(base, JOB, "console") == stream
    assert logs.append_url(base, JOB, "console", 7) == stream + "?offset=7"
    assert logs.append_url(base, JOB, "console", 7, close=True) == stream + "?offset=7&close=1"
    assert logs.close_url(base, JOB, "console") == stream + "/close"
    assert logs.close_url(base, JOB, "console", 9) == stream + "/close?length=9"
    assert logs.follow_url(base, JOB, "console", 3) == \
        f"wss://logs.example/v1/jobs/{JOB}/streams/console/follow?offset=3"
    assert logs.follow_url("http://l:1", JOB, "e").startswith("ws://l:1/")


def test_close_codes_are_ones_an_application_may_send() -> None:
    for code in logs.FOLLOW_CLOSE_CODES.values():
        assert code == 1000 or 3000 <= code <= 4999
