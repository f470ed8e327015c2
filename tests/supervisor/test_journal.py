"""The state directory's files, and start-up from what a crash left behind."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted

from tests.supervisor.peer import JOB_A, JOB_B, FakeSwitchboard, job
from tests.util.waiting import eventually
from treadmill.supervisor.journal import StateFiles, StateLocked
from treadmill.supervisor.service import SupervisorService

Make = Callable[..., SupervisorService]


def test_layout_modes_and_round_trip(tmp_path: Path) -> None:
    files = StateFiles(str(tmp_path / "state"))
    loaded = files.open()
    assert loaded.current is None and loaded.events == [] and loaded.next_seq == 1
    files.record(1, {"job_id": JOB_A, "state": "ready"},
                 current={"job": job(), "state": "ready", "stage": None})
    files.record(2, {"job_id": JOB_A, "state": "terminated", "reason": "workload_exited"},
                 clear_current=True, ended=[{"job_id": JOB_A, "state": "terminated"}])
    files.record(3, {"job_id": JOB_B, "state": "initializing", "stage": "starting"},
                 current={"job": job(JOB_B), "state": "initializing", "stage": "starting"})
    files.remove_event(1)
    files.close()

    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in (state / "current-job.json", state / "ended.json",
                 state / "journal" / "0000000000000002.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = StateFiles(str(state))
    loaded = again.open()
    assert [seq for seq, _ in loaded.events] == [2, 3]
    assert loaded.events[0][1]["reason"] == "workload_exited"
    assert loaded.next_seq == 4
    assert loaded.current["job"]["id"] == JOB_B
    assert loaded.ended == [{"job_id": JOB_A, "state": "terminated"}]
    again.close()


def test_one_supervisor_per_directory(tmp_path: Path) -> None:
    first = StateFiles(str(tmp_path))
    first.open()
    with pytest.raises(StateLocked):
        StateFiles(str(tmp_path)).open()
    first.close()
    second = StateFiles(str(tmp_path))
    second.open()
    second.close()


def test_leftovers_are_cleaned_and_corrupt_files_moved_aside(tmp_path: Path) -> None:
    (tmp_path / "journal").mkdir(parents=True)
    (tmp_path / "journal" / "0000000000000005.json.tmp").write_text("{")
    (tmp_path / "journal" / "0000000000000006.json").write_text("{not json")
    (tmp_path / "journal" / "README").write_text("ignored")
    (tmp_path / "current-job.json").write_text("garbage")
    files = StateFiles(str(tmp_path))
    loaded = files.open()
    files.close()
    assert loaded.current is None and loaded.events == []
    assert (tmp_path / "current-job.json.corrupt").exists()
    assert (tmp_path / "journal" / "0000000000000006.json.corrupt").exists()
    assert not (tmp_path / "journal" / "0000000000000005.json.tmp").exists()


def _crashed_state(state: Path, *, journal_final: bool, ended_final: bool) -> None:
    """A crash after the terminated event was journaled, before the cleanup."""
    files = StateFiles(str(state))
    files.open()
    files.record(None, None, current={"job": job(), "state": "ready", "stage": None})
    final = {"job_id": JOB_A, "state": "terminated", "reason": "workload_exited",
             "exit_status": 9}
    if journal_final:
        files.record(7, final)
    if ended_final:
        files.record(None, None, ended=[final])
    files.close()


@pytest.mark.parametrize("journal_final, ended_final", [(True, False), (True, True),
                                                        (False, True)])
@pytest_twisted.ensureDeferred
async def test_a_job_that_ended_before_a_crash_is_not_dropped(
        peer: FakeSwitchboard, supervisors: Make, tmp_path: Path, journal_final: bool,
        ended_final: bool) -> None:
    _crashed_state(tmp_path / "state", journal_final=journal_final, ended_final=ended_final)
    service = supervisors()
    conn = await peer.connection()
    if journal_final:
        event = await conn.event()
        assert event["state"] == "terminated" and event["exit_status"] == 9
    assert (await conn.status())["job"] is None
    await conn.nothing(0.1)  # no host_dropped_job
    assert not (tmp_path / "state" / "current-job.json").exists()
    assert service.runner.ended[-1]["exit_status"] == 9
    assert (await conn.stop(JOB_A))["ok"] is True  # remembered: its end is sent again
    assert (await conn.event())["exit_status"] == 9


@pytest_twisted.ensureDeferred
async def test_a_start_never_acknowledged_is_dropped_after_a_restart(
        peer: FakeSwitchboard, supervisors: Make, tmp_path: Path) -> None:
    files = StateFiles(str(tmp_path / "state"))
    files.open()
    files.record(None, None, current={"job": job(), "state": "assigned", "stage": None})
    files.close()
    supervisors()
    conn = await peer.connection()
    event = await conn.event()
    assert event["state"] == "terminated" and event["reason"] == "host_dropped_job"
    ended = json.loads((tmp_path / "state" / "ended.json").read_text())["jobs"]
    assert ended[-1]["reason"] == "host_dropped_job"


@pytest_twisted.ensureDeferred
async def test_invalid_journal_entries_are_dropped_not_sent(
        peer: FakeSwitchboard, supervisors: Make, tmp_path: Path) -> None:
    files = StateFiles(str(tmp_path / "state"))
    files.open()
    files.record(1, {"job_id": JOB_A, "state": "exploded"})
    files.record(2, {"job_id": JOB_A, "state": "terminated", "reason": "workload_exited",
                     "bogus": 1})
    files.record(3, {"job_id": JOB_A, "state": "terminated", "reason": "workload_exited"})
    files.close()
    supervisors()
    conn = await peer.connection()
    assert (await conn.event())["request_id"] == 1  # only the valid one, first
    await conn.nothing(0.1)
    await eventually(lambda: list((tmp_path / "state" / "journal").iterdir()) == [])
