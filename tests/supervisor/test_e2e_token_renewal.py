"""An extended job's tokens, end to end: a real switchboard, real PostgreSQL, a real log
server and a mock supervisor. A job's ``start_job`` tokens live its timeout plus an hour
(here plus nothing: ``TOKEN_SLACK`` is 0); a job extended well past that keeps shipping
its console, and its streams close at its end, because the switchboard sends fresh tokens
(``renew_tokens``) at the extension, or at the next reconciliation when the supervisor
missed it."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.support import closed_stream, job_reaches, mock_host, mock_job, switchboard_with_logs
from tests.util.waiting import within
from treadmill.cli.main import run as tml
from treadmill.switchboard import jobstart

TIMEOUT = 2.0  # the job's first timeout: its tokens die about 5 s later (the log server's leeway)
EXTENSION = 9.0  # so that it runs well past them
RATE = 400.0  # console bytes per second (some 11 lines)


async def _followed(sb: Any, job_id: str, stream: str) -> str:
    """``tml job logs --follow`` of ``stream`` (a job's ``events``: it returns once the
    job's final line is there)."""
    out, err = io.StringIO(), io.StringIO()
    code = await within(tml(reactor, ["--url", sb.url, "--token", sb.admin_token, "job",
                                      "logs", job_id, "--stream", stream, "--follow"],
                            out, err, {}), timeout=20)
    assert code == 0, err.getvalue()
    return out.getvalue()


async def _run_extended(sb: Any, log_url: str, tmp_path: Path, extend: Any) -> None:
    """A job extended by ``extend(job_id)`` once ready runs to its new deadline, and its
    console and events, shipped all along, are closed at its end."""
    supervisor = await mock_host(sb, tmp_path / "sup", run_time=600.0, console_rate=RATE)
    try:
        await supervisor.connected()
        job_id = await mock_job(sb.admin, timeout=TIMEOUT)
        await job_reaches(sb.admin, job_id, "ready", timeout=20)
        await extend(job_id)
        ended = await job_reaches(sb.admin, job_id, "terminated", timeout=40)
        assert ended["termination"]["reason"] == "execution_timeout"
        # The supervisor closed the streams (with the fresh token: the first ones are dead)
        # and the lines of the job's whole run reached the log server.
        console = (await closed_stream(sb.admin, log_url, job_id, "console")).decode()
        lines = [line for line in console.splitlines() if line.startswith("mock console")]
        assert len(lines) >= (TIMEOUT + EXTENSION - 2.0) * RATE / 40, len(lines)
        events = [json.loads(line) for line in (await _followed(sb, job_id, "events"))
                  .splitlines()]
        assert events[-1]["state"] == "terminated"
        assert events[-1]["reason"] == "execution_timeout"
        runner = supervisor.runner
        assert runner.current_job is None and not supervisor.logs.shippers
    finally:
        await supervisor.stopService()


@pytest_twisted.ensureDeferred
async def test_an_extended_job_ships_logs_past_its_first_tokens(
        migrated_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobstart, "TOKEN_SLACK", 0.0)
    async with switchboard_with_logs(migrated_database, tmp_path, scheduler_interval=0.2,
                                     timeout_interval=0.1) as (sb, logs):
        async def extend(job_id: str) -> None:
            r = await sb.admin.post(f"/api/v1/jobs/{job_id}/extend", {"by": EXTENSION})
            assert r.status == 200, r.body

        await _run_extended(sb, logs.url, tmp_path, extend)


@pytest_twisted.ensureDeferred
async def test_a_missed_extension_is_renewed_by_the_reconciliation(
        migrated_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor never heard of the extension (its link was down, or the notification
    was lost): its ``status`` reports the first timeout, and reconciling renews."""
    monkeypatch.setattr(jobstart, "TOKEN_SLACK", 0.0)
    async with switchboard_with_logs(migrated_database, tmp_path, scheduler_interval=0.2,
                                     timeout_interval=0.1) as (sb, logs):
        async def extend(job_id: str) -> None:
            async def quietly(cur: Any) -> None:  # no "extended" notification
                await cur.execute(
                    "UPDATE jobs SET timeout = timeout + %(by)s, deadline = deadline "
                    "+ make_interval(secs => %(by)s) WHERE id = %(id)s",
                    {"id": job_id, "by": EXTENSION})

            await sb.store.pool.transaction(quietly)
            [link] = sb.service.links.by_host.values()
            await link.reconcile()

        await _run_extended(sb, logs.url, tmp_path, extend)
