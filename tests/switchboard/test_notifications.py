"""The notification payloads: each parses what it formats, and bad payloads parse to None."""

from __future__ import annotations

import pytest

from treadmill.switchboard.notifications import HostNote, JobNote, SnapshotNote

JOB = "0b7c1a52-93c4-4f1e-9a57-3d1f2f6e8a10"


@pytest.mark.parametrize("note", [
    JobNote(JOB, "queued", None),
    JobNote(JOB, "assigned", 7),
    HostNote(3, "5f0c4d0e-2b1a-4c55-8f7e-9a0d7d0e1c2b"),
    HostNote(3, None),
    SnapshotNote(12),
    SnapshotNote(None),
])
def test_round_trip(note):
    assert type(note).parse(note.format()) == note


@pytest.mark.parametrize(("payload", "expected"), [
    (f"{JOB} terminated 4", JobNote(JOB, "terminated", 4)),
    (f"{JOB} queued -", JobNote(JOB, "queued", None)),
    (f"{JOB} queued", None),  # the shape before migration 0002
    (f"{JOB} assigned host-1", None),
    ("", None),
])
def test_job_notes(payload, expected):
    assert JobNote.parse(payload) == expected


@pytest.mark.parametrize(("payload", "expected"), [
    ("3 -", HostNote(3, None)),
    ("3 abc", HostNote(3, "abc")),
    ("rack-1", None),  # the shape before migration 0002
    ("x -", None),
])
def test_host_notes(payload, expected):
    assert HostNote.parse(payload) == expected


@pytest.mark.parametrize(("payload", "expected"), [
    ("12", SnapshotNote(12)), ("-", SnapshotNote(None)), ("twelve", None)])
def test_snapshot_notes(payload, expected):
    assert SnapshotNote.parse(payload) == expected
