"""A supervisor restarted mid-job, end to end: the real switchboard, real PostgreSQL,
a real log server, and ``tml job logs --stream events``. The job's ``events``
stream ends with the drop the restart reported, every line exactly once."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from tests.support import mock_host, mock_job, switchboard_with_logs
from tests.util.waiting import eventually
from treadmill.cli.main import run as tml
from treadmill.supervisor.drivers import STAGES
from treadmill.supervisor.runner import RESTART_MESSAGE
from treadmill.supervisor.service import SupervisorService


@pytest_twisted.ensureDeferred
async def test_restart_mid_job_ships_the_final_event_line_once(migrated_database: str,
                                                               tmp_path: Path) -> None:
    async with switchboard_with_logs(migrated_database, tmp_path,
                                     scheduler_interval=0.2) as (sb, _):
        supervisor = await mock_host(sb, tmp_path / "sup", run_time=60.0)
        try:
            await supervisor.connected()
            job_id = await mock_job(sb.admin)

            async def job_state() -> str:
                return (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body["state"]

            async def ready() -> bool:
                return await job_state() == "ready"

            await eventually(ready, timeout=20)
            await supervisor.stopService()
            supervisor = SupervisorService(reactor, supervisor.config)  # the same host again
            supervisor.startService()

            async def terminated() -> bool:
                return await job_state() == "terminated"

            await eventually(terminated, timeout=20)
            out, err = io.StringIO(), io.StringIO()
            code = await tml(reactor, ["--url", sb.url, "--token", sb.admin_token, "job", "logs",
                                       job_id, "--stream", "events", "--follow"], out, err, {})
            assert code == 0, err.getvalue()  # --follow ends: the stream was closed
            lines = [json.loads(line) for line in out.getvalue().splitlines()]
            assert [e.get("stage") or e["state"] for e in lines] == [*STAGES, "ready",
                                                                     "terminated"]
            assert lines[-1] == {"job_id": job_id, "state": "terminated",
                                 "reason": "host_dropped_job", "message": RESTART_MESSAGE}
            body = (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body
            assert body["termination"]["reason"] == "host_dropped_job"
        finally:
            await supervisor.stopService()
