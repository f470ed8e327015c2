"""A QEMU job whose results come from the guest's agent, end to end: switchboard, image
store, log server and a supervisor with the qemu driver; tml job results as JUnit and TAP."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import pytest_twisted
from twisted.internet import reactor

pytest.importorskip("treadmill.imagestore.service")

from tests.supervisor.qemu.conftest import BuiltImage, needs_qemu
from tests.supervisor.qemu.test_service import (
    job_reaches,
    push,
    qemu_host,
)
from tests.support import (
    RunningSwitchboard,
    closed_stream,
    start_switchboard_with_logs,
    store_service,
    url_of,
)
from treadmill.cli.main import run as tml
from treadmill.supervisor.service import SupervisorService

pytestmark = needs_qemu


@pytest_twisted.async_yield_fixture
async def bed(migrated_database: str, tmp_path: Path, test_image: BuiltImage
              ) -> AsyncIterator[tuple[RunningSwitchboard, str, str]]:
    sb, logs = await start_switchboard_with_logs(migrated_database, tmp_path,
                                                 scheduler_interval=0.2, timeout_interval=0.1)
    log_url = logs.url
    store = store_service(sb, tmp_path / "store")
    store.startService()
    work_dir = tempfile.mkdtemp(prefix="tq-", dir="/tmp")
    supervisor: SupervisorService | None = None
    try:
        await store.ready()
        store_url = url_of(store)
        supervisor = SupervisorService(reactor, await qemu_host(sb, "vm-1", tmp_path / "vm-1",
                                                                work_dir))
        supervisor.startService()
        await supervisor.ready()
        await supervisor.connected()
        await push(sb, store_url, test_image, "demo/tiny-vm")
        yield sb, log_url, work_dir
    finally:
        if supervisor is not None:
            await supervisor.stopService()
        await store.stopService()
        await sb.stop()
        await logs.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_a_qemu_jobs_results_come_from_its_agent(bed: Any) -> None:
    sb, log_url, _ = bed
    r = await sb.admin.post("/api/v1/jobs", {
        "image": "demo/tiny-vm", "tags": ["qemu"],
        "parameters": {"tests": {"value": "boot:pass virtio:pass net:skip disk:fail"},
                       "exit_status": {"value": "1"}}})
    assert r.status == 201, r.body
    job_id = r.body["id"]
    final = await job_reaches(sb, job_id, "terminated")
    assert final["termination"]["reason"] == "workload_exited", final
    assert final["termination"]["exit_status"] == 1, final

    results = await closed_stream(sb.admin, log_url, job_id, "results")
    lines = [json.loads(line) for line in results.decode().splitlines()]
    assert [(x["type"], x.get("name"), x["result"]) for x in lines] == [
        ("test_case", "boot", "pass"), ("test_case", "virtio", "pass"),
        ("test_case", "net", "skip"), ("test_case", "disk", "fail"), ("summary", None, "fail")]
    assert all(x["source"] == "agent" and x["measurements"][0]["name"] == "uptime"
               for x in lines[:4])
    assert lines[-1] == {"type": "summary", "result": "fail", "passed": 2, "failed": 1,
                         "skipped": 1, "errors": 0, "exit_status": 1,
                         "message": "guest tests fail"}

    out, err = io.StringIO(), io.StringIO()
    code = await tml(reactor, ["--url", sb.url, "--token", sb.admin_token, "job", "results",
                               job_id, "--junit"], out, err, {})
    assert code == 4, err.getvalue()
    suite = ElementTree.fromstring(out.getvalue().encode()).find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "1", "1")
    out, err = io.StringIO(), io.StringIO()
    code = await tml(reactor, ["--url", sb.url, "--token", sb.admin_token, "job", "results",
                               job_id, "--tap"], out, err, {})
    assert code == 4, err.getvalue()
    assert out.getvalue().splitlines()[:6] == [
        "TAP version 13", "1..4", "ok 1 - boot", "  ---", "  duration: 0.01",
        out.getvalue().splitlines()[5]]
    assert "not ok 4 - disk" in out.getvalue() and "ok 3 - net # SKIP" in out.getvalue()
