"""A board without an agent: pass/fail and test cases from console patterns alone, end to
end (real switchboard, log server and supervisor with the serial driver; the fake board)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest_twisted
import treq
from twisted.internet import reactor

from tests.supervisor.serial.support import FakeBoard, write_cache
from tests.support import RunningSwitchboard, start_switchboard
from tests.test_e2e_logs import start_logserver
from tests.util.waiting import eventually
from treadmill.cli.main import run as tml
from treadmill.common.captoken import load_or_create_signing_key
from treadmill.dev.fleet import ws_url_for
from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.service import SupervisorService
from treadmill.switchboard.api import Limits

TOCK = {"test_case": r"^test (?P<name>\S+) \.\.\. (?P<result>ok|FAILED|ignored)",
        "pass": r"^test result: ok\.", "fail": r"^test result: FAILED\.",
        "end": r"^test result: "}
APP = (b"print Running 3 tests\n"
       b"print test alarm::one_shot ... ok\n"
       b"print test aes::ctr ... FAILED\n"
       b"print test rng::entropy ... ignored\n"
       b"print test result: FAILED. 1 passed; 1 failed; 1 ignored\n"
       b"hang\n")  # no agent, no exit: without patterns only the timeout would end it


@pytest_twisted.async_yield_fixture
async def bed(migrated_database: str, tmp_path: Path
              ) -> AsyncIterator[tuple[RunningSwitchboard, str]]:
    key = tmp_path / "capability-key.pem"
    load_or_create_signing_key(str(key))
    logs, log_url = await start_logserver(tmp_path / "logs", key)
    sb = await start_switchboard(migrated_database, tmp_path, scheduler_interval=0.2,
                                 timeout_interval=0.1,
                                 limits=Limits(log_servers=(log_url,), log_replicas=1))
    board = await FakeBoard(tmp_path / "board").start()
    supervisor: SupervisorService | None = None
    try:
        r = await sb.admin.post("/api/v1/hosts", {"name": "board-1", "tags": ["board"]})
        assert r.status == 201, r.body
        supervisor = SupervisorService(reactor, SupervisorConfig(
            url=ws_url_for(sb.url), token=r.body["token"], state_dir=str(tmp_path / "sup"),
            reconnect_initial=0.1, reconnect_max=1.0, durable=False, driver="serial",
            images_cache_mount=str(tmp_path / "cache"),
            driver_values=board.settings(boot__ready="reset", agent__transport="none",
                                         health__timeout=5.0)))
        supervisor.startService()
        await supervisor.ready()
        await supervisor.connected()
        yield sb, log_url
    finally:
        if supervisor is not None:
            await supervisor.stopService()
            await supervisor.driver.shutdown()
        board.stop()
        await sb.stop()
        await logs.stopService()


@pytest_twisted.ensureDeferred
async def test_a_board_job_ends_by_its_console_patterns(
        bed: tuple[RunningSwitchboard, str], tmp_path: Path) -> None:
    sb, log_url = bed
    digest = write_cache(tmp_path / "cache", {"app.bin": APP})
    started = time.monotonic()
    r = await sb.admin.post("/api/v1/jobs", {"image": digest, "tags": ["board"],
                                             "timeout": 600, "results": TOCK})
    assert r.status == 201, r.body
    job_id = r.body["id"]

    async def ended() -> dict[str, Any] | None:
        job = (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body
        return job if job["state"] == "terminated" else None

    job = await eventually(ended, timeout=60)
    assert time.monotonic() - started < 60  # not the 600 s timeout
    assert job["termination"] == {"reason": "workload_exited", "exit_status": 1,
                                  "message": "test result: FAILED. 1 passed; 1 failed; "
                                             "1 ignored"}, job
    host = (await sb.admin.get("/api/v1/hosts/board-1")).body
    assert host["healthy"] is True and host["consecutive_failures"] == 0

    access = (await sb.admin.post(f"/api/v1/jobs/{job_id}/logs/token")).body
    headers = {"Authorization": f"Bearer {access['token']}"}

    async def closed() -> bool:
        r = await treq.get(f"{log_url}/v1/jobs/{job_id}/streams", headers=headers)
        streams = {s["name"]: s for s in (await r.json())["streams"]}
        return bool(streams.get("results", {}).get("closed"))

    await eventually(closed, timeout=20)
    r = await treq.get(f"{log_url}/v1/jobs/{job_id}/streams/results", headers=headers)
    lines = [json.loads(line) for line in (await r.content()).decode().splitlines()]
    assert [(x["type"], x.get("name"), x["result"]) for x in lines] == [
        ("test_case", "alarm::one_shot", "pass"), ("test_case", "aes::ctr", "fail"),
        ("test_case", "rng::entropy", "skip"), ("summary", None, "fail")]

    out, err = io.StringIO(), io.StringIO()
    code = await tml(reactor, ["--url", sb.url, "--token", sb.admin_token, "job", "results",
                               job_id, "--junit"], out, err, {})
    assert code == 4, err.getvalue()
    suite = ElementTree.fromstring(out.getvalue().encode()).find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
