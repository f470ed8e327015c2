"""Stream names and job ids: one test per row of the table."""

from __future__ import annotations

import pytest

from treadmill.logserver.names import InvalidName, check_job, check_stream

VALID_STREAMS = ["console", "events", "a", "0", "serial.1", "qemu-monitor", "x_y", "a.b.c",
                 "a" * 64, "9lives"]
INVALID_STREAMS = [
    "", ".", "..", "...", "a..b", "../etc", "a/b", "/a", "a\\b", "a\x00", "\x00",
    "Console", "-a", "_meta.json", ".hidden", "a b", "a" * 65, "é", "a\n", "con:sole",
]


@pytest.mark.parametrize("name", VALID_STREAMS)
def test_valid_stream_names(name: str) -> None:
    assert check_stream(name) == name


@pytest.mark.parametrize("name", INVALID_STREAMS)
def test_invalid_stream_names(name: str) -> None:
    with pytest.raises(InvalidName):
        check_stream(name)


@pytest.mark.parametrize("job", ["3f1c9a0b-e27d-4c55-9d1e-0123456789ab"])
def test_valid_job_ids(job: str) -> None:
    assert check_job(job) == job


@pytest.mark.parametrize("job", ["", "..", "3F1C9A0B-E27D-4C55-9D1E-0123456789AB",
                                 "3f1c9a0be27d4c559d1e0123456789ab", "job-1",
                                 "3f1c9a0b-e27d-4c55-9d1e-0123456789ab/..", None, 5])
def test_invalid_job_ids(job: object) -> None:
    with pytest.raises(InvalidName):
        check_job(job)
