"""A supervisor restarted mid-job, end to end: the real switchboard, real PostgreSQL,
a real log server, and ``tml job logs --stream events``. The job's ``events``
stream ends with the drop the restart reported, every line exactly once."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from tests.support import start_switchboard
from tests.util.waiting import eventually
from treadmill.cli.main import run as tml
from treadmill.common.captoken import load_or_create_signing_key
from treadmill.dev.fleet import ws_url_for
from treadmill.logserver.service import LogServerConfig, LogServerService
from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.drivers import STAGES
from treadmill.supervisor.drivers.mock import MockSettings
from treadmill.supervisor.runner import RESTART_MESSAGE
from treadmill.supervisor.service import SupervisorService
from treadmill.switchboard.api import Limits

DIGEST = "sha256:" + "7" * 64


@pytest_twisted.ensureDeferred
async def test_restart_mid_job_ships_the_final_event_line_once(migrated_database: str,
                                                               tmp_path: Path) -> None:
    key = tmp_path / "capability-key.pem"
    load_or_create_signing_key(str(key))
    logserver = LogServerService(reactor, LogServerConfig(
        root=str(tmp_path / "logs"), listen=["tcp:0:interface=127.0.0.1"],
        auth={"auth.keys_file": str(key)}, fsync="never", access_log=False))
    logserver.startService()
    await logserver.ready()
    url = f"http://127.0.0.1:{logserver.ports()[0].getHost().port}"
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 limits=Limits(log_servers=(url,), log_replicas=1))
    host = await sb.admin.post("/api/v1/hosts", {"name": "mock-1", "tags": ["mock"]})
    config = SupervisorConfig(
        url=ws_url_for(sb.url), token=host.body["token"], state_dir=str(tmp_path / "sup"),
        reconnect_initial=0.1, reconnect_max=1.0, durable=False,
        driver_values=MockSettings(durations=dict.fromkeys(STAGES, 0.01), run_time=60.0).values())
    supervisor = SupervisorService(reactor, config)
    supervisor.startService()
    try:
        await supervisor.connected()
        job_id = (await sb.admin.post("/api/v1/jobs", {"image": DIGEST, "tags": ["mock"]})
                  ).body["id"]

        async def job_state() -> str:
            return (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body["state"]

        async def ready() -> bool:
            return await job_state() == "ready"

        await eventually(ready, timeout=20)
        await supervisor.stopService()
        supervisor = SupervisorService(reactor, config)
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
        await sb.stop()
        await logserver.stopService()
