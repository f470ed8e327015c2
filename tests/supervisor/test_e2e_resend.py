"""Resent job events through the real switchboard: every event of a supervisor with a
tiny ack timeout goes out several times, and the job still ends as it did, each
state recorded once. Real switchboard, real PostgreSQL, real supervisor, tml."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from tests.support import mock_supervisor, start_switchboard
from tests.util.waiting import eventually
from treadmill.cli.main import run as tml
from treadmill.supervisor.drivers import STAGES

DIGEST = "sha256:" + "e" * 64


@pytest_twisted.ensureDeferred
async def test_repeated_events_are_applied_once(migrated_database: str, tmp_path: Path) -> None:
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 timeout_interval=0.1)
    r = await sb.admin.post("/api/v1/hosts", {"name": "mock-1", "tags": ["mock"]})
    assert r.status == 201, r.body
    state = tmp_path / "mock-1"
    sent: list[dict[str, object]] = []
    supervisor = mock_supervisor(sb.url, r.body["token"], state, stage_time=0.02, run_time=0.2,
                                 # resend before the ack comes
                                 config={"event_ack_timeout": 0.001, "event_resend_max": 0.02})
    try:
        session = await supervisor.connected()
        original = session.send

        def counting(message: dict[str, object]) -> bool:
            if message["type"] == "job_event":
                sent.append(message)
            return original(message)

        session.send = counting  # type: ignore[method-assign]
        out, err = io.StringIO(), io.StringIO()
        code = await tml(reactor, ["--url", sb.url, "--token", sb.admin_token, "job", "submit",
                                   DIGEST, "--tag", "mock", "--param", "mock.exit_status=0",
                                   "--follow", "--json"], out, err, {})
        assert code == 0, err.getvalue()
        job_id = json.loads(out.getvalue().splitlines()[0])["id"]
        body = (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body
        assert body["termination"]["reason"] == "workload_exited"
        assert body["termination"]["exit_status"] == 0
        events = (await sb.admin.get(f"/api/v1/jobs/{job_id}/events")).body["events"]
        seen = [e["stage"] or e["state"] for e in events]
        assert seen == ["queued", "assigned", *STAGES, "ready", "terminated"]
        # The supervisor did send copies, and keeps nothing unacknowledged.
        copies = [m for m in sent if m["job_id"] == job_id]
        assert len(copies) > len(STAGES) + 2
        async def acknowledged() -> bool:
            return supervisor.runner.pending_events == []

        await eventually(acknowledged)
        assert os.listdir(state / "journal") == []
    finally:
        await supervisor.stopService()
        await sb.stop()
