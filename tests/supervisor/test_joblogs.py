"""A supervisor's job logs across restarts: one shipper per job, the last event line
always there, exactly once; a held failed job's logs stay open (its held host's console
goes on into them) until its hold ends, however it ends.

Real parts: the supervisor (mock driver) in-process, a real log server on
loopback, the fake switchboard peer over a real WebSocket.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.logserver.support import Keys, LaterLogServer, LogClient, start_logserver
from tests.supervisor.peer import JOB_A, FakeSwitchboard, job
from tests.util.running import stopping
from tests.util.waiting import eventually, sleep
from treadmill.protocol.logs import HOLD_MARKER, hold_end_marker
from treadmill.supervisor import joblogs
from treadmill.supervisor.hold import END_REASONS
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


async def stream(server_url: str, keys: Keys, name: str) -> tuple[bytes, bool]:
    """The job's stream ``name`` on the log server, and whether it is closed."""
    answer = await LogClient(server_url).read(JOB_A, name, keys.token(JOB_A, "read"))
    if answer.code == 404:
        return b"", False  # nothing shipped yet
    assert answer.code == 200, (answer.code, answer.body)
    return answer.body, answer.header("x-stream-closed") == "1"


async def events_stream(server_url: str, keys: Keys) -> tuple[bytes, bool]:
    """The job's ``events`` stream on the log server, and whether it is closed."""
    return await stream(server_url, keys, "events")


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


# -- a held failed job's logs (hold_on_failure) -------------------------------------------

HELD = {"exit_status": 3, "run_time": 0.2, "console_rate": 4000}
"""A mock job that fails after 0.2 s, its console writing 4000 bytes a second meanwhile
and, while its host is held, on."""


def held_job(keys: Keys, url: str, hold: float = 60.0) -> dict[str, Any]:
    return {**logged_job(keys, url, **HELD), "hold_on_failure": hold}


def mock_console(data: bytes) -> None:
    """``data`` is the mock host's console, byte for byte, with the hold's two marker lines
    taken out: nothing lost, nothing repeated, across the job's end and its hold."""
    start = data.index(b"\r\n" + HOLD_MARKER)
    marker_end = data.index(b"]\r\n", start) + 3
    body = data[:start] + data[marker_end:]
    end = body.rindex(b"\r\n[treadmill: the hold is over: ")
    body = body[:end]
    lines = body.count(b"\n") + 1
    expected = b"".join(b"mock console %s line %08d\n" % (JOB_A[:8].encode(), n)
                        for n in range(1, lines + 1))
    assert expected.startswith(body), body[-200:]


async def closed_console(server_url: str, keys: Keys, reason: str) -> bytes:
    """The held job's closed ``console``: complete (:func:`mock_console`), its last line
    saying why the hold ended."""
    console, closed = await stream(server_url, keys, "console")
    assert closed
    mock_console(console)
    assert console.endswith(hold_end_marker(END_REASONS[reason]))
    return console


async def held_and_logging(conn: Any, server_url: str, keys: Keys) -> tuple[
        list[dict[str, Any]], int]:
    """Run :func:`held_job` to its held end: its events, and the console's length
    on the log server once it grew after the end."""
    events = await conn.events_until("terminated")
    assert events[-1]["held"] is True
    data, closed = b"", False

    async def grew_after_the_end() -> bool:
        nonlocal data, closed
        data, closed = await stream(server_url, keys, "console")
        return HOLD_MARKER in data and len(data) - data.index(HOLD_MARKER) > 400

    await eventually(grew_after_the_end, timeout=10)
    assert not closed
    lines, closed = await events_stream(server_url, keys)
    assert not closed and json.loads(lines.splitlines()[-1])["hold"] == "started"
    return events, len(data)


@pytest.mark.parametrize("reason", ["released", "expired"])
@pytest_twisted.ensureDeferred
async def test_a_held_hosts_console_is_logged_until_the_hold_ends(
        peer: FakeSwitchboard, supervisors: Make, tmp_path: Path, keys: Keys,
        reason: str) -> None:
    """Released (``tml job cancel``: a ``stop_job`` for the ended job) or expired, the
    hold's end closes the job's streams, the held host's console in them."""
    async with stopping(await start_logserver(tmp_path / "logs", keys)) as server:
        supervisors()
        conn = await peer.connection()
        await conn.start(held_job(keys, server.url, hold=60.0 if reason == "released" else 2.0))
        events, length = await held_and_logging(conn, server.url, keys)
        if reason == "released":
            assert (await conn.stop(JOB_A))["ok"]  # acked after the teardown
        lines = await finished(server.url, keys, tmp_path / "state")
        assert len(await closed_console(server.url, keys, reason)) > length
        assert states(lines[:len(events)]) == states(events)
        assert lines[len(events) - 1] == {**lines[len(events) - 1], "state": "terminated",
                                          "held": True, "exit_status": 3}
        started, ended = lines[len(events):]
        assert started == {"job_id": JOB_A, "hold": "started", "at": started["at"],
                           "until": started["until"]}
        assert started["at"] < started["until"] < "9"  # RFC 3339: 2026-…Z
        assert ended == {"job_id": JOB_A, "hold": "ended", "at": ended["at"],
                         "reason": reason, "message": END_REASONS[reason]}
        assert started["at"] <= ended["at"]


@pytest_twisted.ensureDeferred
async def test_a_restart_ends_a_mock_hold_and_its_logs_lose_nothing(
        peer: FakeSwitchboard, supervisors: Make, tmp_path: Path, keys: Keys,
        later: LaterLogServer, counted: type[Counted]) -> None:
    """The mock host dies with its supervisor, so a restart ends the hold: what its
    console wrote during the hold (the log server down all along: in the spool only) is
    shipped after the restart, and ``events`` says how the hold ended."""
    first = supervisors()
    conn = await peer.connection()
    await conn.start(held_job(keys, later.url))
    events = await conn.events_until("terminated")
    assert events[-1]["held"] is True
    spooled = counted.made[0]

    def console() -> int:
        return spooled.status()["streams"]["console"]["spooled"]

    at_the_end = console()
    await eventually(lambda: console() > at_the_end + 400)
    await first.stopService()
    assert first.runner.held == JOB_A  # it was held up to the stop
    length = console()

    restarted = supervisors()
    await restarted.ready()
    assert restarted.runner.held is None
    one_live_shipper_per_job(counted.made)
    async with stopping(await later.start()):
        lines = await finished(later.url, keys, tmp_path / "state")
        data = await closed_console(later.url, keys, "supervisor_restarted")
    assert len(data) > length
    assert states(lines[:len(events)]) == states(events)
    assert [line.get("hold") for line in lines[len(events):]] == ["started", "ended"]
    assert lines[-1]["reason"] == "supervisor_restarted"
