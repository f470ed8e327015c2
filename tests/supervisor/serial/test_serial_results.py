"""A board without an agent: pass/fail and test cases from console patterns alone, end to
end (real switchboard, log server and supervisor with the serial driver; the fake board)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted

from tests.supervisor.serial.support import FakeBoard, board_host, write_cache
from tests.supervisor.support import failed_junit_counts
from tests.support import (
    RunningSwitchboard,
    closed_stream,
    switchboard_with_logs,
)
from tests.util.waiting import eventually

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
    async with switchboard_with_logs(migrated_database, tmp_path, scheduler_interval=0.2,
                                     timeout_interval=0.1) as (sb, logs):
        board = await FakeBoard(tmp_path / "board").start()
        try:
            async with board_host(sb, board, tmp_path, boot__ready="reset",
                                  agent__transport="none", health__timeout=5.0):
                yield sb, logs.url
        finally:
            board.stop()


async def run_to_end(sb: RunningSwitchboard, tmp_path: Path, app: bytes,
                     patterns: dict[str, str]) -> dict[str, Any]:
    """A board job of ``app`` with console ``patterns`` (a 600 s timeout), once ended."""
    digest = write_cache(tmp_path / "cache", {"app.bin": app})
    r = await sb.admin.post("/api/v1/jobs", {"image": digest, "tags": ["board"],
                                             "timeout": 600, "results": patterns})
    assert r.status == 201, r.body
    job_id = r.body["id"]

    async def ended() -> dict[str, Any] | None:
        job = (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body
        return job if job["state"] == "terminated" else None

    return await eventually(ended, timeout=60)


@pytest_twisted.ensureDeferred
async def test_a_board_job_ends_by_its_console_patterns(
        bed: tuple[RunningSwitchboard, str], tmp_path: Path) -> None:
    sb, log_url = bed
    started = time.monotonic()
    job = await run_to_end(sb, tmp_path, APP, TOCK)
    job_id = job["id"]
    assert time.monotonic() - started < 60  # not the 600 s timeout
    assert job["termination"] == {"reason": "workload_exited", "exit_status": 1,
                                  "message": "test result: FAILED. 1 passed; 1 failed; "
                                             "1 ignored"}, job
    host = (await sb.admin.get("/api/v1/hosts/board-1")).body
    assert host["healthy"] is True and host["consecutive_failures"] == 0

    results = await closed_stream(sb.admin, log_url, job_id, "results")
    lines = [json.loads(line) for line in results.decode().splitlines()]
    assert [(x["type"], x.get("name"), x["result"]) for x in lines] == [
        ("test_case", "alarm::one_shot", "pass"), ("test_case", "aes::ctr", "fail"),
        ("test_case", "rng::entropy", "skip"), ("summary", None, "fail")]

    assert await failed_junit_counts(sb, job_id) == ("3", "1", "1")


# A Linux init's TAP lines (docs/results.md), without a pass pattern: the run passes when
# no test case failed. Line noise on the serial line (a stray byte, a character cut in
# two) must not hide the failing case: it passed the job, exit status 0.
INIT = {"test_case": r"^(?P<result>ok|not ok) [0-9]+ (?P<name>.+)$", "end": r"^init: tests done$"}
NOISY = (b"print ok 1 mount-root\xff\n"
         b"print not ok 2 ping \xe2\x82\n"
         b"print init: tests done\n"
         b"hang\n")


@pytest_twisted.ensureDeferred
async def test_line_noise_does_not_hide_a_failed_test_case(
        bed: tuple[RunningSwitchboard, str], tmp_path: Path) -> None:
    sb, log_url = bed
    job = await run_to_end(sb, tmp_path, NOISY, INIT)
    assert job["termination"]["exit_status"] == 1, job
    results = await closed_stream(sb.admin, log_url, job["id"], "results")
    lines = [json.loads(line) for line in results.decode().splitlines()]
    assert [(x["type"], x.get("name"), x["result"]) for x in lines] == [
        ("test_case", "mount-root\ufffd", "pass"), ("test_case", "ping \ufffd", "fail"),
        ("summary", None, "fail")]
