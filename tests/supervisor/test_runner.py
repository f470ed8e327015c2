"""The runner's protocol semantics, against a real WebSocket peer on loopback."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher

from tests.supervisor.peer import JOB_A, JOB_B, FakeSwitchboard, job
from tests.util.waiting import eventually, within
from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.drivers import STAGES, StartRefused
from treadmill.supervisor.drivers.mock import MockDriver, MockSettings
from treadmill.supervisor.runner import RESTART_MESSAGE
from treadmill.supervisor.service import SupervisorService

INF = "inf"
Make = Callable[..., SupervisorService]


def journal(state: Path) -> list[str]:
    return sorted(os.listdir(state / "journal"))


def brief(events: list[dict[str, Any]]) -> list[str]:
    return [e.get("stage") or e["state"] for e in events]


@pytest_twisted.ensureDeferred
async def test_a_job_runs_to_completion(peer: FakeSwitchboard, supervisors: Make,
                                        tmp_path: Path) -> None:
    service = supervisors()
    conn = await peer.connection()
    assert (await conn.status())["job"] is None
    assert (await conn.start(job(exit_status=3, message="done")))["ok"] is True
    events = await conn.events_until("terminated")
    assert brief(events) == [*STAGES, "ready", "terminated"]
    assert all(e["job_id"] == JOB_A for e in events)
    assert events[-1] == {**events[-1], "reason": "workload_exited", "exit_status": 3,
                          "message": "done"}
    # Request ids of events are unique on the connection.
    assert len({e["request_id"] for e in events}) == len(events)
    assert (await conn.status())["job"] is None
    state = tmp_path / "state"
    await eventually(lambda: journal(state) == [])
    assert not (state / "current-job.json").exists()
    ended = json.loads((state / "ended.json").read_text())["jobs"]
    assert ended[-1]["job_id"] == JOB_A and ended[-1]["exit_status"] == 3
    assert service.runner.status() is None


@pytest_twisted.ensureDeferred
async def test_status_reports_the_running_job(peer: FakeSwitchboard, supervisors: Make,
                                              tmp_path: Path) -> None:
    supervisors()
    conn = await peer.connection()
    await conn.start(job(run_time=INF))
    await conn.events_until("ready")
    assert (await conn.status())["job"] == {"id": JOB_A, "state": "ready", "stage": None}
    record = json.loads((tmp_path / "state" / "current-job.json").read_text())
    assert record["job"] == job(run_time=INF) and record["state"] == "ready"
    assert oct((tmp_path / "state" / "current-job.json").stat().st_mode & 0o777) == "0o600"


@pytest_twisted.ensureDeferred
async def test_status_during_initializing(peer: FakeSwitchboard, supervisors: Make) -> None:
    supervisors()
    conn = await peer.connection()
    await conn.start(job(hang="true"))
    await conn.events_until("booting")
    assert (await conn.status())["job"] == {"id": JOB_A, "state": "initializing",
                                            "stage": "booting"}


@pytest_twisted.ensureDeferred
async def test_start_is_idempotent(peer: FakeSwitchboard, supervisors: Make) -> None:
    supervisors()
    conn = await peer.connection()
    rids = [conn.next_rid() for _ in range(3)]
    for rid in rids:  # the second and third while the first is starting
        conn.send(protocol.start_job(rid, job(run_time=INF)))
    acks = [await conn.answer(rid) for rid in rids]
    assert all(a["ok"] for a in acks)
    events = await conn.events_until("ready")
    assert brief(events) == [*STAGES, "ready"]  # run once
    assert (await conn.start(job(run_time=INF)))["ok"] is True
    await conn.nothing(0.2)


@pytest_twisted.ensureDeferred
async def test_another_job_while_one_runs_is_already_running(peer: FakeSwitchboard,
                                                             supervisors: Make) -> None:
    supervisors()
    conn = await peer.connection()
    await conn.start(job(run_time=INF))
    ack = await conn.start(job(JOB_B))
    assert ack["ok"] is False and ack["error"]["code"] == "already_running"
    assert JOB_A in ack["error"]["message"]
    events = await conn.events_until("ready")
    assert {e["job_id"] for e in events} == {JOB_A}


@pytest_twisted.ensureDeferred
async def test_refused_starts_send_no_events(peer: FakeSwitchboard, supervisors: Make,
                                             tmp_path: Path) -> None:
    supervisors()
    conn = await peer.connection()
    for code in ("image_not_found", "image_invalid", "internal_error"):
        ack = await conn.start(job(refuse=code))
        assert ack["ok"] is False and ack["error"]["code"] == code
    ack = await conn.start(job(exit_status="many"))
    assert ack["error"]["code"] == "bad_request" and "mock.exit_status" in ack["error"]["message"]
    await conn.nothing(0.3)
    assert (await conn.status())["job"] is None
    assert not (tmp_path / "state" / "current-job.json").exists()
    # The host is free for the next job.
    assert (await conn.start(job(JOB_B)))["ok"] is True
    assert brief(await conn.events_until("terminated"))[-2:] == ["ready", "terminated"]


@pytest_twisted.ensureDeferred
async def test_stop_job_stops_and_is_idempotent(peer: FakeSwitchboard,
                                                supervisors: Make) -> None:
    supervisors()
    conn = await peer.connection()
    await conn.start(job(run_time=INF))
    await conn.events_until("ready")
    assert (await conn.stop(JOB_A, "execution_timeout"))["ok"] is True
    terminating, terminated = await conn.event(), await conn.event()
    assert terminating == {**terminating, "state": "terminating", "reason": "execution_timeout"}
    assert terminated == {**terminated, "state": "terminated", "reason": "execution_timeout"}
    assert (await conn.status())["job"] is None
    # Again: ok, and the final event is sent again.
    assert (await conn.stop(JOB_A, "user_terminated"))["ok"] is True
    again = await conn.event()
    assert {k: v for k, v in again.items() if k != "request_id"} == {
        k: v for k, v in terminated.items() if k != "request_id"}
    # A job never seen here: ok, nothing else.
    assert (await conn.stop(JOB_B))["ok"] is True
    await conn.nothing(0.2)


@pytest_twisted.ensureDeferred
async def test_start_of_an_ended_job_resends_its_end(peer: FakeSwitchboard,
                                                     supervisors: Make) -> None:
    supervisors()
    conn = await peer.connection()
    await conn.start(job(exit_status=1))
    final = (await conn.events_until("terminated"))[-1]
    assert (await conn.start(job(exit_status=1)))["ok"] is True
    again = await conn.event()
    assert again["state"] == "terminated" and again["exit_status"] == 1
    assert again["request_id"] != final["request_id"]
    await conn.nothing(0.2)  # not run twice


@pytest_twisted.ensureDeferred
async def test_stop_during_stop_time_reports_terminating_first(peer: FakeSwitchboard,
                                                               supervisors: Make) -> None:
    supervisors()
    conn = await peer.connection()
    await conn.start(job(run_time=INF, stop_time=0.3))
    await conn.events_until("ready")
    assert (await conn.stop(JOB_A))["ok"] is True
    assert (await conn.event())["state"] == "terminating"
    assert (await conn.status())["job"] == {"id": JOB_A, "state": "terminating", "stage": None}
    assert (await conn.stop(JOB_A))["ok"] is True  # again while stopping: no new event
    terminated = await conn.event()
    assert terminated["state"] == "terminated" and terminated["reason"] == "user_terminated"


class GatedDriver(MockDriver):
    """A mock whose start waits for the test to open a gate (or refuse)."""

    def __init__(self, reactor: Any, settings: MockSettings):
        super().__init__(reactor, settings)
        self.gates: list[Deferred[Any]] = []
        self.starts = 0

    def start(self, job: dict[str, Any], reporter: Any) -> Deferred[None]:
        self.starts += 1
        gate: Deferred[Any] = Deferred()
        self.gates.append(gate)

        def go(refuse: str | None) -> Any:
            if refuse:
                raise StartRefused(refuse, "refused at the gate")
            reporter.stage("starting")  # reported before the start is accepted
            return super(GatedDriver, self).start(job, reporter)

        return gate.addCallback(go)


@pytest_twisted.ensureDeferred
async def test_commands_during_a_slow_start(peer: FakeSwitchboard, supervisors: Make) -> None:
    from twisted.internet import reactor

    driver = GatedDriver(reactor, MockSettings(durations=dict.fromkeys(STAGES, 0.01),
                                               run_time=float("inf")))
    supervisors(driver=driver)
    conn = await peer.connection()
    start_rid, again_rid, stop_rid = conn.next_rid(), conn.next_rid(), conn.next_rid()
    conn.send(protocol.start_job(start_rid, job()))
    await eventually(lambda: driver.starts == 1)
    conn.send(protocol.start_job(again_rid, job()))
    conn.send(protocol.stop_job(stop_rid, JOB_A, "user_terminated"))
    status = await conn.status()  # nothing journaled yet: answered at once
    assert status["job"] == {"id": JOB_A, "state": "assigned", "stage": None}
    await conn.nothing(0.2)  # no ack before the driver decided
    driver.gates[0].callback(None)
    messages = [await conn.next() for _ in range(5)]
    acks = [m for m in messages if m["type"] == "ack"]
    assert [a["request_id"] for a in acks] == [start_rid, again_rid, stop_rid]
    assert all(a["ok"] for a in acks)
    events = [m for m in messages if m["type"] == "job_event"]
    assert brief(events) == ["starting", "terminating"]  # held report, then the stop
    assert driver.starts == 1


@pytest_twisted.ensureDeferred
async def test_a_start_refused_late_answers_duplicates_alike(peer: FakeSwitchboard,
                                                            supervisors: Make) -> None:
    from twisted.internet import reactor

    driver = GatedDriver(reactor, MockSettings())
    supervisors(driver=driver)
    conn = await peer.connection()
    rids = [conn.next_rid() for _ in range(3)]
    conn.send(protocol.start_job(rids[0], job()))
    await eventually(lambda: driver.starts == 1)
    conn.send(protocol.start_job(rids[1], job()))
    conn.send(protocol.stop_job(rids[2], JOB_A, "user_terminated"))
    await conn.status()  # answered in order: the commands above have arrived
    driver.gates[0].callback("image_invalid")
    acks = [await conn.next("ack") for _ in range(3)]
    assert [(a["request_id"], a["ok"]) for a in acks] == [
        (rids[0], False), (rids[1], False), (rids[2], True)]
    assert acks[0]["error"]["code"] == acks[1]["error"]["code"] == "image_invalid"
    await conn.nothing(0.2)  # the held "starting" report is dropped


@pytest_twisted.ensureDeferred
async def test_events_wait_for_acks_and_status_waits_for_events(peer: FakeSwitchboard,
                                                                supervisors: Make,
                                                                tmp_path: Path) -> None:
    peer.auto_ack = False
    supervisors()
    conn = await peer.connection()
    await conn.start(job(run_time=INF))
    first = await conn.event(ack=False)
    assert first["stage"] == "starting"
    await conn.nothing(0.2)  # one event at a time
    await eventually(lambda: len(journal(tmp_path / "state")) == 6)  # all journaled, one sent
    status_rid = conn.next_rid()
    conn.send(protocol.status_request(status_rid))
    await conn.nothing(0.2)  # not before the events are acknowledged
    conn.send(protocol.ack(first["request_id"]))
    seen = []
    while True:
        message = await conn.next()
        if message["type"] == "status":
            break
        seen.append(message)
        conn.send(protocol.ack(message["request_id"]))
    assert brief(seen) == [*STAGES[1:], "ready"]
    assert message == {"type": "status", "request_id": status_rid,
                       "job": {"id": JOB_A, "state": "ready", "stage": None}}
    await eventually(lambda: journal(tmp_path / "state") == [])


@pytest_twisted.ensureDeferred
async def test_unacked_events_are_resent_in_order_after_a_reconnect(
        peer: FakeSwitchboard, supervisors: Make, tmp_path: Path) -> None:
    peer.auto_ack = False
    service = supervisors()
    conn = await peer.connection()
    await conn.start(job(run_time=INF))
    first = await conn.event(ack=False)
    await eventually(lambda: len(journal(tmp_path / "state")) == 6)
    conn.drop()
    conn2 = await peer.connection()
    resent = await conn2.event()
    assert {k: v for k, v in resent.items() if k != "request_id"} == {
        k: v for k, v in first.items() if k != "request_id"}
    rest = await conn2.events_until("ready")
    assert brief(rest) == [*STAGES[1:], "ready"]
    await eventually(lambda: journal(tmp_path / "state") == [])
    assert service.runner.pending_events == []


@pytest_twisted.ensureDeferred
async def test_events_made_while_disconnected_are_sent_on_reconnect(
        peer: FakeSwitchboard, supervisors: Make, tmp_path: Path) -> None:
    service = supervisors()
    conn = await peer.connection()
    # Long enough that the job exits after the drop even on a loaded machine.
    await conn.start(job(run_time=2.0, exit_status=4))
    await conn.events_until("ready")
    await eventually(lambda: service.runner.pending_events == [])
    await peer.stop_listening()
    conn.drop()
    await eventually(lambda: service.runner.status() is None)  # exited while away
    assert [e["state"] for e in service.runner.pending_events] == ["terminated"]
    # Journaled in a thread, after it is queued: on disk a moment later.
    await eventually(lambda: len(journal(tmp_path / "state")) == 1)
    peer.listen()
    conn2 = await peer.connection()
    final = await conn2.event()
    assert final["state"] == "terminated" and final["exit_status"] == 4
    assert (await conn2.status())["job"] is None


@pytest_twisted.ensureDeferred
async def test_a_refused_event_is_not_resent(peer: FakeSwitchboard, supervisors: Make,
                                             tmp_path: Path) -> None:
    peer.auto_ack = False
    supervisors()
    conn = await peer.connection()
    await conn.start(job())
    first = await conn.event(ack=False)
    conn.send(protocol.ack(first["request_id"], ("not_your_job", "that job is not on this host")))
    assert (await conn.event())["stage"] == "fetching_image"
    await conn.events_until("terminated")
    await eventually(lambda: journal(tmp_path / "state") == [])


@pytest_twisted.ensureDeferred
async def test_an_unacknowledged_event_is_sent_again_on_the_same_connection(
        peer: FakeSwitchboard, supervisors: Make, tmp_path: Path) -> None:
    peer.auto_ack = False
    service = supervisors(event_ack_timeout=0.2, event_resend_max=0.4)
    conn = await peer.connection()
    await conn.start(job(run_time=0.0))
    first = await conn.event(ack=False)
    again = await conn.event(ack=False, timeout=2)  # no ack: the same event, a new id
    assert again["request_id"] != first["request_id"]
    assert {**again, "request_id": 0} == {**first, "request_id": 0}
    conn.send(protocol.ack(again["request_id"]))
    conn.send(protocol.ack(first["request_id"]))  # the first copy's ack, late: ignored
    events = [first, *await conn.events_until("terminated")]
    assert brief(events) == [*STAGES, "ready", "terminated"]
    assert events[-1]["reason"] == "workload_exited" and events[-1]["exit_status"] == 0
    await eventually(lambda: journal(tmp_path / "state") == [])
    assert (await conn.status())["job"] is None
    assert len(peer.connections) == 1 and conn.open_now
    assert service.runner.pending_events == []


@pytest_twisted.ensureDeferred
async def test_an_event_acked_unavailable_is_sent_again_until_stored(
        peer: FakeSwitchboard, supervisors: Make, tmp_path: Path) -> None:
    peer.auto_ack = False
    supervisors(event_ack_timeout=0.1, event_resend_max=0.2)
    conn = await peer.connection()
    await conn.start(job(run_time=0.0, exit_status=0))
    await conn.events_until("ready")
    copies = []
    for _ in range(3):  # the switchboard's database is away
        final = await conn.event(ack=False, timeout=2)
        copies.append(final)
        assert final["state"] == "terminated"
        conn.send(protocol.ack(final["request_id"], ("unavailable", "the database is away")))
        await eventually(lambda: len(journal(tmp_path / "state")) == 1)
    final = await conn.event(timeout=2)  # acked: stored at last
    assert all({**c, "request_id": 0} == {**final, "request_id": 0} for c in copies)
    assert final["state"] == "terminated" and final["reason"] == "workload_exited"
    assert (await conn.status())["job"] is None
    await eventually(lambda: journal(tmp_path / "state") == [])
    await conn.nothing(0.4)  # and never sent again


@pytest_twisted.ensureDeferred
async def test_restart_reports_the_job_it_cannot_adopt(peer: FakeSwitchboard,
                                                       supervisors: Make,
                                                       tmp_path: Path) -> None:
    service = supervisors()
    conn = await peer.connection()
    await conn.start(job(run_time=INF))
    await conn.events_until("ready")
    await service.stopService()
    _, code, _ = await within(conn.closed)
    assert code == protocol.CloseCode.GOING_AWAY
    state = tmp_path / "state"
    assert json.loads((state / "current-job.json").read_text())["state"] == "ready"

    restarted = supervisors()
    conn2 = await peer.connection()
    dropped = await conn2.event()
    assert dropped == {**dropped, "job_id": JOB_A, "state": "terminated",
                       "reason": "host_dropped_job", "message": RESTART_MESSAGE}
    assert (await conn2.status())["job"] is None
    assert not (state / "current-job.json").exists()
    # It remembers how the job ended.
    assert (await conn2.stop(JOB_A))["ok"] is True
    assert (await conn2.event())["reason"] == "host_dropped_job"
    assert restarted.runner.ended[-1]["reason"] == "host_dropped_job"


@pytest_twisted.ensureDeferred
async def test_restart_resends_the_journal_before_the_drop(peer: FakeSwitchboard,
                                                           supervisors: Make,
                                                           tmp_path: Path) -> None:
    peer.auto_ack = False
    service = supervisors(flush_timeout=0.2)
    conn = await peer.connection()
    await conn.start(job(run_time=INF))
    await conn.event(ack=False)
    await eventually(lambda: len(journal(tmp_path / "state")) == 6)
    await service.stopService()  # the flush times out: the events stay journaled
    assert len(journal(tmp_path / "state")) == 6

    peer.auto_ack = True
    supervisors()
    conn2 = await peer.connection()
    events = await conn2.events_until("terminated")
    assert brief(events) == [*STAGES, "ready", "terminated"]
    assert events[-1]["reason"] == "host_dropped_job"
    assert (await conn2.status())["job"] is None


@pytest_twisted.ensureDeferred
async def test_graceful_stop_flushes_events_first(peer: FakeSwitchboard,
                                                  supervisors: Make, tmp_path: Path) -> None:
    service = supervisors()
    conn = await peer.connection()
    await conn.start(job(run_time=0.0))
    await eventually(lambda: service.runner.status() is None)
    await service.stopService()
    states = [m["state"] for m in conn.received if m["type"] == "job_event"]
    assert states[-1] == "terminated"  # sent (and acked) before the close
    assert journal(tmp_path / "state") == []
    assert conn.close_code == protocol.CloseCode.GOING_AWAY


@pytest_twisted.ensureDeferred
async def test_a_second_supervisor_cannot_share_the_state_directory(
        peer: FakeSwitchboard, supervisors: Make) -> None:
    first = supervisors()
    await first.ready()
    second = supervisors()
    try:
        await second.ready()
    except Exception as e:
        assert "in use" in str(e)
    else:
        raise AssertionError("the second supervisor started")
    await second.stopService()
    assert first.runner.files._lock_fd is not None


@pytest_twisted.ensureDeferred
async def test_console_output_is_counted(peer: FakeSwitchboard, supervisors: Make) -> None:
    service = supervisors(console_buffer=100)
    conn = await peer.connection()
    await conn.start(job(console_rate=2000, run_time=0.5))
    await conn.events_until("terminated")
    assert service.runner.console.total >= 500
    tail = service.runner.console.tail()
    assert len(tail) == 100 and tail.endswith(b"\n") is (service.runner.console.total % 36 == 0)


@pytest_twisted.ensureDeferred
async def test_secrets_stay_out_of_the_logs(peer: FakeSwitchboard, supervisors: Make) -> None:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(f"{formatEvent(event)} {event!r}")

    globalLogPublisher.addObserver(observe)
    try:
        service = supervisors()
        conn = await peer.connection()
        await conn.start(job())
        await conn.events_until("terminated")
        await service.stopService()
    finally:
        globalLogPublisher.removeObserver(observe)
    text = "\n".join(lines)
    assert "started job" in text
    assert "s3cret-value" not in text and "host-token" not in text
    assert "host-token" not in repr(service.config)
