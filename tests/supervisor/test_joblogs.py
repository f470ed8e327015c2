"""A supervisor's job logs across restarts: one shipper per job, the last event line
always there, exactly once.

Real parts: the supervisor (mock driver) in-process, a real log server on
loopback, the fake switchboard peer over a real WebSocket.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest_twisted

from tests.logserver.support import Keys, LaterLogServer, LogClient, start_logserver
from tests.supervisor.peer import JOB_A, FakeSwitchboard, job
from tests.util.running import stopping
from tests.util.waiting import eventually, sleep
from treadmill.supervisor import joblogs
from treadmill.supervisor.logship import LOGS_DIR, LogShipper
from treadmill.supervisor.runner import RESTART_MESSAGE
from treadmill.supervisor.service import SupervisorService

Make = Callable[..., SupervisorService]


class Counted(LogShipper):
    """A real LogShipper that remembers each instance made, to count them per job."""

    made: list[Counted] = []

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        Counted.made.append(self)

    @property
    def stopped(self) -> bool:
        return self._stopped


@pytest_twisted.async_yield_fixture
async def counted(monkeypatch: Any) -> AsyncIterator[type[Counted]]:
    Counted.made = []
    monkeypatch.setattr(joblogs, "LogShipper", Counted)
    yield Counted
    for shipper in Counted.made:  # nothing may outlive its supervisor
        shipper.halt()


WORKLOAD_EXITED = {"job_id": JOB_A, "state": "terminated", "reason": "workload_exited",
                   "exit_status": 0, "message": "mock workload finished"}
"""The last events line of the job :func:`ended_unshipped` runs."""


def logged_job(keys: Keys, url: str, **mock: Any) -> dict[str, Any]:
    return {**job(**mock), "log_servers": [{"url": url, "token": keys.token(JOB_A, "append")}]}


async def events_stream(server_url: str, keys: Keys) -> tuple[bytes, bool]:
    """The job's ``events`` stream on the log server, and whether it is closed."""
    answer = await LogClient(server_url).read(JOB_A, "events", keys.token(JOB_A, "read"))
    if answer.code == 404:
        return b"", False  # nothing shipped yet
    assert answer.code == 200, (answer.code, answer.body)
    return answer.body, answer.header("x-stream-closed") == "1"


async def finished(server_url: str, keys: Keys, state: Path) -> list[dict[str, Any]]:
    """Wait until the events stream is closed and the spool gone; its lines."""
    for _ in range(500):
        data, closed = await events_stream(server_url, keys)
        if closed and not (state / LOGS_DIR / JOB_A).exists():
            break
        await sleep(0.02)
    assert closed, data
    assert not (state / LOGS_DIR / JOB_A).exists()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def states(lines: list[dict[str, Any]]) -> list[str]:
    return [e.get("stage") or e["state"] for e in lines]


async def ended_unshipped(peer: FakeSwitchboard, supervisors: Make, keys: Keys,
                          later: LaterLogServer, state: Path
                          ) -> tuple[list[dict[str, Any]], Path]:
    """A short job run to its end by a supervisor stopped right after, while the log
    server is down: the job's events, and its spool, left in ``state`` for the next."""
    first = supervisors()
    conn = await peer.connection()
    await conn.start(logged_job(keys, later.url, run_time=0.05, exit_status=0))
    events = await conn.events_until("terminated")
    await first.stopService()
    spool = state / LOGS_DIR / JOB_A
    assert spool.is_dir()
    return events, spool


def one_live_shipper_per_job(made: list[Counted]) -> None:
    live = [s.job_id for s in made if not s.stopped]
    assert len(live) == len(set(live)), live


@pytest_twisted.ensureDeferred
async def test_restart_with_a_job_in_flight(peer: FakeSwitchboard, supervisors: Make,
                                            tmp_path: Path, keys: Keys,
                                            counted: type[Counted]) -> None:
    async with stopping(await start_logserver(tmp_path / "logs", keys)) as server:
        first = supervisors()
        conn = await peer.connection()
        await conn.start(logged_job(keys, server.url, run_time="inf"))
        before = await conn.events_until("ready")
        await first.stopService()
        assert all(s.stopped for s in counted.made)
        assert (tmp_path / "state" / LOGS_DIR / JOB_A).is_dir()

        supervisors()
        conn2 = await peer.connection()
        dropped = await conn2.event()
        assert dropped["reason"] == "host_dropped_job"
        one_live_shipper_per_job(counted.made)
        lines = await finished(server.url, keys, tmp_path / "state")
        # Every event once, in order; the last is the drop the restart reported.
        assert states(lines) == [*states(before), "terminated"]
        assert lines[-1] == {"job_id": JOB_A, "state": "terminated",
                             "reason": "host_dropped_job", "message": RESTART_MESSAGE}
        assert len([s for s in counted.made[1:] if s.job_id == JOB_A]) == 1


@pytest_twisted.ensureDeferred
async def test_restart_after_the_job_ended_before_its_logs_were_shipped(
        peer: FakeSwitchboard, supervisors: Make, tmp_path: Path, keys: Keys,
        later: LaterLogServer, counted: type[Counted]) -> None:
    # The log server is down while the job runs.
    events, _spool = await ended_unshipped(peer, supervisors, keys, later, tmp_path / "state")
    assert all(s.stopped for s in counted.made)  # the closing shipper stopped too

    restarted = supervisors()
    await restarted.ready()
    one_live_shipper_per_job(counted.made)
    async with stopping(await later.start()):
        lines = await finished(later.url, keys, tmp_path / "state")
        assert states(lines) == states(events)
        assert lines[-1] == WORKLOAD_EXITED
        assert len(counted.made) == 2  # one before the restart, one after
        await eventually(lambda: all(s.finished for s in counted.made[1:]))


@pytest_twisted.ensureDeferred
async def test_restarts_while_the_log_server_is_down_lose_and_repeat_nothing(
        peer: FakeSwitchboard, supervisors: Make, tmp_path: Path, keys: Keys,
        later: LaterLogServer, counted: type[Counted]) -> None:
    server = await later.start()
    service = supervisors()
    conn = await peer.connection()
    await conn.start(logged_job(keys, later.url, run_time="inf"))
    before = await conn.events_until("ready")
    await eventually(lambda: counted.made[0].pending_bytes == 0)
    await server.stop()  # shipped so far; the rest waits in the spool
    for restart in range(3):
        await service.stopService()
        service = supervisors()
        conn = await peer.connection()
        await service.ready()
        if restart == 0:
            assert (await conn.event())["reason"] == "host_dropped_job"
        one_live_shipper_per_job(counted.made)
    async with stopping(await later.start()):
        lines = await finished(later.url, keys, tmp_path / "state")
        assert states(lines) == [*states(before), "terminated"]
        assert lines[-1]["reason"] == "host_dropped_job"
    assert not os.listdir(tmp_path / "state" / LOGS_DIR)


@pytest_twisted.ensureDeferred
async def test_a_final_line_lost_in_a_crash_is_added_once(
        peer: FakeSwitchboard, supervisors: Make, tmp_path: Path, keys: Keys,
        later: LaterLogServer, counted: type[Counted]) -> None:
    # The log server is down until the restart.
    events, spool = await ended_unshipped(peer, supervisors, keys, later, tmp_path / "state")
    # What a crash between journaling the final event and spooling its line leaves:
    # the runner knows how the job ended; the spool lacks the line and was not closing.
    (segment,) = sorted((spool / "spool" / "events").iterdir())
    lines = segment.read_bytes().splitlines(keepends=True)
    assert json.loads(lines[-1])["state"] == "terminated"
    segment.write_bytes(b"".join(lines[:-1]))
    cursors = json.loads((spool / "cursors.json").read_text())
    for stream in cursors["streams"].values():
        stream["closing"] = False
    (spool / "cursors.json").write_text(json.dumps(cursors))

    supervisors()
    async with stopping(await later.start()):
        shipped = await finished(later.url, keys, tmp_path / "state")
        assert states(shipped) == states(events)
        assert shipped[-1] == WORKLOAD_EXITED
