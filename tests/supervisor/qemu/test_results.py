"""A QEMU job whose results come from the guest's agent, end to end: switchboard, image
store, log server and a supervisor with the qemu driver; tml job results as JUnit and TAP."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

pytest.importorskip("treadmill.imagestore.service")

from tests.supervisor.qemu.conftest import BuiltImage, needs_qemu
from tests.supervisor.qemu.support import VmBed, job_reaches, push, vm_bed
from tests.supervisor.support import failed_junit_counts
from tests.support import closed_stream
from treadmill.cli.main import run as tml

pytestmark = needs_qemu


@pytest_twisted.async_yield_fixture
async def bed(migrated_database: str, tmp_path: Path) -> AsyncIterator[VmBed]:
    async with vm_bed(migrated_database, tmp_path, logs=True) as running:
        yield running


@pytest_twisted.ensureDeferred
async def test_a_qemu_jobs_results_come_from_its_agent(bed: VmBed, test_image: BuiltImage
                                                       ) -> None:
    sb, log_url = bed.sb, bed.log_url
    assert log_url is not None
    await push(sb, bed.store_url, test_image, "demo/tiny-vm")
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

    assert await failed_junit_counts(sb, job_id) == ("4", "1", "1")
    out, err = io.StringIO(), io.StringIO()
    code = await tml(reactor, ["--url", sb.url, "--token", sb.admin_token, "job", "results",
                               job_id, "--tap"], out, err, {})
    assert code == 4, err.getvalue()
    assert out.getvalue().splitlines()[:6] == [
        "TAP version 13", "1..4", "ok 1 - boot", "  ---", "  duration: 0.01",
        out.getvalue().splitlines()[5]]
    assert "not ok 4 - disk" in out.getvalue() and "ok 3 - net # SKIP" in out.getvalue()
