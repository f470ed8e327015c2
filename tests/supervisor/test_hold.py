"""Holding a failed job's host (``hold_on_failure``, protocol minor 6) on a Clock.

The policy (:func:`hold_for`) as a table, then a real :class:`JobRunner` with the
real mock driver and state files (the harness of ``test_outbox.py``): which ends
are held, what the switchboard is told (``held`` on the final event and in
``status``), that nothing else starts while a host is held, and how a hold ends
(expiry, a ``stop_job`` acknowledged only after the teardown, a restart).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from tests.supervisor.peer import JOB_A, JOB_B, job
from tests.supervisor.support import Connection, Harness
from treadmill.common.logging import rfc3339
from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.hold import END_REASONS, hold_for
from treadmill.supervisor.jobexposure import JobExposure
from treadmill.supervisor.joblogs import JobLogs
from treadmill.supervisor.journal import StateFiles
from treadmill.supervisor.observers import JobObserver
from treadmill.supervisor.runner import JobRunner

HOLD = 30.0


@pytest.mark.parametrize("hold, reason, exit_status, expected", [
    (HOLD, "workload_exited", 3, HOLD),
    (HOLD, "workload_exited", -1, HOLD),
    (HOLD, "execution_timeout", None, HOLD),
    (HOLD, "workload_exited", 0, None),          # success is never held
    (HOLD, "workload_exited", None, None),
    (HOLD, "user_terminated", None, None),       # nor a cancel
    (HOLD, "host_dropped_job", None, None),      # nor a host that is gone
    (HOLD, "host_start_failure", None, None),
    (None, "workload_exited", 3, None),          # not asked for
    (0, "workload_exited", 3, None),
    (-5, "workload_exited", 3, None),
    (float("inf"), "workload_exited", 3, None),
    (float("nan"), "workload_exited", 3, None),
    (True, "workload_exited", 3, None),
    ("30", "workload_exited", 3, None),
])
def test_which_ends_are_held(hold: Any, reason: str, exit_status: int | None,
                             expected: float | None) -> None:
    start = {"id": JOB_A} if hold is None else {"id": JOB_A, "hold_on_failure": hold}
    assert hold_for(start, reason, exit_status) == expected


class Ends(JobObserver):
    def __init__(self) -> None:
        self.held_ended: list[str] = []
        self.changes: list[dict[str, Any]] = []
        self.output: list[tuple[str, bytes]] = []

    def console(self, job_id: str, data: bytes) -> None:
        self.output.append((job_id, data))

    def hold_changed(self, change: dict[str, Any]) -> None:
        self.changes.append(change)

    def hold_ended(self, job_id: str) -> None:
        assert self.changes[-1]["hold"] == "ended"  # the change comes first
        self.held_ended.append(job_id)

    def console_bytes(self) -> int:
        return sum(len(data) for _, data in self.output)


class Hold(Harness):
    """The harness with a held job: starts, acks every event at once."""

    def __init__(self, tmp_path: Path, **mock: Any):
        super().__init__(tmp_path, **mock)
        self.ends = Ends()
        self.runner.add_observer(self.ends)
        self.acked = 0

    def send(self, message: dict[str, Any]) -> int:
        rid = message["request_id"]
        self.runner.message_received(self.conn, message)
        self.clock.advance(0)
        return rid

    def begin(self, job_id: str = JOB_A, hold: float | None = HOLD, **params: Any) -> int:
        start = job(job_id, **params)
        if hold is not None:
            start["hold_on_failure"] = hold
        return self.send(protocol.start_job(self.conn.next_request_id() + 1000, start))

    def pump(self, until: float) -> None:
        """Advance to ``until``, acknowledging every event as it comes."""
        while self.clock.seconds() < until - 1e-9:
            self.clock.advance(min(0.25, until - self.clock.seconds()))
            self.ack_all()

    def ack_all(self) -> None:
        events = self.conn.events()
        while self.acked < len(events):
            self.ack(events[self.acked][1]["request_id"])
            self.acked += 1
            events = self.conn.events()

    def final(self) -> dict[str, Any]:
        finals = [m for _, m in self.conn.events() if m["state"] == "terminated"]
        assert finals, "no final event"
        return finals[-1]

    def answer(self, rid: int) -> dict[str, Any] | None:
        for _, message in self.conn.sent:
            if message["type"] in ("ack", "status") and message["request_id"] == rid:
                return message
        return None

    def status(self) -> dict[str, Any]:
        rid = self.send(protocol.status_request(self.conn.next_request_id() + 2000))
        answer = self.answer(rid)
        assert answer is not None and answer["type"] == "status"
        return answer


def failed_and_held(tmp_path: Path, **mock: Any) -> Hold:
    h = Hold(tmp_path, **mock)
    h.begin(exit_status=3)
    h.pump(10.0)
    return h


def test_a_failed_workload_ends_held_and_keeps_its_host(tmp_path: Path) -> None:
    h = failed_and_held(tmp_path)
    final = h.final()
    assert final == {**final, "job_id": JOB_A, "reason": "workload_exited", "exit_status": 3,
                     "held": True}
    assert h.runner.held == JOB_A and h.runner.status() is None
    assert h.runner.driver.current == JOB_A  # the simulated host is as it was
    status = h.status()
    assert status == {**status, "job": None, "held": JOB_A}
    # The held job's end is remembered without "held": a resend never starts a hold.
    assert "held" not in h.runner.ended[-1]


def test_nothing_else_starts_while_a_host_is_held(tmp_path: Path) -> None:
    h = failed_and_held(tmp_path)
    ack = h.answer(h.begin(JOB_B, hold=None))
    assert ack is not None and ack["ok"] is False
    assert ack["error"]["code"] == "already_running" and JOB_A in ack["error"]["message"]
    # The held job itself again: its end is sent again, nothing restarts.
    ack = h.answer(h.begin(JOB_A))
    assert ack is not None and ack["ok"] is True
    assert h.runner.status() is None and h.runner.held == JOB_A


@pytest.mark.parametrize("exit_status", [0])
def test_success_is_torn_down_as_before(tmp_path: Path, exit_status: int) -> None:
    h = Hold(tmp_path)
    h.begin(exit_status=exit_status)
    h.pump(10.0)
    assert "held" not in h.final()
    assert h.runner.held is None and h.runner.driver.current is None
    assert "held" not in h.status()


def test_a_cancel_is_torn_down_as_before(tmp_path: Path) -> None:
    h = Hold(tmp_path, run_time=float("inf"))
    h.begin(exit_status=3)
    h.pump(6.0)
    assert h.runner.status()["state"] == "ready"
    h.send(protocol.stop_job(3000, JOB_A, "user_terminated"))
    h.pump(8.0)
    final = h.final()
    assert final["reason"] == "user_terminated" and "held" not in final
    assert h.runner.held is None and h.runner.driver.current is None


def test_an_execution_timeout_ends_held_without_tearing_down(tmp_path: Path) -> None:
    h = Hold(tmp_path, run_time=float("inf"))
    h.begin()
    h.pump(6.0)
    rid = h.send(protocol.stop_job(3000, JOB_A, "execution_timeout"))
    h.pump(7.0)
    assert h.answer(rid) == {**protocol.ack(rid)}
    final = h.final()
    assert final == {**final, "reason": "execution_timeout", "held": True}
    assert h.runner.held == JOB_A and h.runner.driver.current == JOB_A
    assert h.runner.driver.run.phase not in ("stopping", "ended")


def test_the_hold_expires_and_the_host_is_free(tmp_path: Path) -> None:
    h = failed_and_held(tmp_path, stop_time=2.0)
    ended_at = next(t for t, m in h.conn.events() if m["state"] == "terminated")
    h.pump(ended_at + HOLD - 1)
    assert h.runner.held == JOB_A
    h.pump(ended_at + HOLD + 1)  # expired; the teardown takes stop_time
    assert h.runner.held == JOB_A and h.ends.held_ended == []
    h.pump(ended_at + HOLD + 5)
    assert h.runner.held is None and h.runner.driver.current is None
    assert h.ends.held_ended == [JOB_A]
    assert [(c["hold"], c.get("reason")) for c in h.ends.changes] == [
        ("started", None), ("ended", "expired")]
    assert "held" not in h.status()
    # The host takes the next job; no event was sent for the hold's end.
    finals = [m for _, m in h.conn.events() if m["state"] == "terminated"]
    assert len(finals) == 1
    ack = h.answer(h.begin(JOB_B, hold=None))
    assert ack is not None and ack["ok"] is True


def test_stop_job_releases_and_is_acked_after_the_teardown(tmp_path: Path) -> None:
    h = failed_and_held(tmp_path, stop_time=2.0)
    now = h.clock.seconds()
    rid = h.send(protocol.stop_job(3000, JOB_A, "user_terminated"))
    again = h.send(protocol.stop_job(3001, JOB_A, "user_terminated"))  # a resend
    h.pump(now + 1.5)
    assert h.answer(rid) is None and h.answer(again) is None  # still tearing down
    assert h.runner.held == JOB_A
    h.pump(now + 2.5)
    assert h.answer(rid) == protocol.ack(rid) and h.answer(again) == protocol.ack(again)
    assert h.runner.held is None and h.runner.driver.current is None
    assert h.ends.held_ended == [JOB_A]
    # Later stop_jobs for it are harmless; no second end is reported.
    h.send(protocol.stop_job(3002, JOB_A, "user_terminated"))
    h.pump(now + 3.5)
    assert h.answer(3002) == protocol.ack(3002) and h.ends.held_ended == [JOB_A]
    # The expiry timer is gone with the hold.
    h.pump(now + HOLD + 5)
    assert h.ends.held_ended == [JOB_A]


def test_status_names_the_hold_only_to_minor_6(tmp_path: Path) -> None:
    h = failed_and_held(tmp_path)
    old = Connection(h.clock, minor=protocol.HOLD_MINOR - 1)
    h.runner.link_opened(old)
    h.conn = old
    assert "held" not in h.status()


def test_a_driver_that_cannot_hold_tears_down(tmp_path: Path) -> None:
    h = Hold(tmp_path)
    h.runner.driver.holds = False
    h.begin(exit_status=3, run_time=1.0)
    h.pump(10.0)
    assert h.runner.held is None and "held" not in h.final()


def test_a_restarted_supervisor_holds_nothing(tmp_path: Path) -> None:
    h = failed_and_held(tmp_path)
    assert h.runner.held == JOB_A
    expiry = h.runner._held.timer
    closed = Deferred.fromCoroutine(h.runner.close())
    h.clock.advance(0)
    assert closed.called and not expiry.active()
    runner = JobRunner(h.clock, type(h.runner.driver)(h.clock),
                       StateFiles(str(h.state), durable=False),
                       run_io=lambda fn, *a, **k: maybeDeferred(fn, *a, **k))
    assert Deferred.fromCoroutine(runner.start()).called
    assert runner.held is None  # the simulated host died with the process
    assert not (h.state / "held.json").exists()  # the hold is over for good
    conn = Connection(h.clock)
    runner.link_opened(conn)
    runner.message_received(conn, protocol.status_request(7))
    h.clock.advance(0)
    status = [m for _, m in conn.sent if m["type"] == "status"]
    assert status and "held" not in status[-1] and status[-1]["job"] is None


def test_a_hold_is_journaled_until_it_is_over(tmp_path: Path) -> None:
    h = failed_and_held(tmp_path)
    ended_at = next(t for t, m in h.conn.events() if m["state"] == "terminated")
    record = json.loads((h.state / "held.json").read_text())
    assert record["job"]["id"] == JOB_A and record["job"]["hold_on_failure"] == HOLD
    assert record["until"] == pytest.approx(ended_at + HOLD, abs=0.3)
    h.send(protocol.stop_job(3000, JOB_A, "user_terminated"))
    h.pump(h.clock.seconds() + 1)
    assert h.runner.held is None and not (h.state / "held.json").exists()


def test_a_driver_that_already_tore_down_holds_nothing(tmp_path: Path) -> None:
    """A host gone when the failure is reported (a guest that powered itself off): the
    job ends without ``held``, nothing is journaled, the host takes the next job."""
    h = Hold(tmp_path)
    h.runner.driver.holds = False  # this run tears down as it reports its exit ...
    h.begin(exit_status=3)
    h.runner.driver.holds = True  # ... though the driver says it holds
    h.pump(10.0)
    assert "held" not in h.final() and h.runner.held is None
    assert not (h.state / "held.json").exists()
    ack = h.answer(h.begin(JOB_B, hold=None))
    assert ack is not None and ack["ok"] is True


def test_a_hold_whose_job_never_ended_is_dropped_at_restart(tmp_path: Path) -> None:
    """held.json is written before the held job's final event: a crash in between leaves
    the job current, and a restart treats it as current (here: not re-adoptable)."""
    state = tmp_path / "state"
    state.mkdir()
    start = {**job(JOB_A), "hold_on_failure": HOLD}
    (state / "current-job.json").write_text(json.dumps({"job": start, "state": "ready"}))
    (state / "held.json").write_text(json.dumps({"job": start, "until": 1e12}))
    h = Hold(tmp_path)
    assert h.runner.held is None and not (state / "held.json").exists()
    assert h.runner.ended[-1]["reason"] == "host_dropped_job"


@pytest.mark.parametrize("record", [{"job": {"id": JOB_A}}, {"until": 5}, {"job": 1, "until": 5},
                                    {"job": {"id": JOB_A}, "until": True}])
def test_an_unusable_hold_record_is_dropped_at_restart(tmp_path: Path,
                                                       record: dict[str, Any]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "held.json").write_text(json.dumps(record))
    h = Hold(tmp_path)
    assert h.runner.held is None and not (state / "held.json").exists()


def test_a_held_hosts_console_and_the_holds_changes_reach_the_observers(
        tmp_path: Path) -> None:
    """While the host is held its console goes on to the observers (the job's log); they
    are told when the hold started (and until when) and why it ended; then nothing more."""
    h = failed_and_held(tmp_path, console_rate=1000.0, stop_time=1.0)
    ended_at = next(t for t, m in h.conn.events() if m["state"] == "terminated")
    [started] = h.ends.changes
    assert started == {"job_id": JOB_A, "hold": "started", "at": rfc3339(ended_at),
                       "until": rfc3339(ended_at + HOLD)}
    before = h.ends.console_bytes()
    h.pump(h.clock.seconds() + 2)
    assert h.ends.console_bytes() >= before + 1500  # the held host's, 1000 bytes a second
    assert {job_id for job_id, _ in h.ends.output} == {JOB_A}
    h.send(protocol.stop_job(3000, JOB_A, "user_terminated"))
    h.pump(h.clock.seconds() + 2)
    assert h.ends.held_ended == [JOB_A]
    ended = h.ends.changes[-1]
    assert ended == {"job_id": JOB_A, "hold": "ended", "at": ended["at"],
                     "reason": "released", "message": END_REASONS["released"]}
    after = h.ends.console_bytes()
    h.pump(h.clock.seconds() + 2)
    assert h.ends.console_bytes() == after  # the host is torn down: nothing more


def test_a_held_host_that_goes_away_ends_its_hold(tmp_path: Path) -> None:
    """A held host that ends by itself (a held VM whose QEMU exits) ends the hold: the
    observers hear why (``host_gone``)."""
    h = failed_and_held(tmp_path)
    run = h.runner.driver.run
    run._end()
    run.reporter.failed("host_dropped_job", "mock: gone")
    h.pump(h.clock.seconds() + 1)
    assert h.runner.held is None and h.ends.held_ended == [JOB_A]
    assert h.ends.changes[-1]["reason"] == "host_gone"


class Renewed(JobObserver):
    """The renewals, and the held job's log shipping and proxy publishing as they follow."""

    def __init__(self, tmp_path: Path, clock: Clock) -> None:
        self.jobs: list[dict[str, Any]] = []
        self.logs = JobLogs(clock, str(tmp_path / "logs"), durable=False)
        self.exposure = JobExposure(Clock(), lambda job_id, endpoints: None)

    def tokens_renewed(self, job: dict[str, Any]) -> None:
        self.jobs.append(job)


FIRST = {"log_servers": [{"url": "http://logs:1", "token": "first-log"}],
         "proxies": [{"url": "ws://proxy:1", "token": "first-proxy"}]}
FRESH = {"log_servers": [{"url": "http://logs:1", "token": "fresh-log"}],
         "proxies": [{"url": "ws://proxy:1", "token": "fresh-proxy"}]}


def start_parameters() -> dict[str, Any]:
    return job(JOB_A, exit_status=3)["parameters"]


def _held_with_tokens(tmp_path: Path) -> tuple[Hold, Renewed, float]:
    """A held job whose start carried tokens; its renewals; when it ended."""
    h = Hold(tmp_path, stop_time=1.0)
    renewed = Renewed(tmp_path, h.clock)
    for observer in (renewed, renewed.logs, renewed.exposure):
        h.runner.add_observer(observer)
    start = {**job(JOB_A, exit_status=3), "hold_on_failure": HOLD, **FIRST}
    h.send(protocol.start_job(1000, start))
    h.pump(10.0)
    ended_at = next(t for t, m in h.conn.events() if m["state"] == "terminated")
    return h, renewed, ended_at


def test_an_extended_hold_ends_later_with_fresh_tokens(tmp_path: Path) -> None:
    """``renew_tokens`` with ``held_for`` (minor 9): the hold's timer moves, the fresh tokens
    reach the observers and ``held.json``, ``events`` hears of it, ``status`` says it."""
    h, renewed, ended_at = _held_with_tokens(tmp_path)
    status = h.status()
    assert status["held"] == JOB_A and status["held_timeout"] == 60
    assert renewed.logs.servers[JOB_A] == FIRST["log_servers"]
    assert renewed.exposure.proxies[JOB_A] == FIRST["proxies"]
    assert status["held_for"] == pytest.approx(ended_at + HOLD - h.clock.seconds())
    now = h.clock.seconds()
    rid = h.send(protocol.renew_tokens(3000, JOB_A, 60, held_for=100.0, **FRESH))
    assert h.answer(rid) == protocol.ack(rid)
    [fresh] = renewed.jobs
    assert (fresh["id"], fresh["log_servers"], fresh["proxies"]) == (
        JOB_A, FRESH["log_servers"], FRESH["proxies"])
    assert fresh["hold_on_failure"] == HOLD and fresh["parameters"] == start_parameters()
    # The held job's log shipping and proxy links take them.
    assert renewed.logs.servers[JOB_A] == FRESH["log_servers"]
    assert renewed.exposure.proxies[JOB_A] == FRESH["proxies"]
    assert h.ends.changes[-1] == {"job_id": JOB_A, "hold": "extended", "at": rfc3339(now),
                                  "until": rfc3339(now + 100.0)}
    record = json.loads((h.state / "held.json").read_text())
    assert record["until"] == now + 100.0 and record["job"] == fresh
    assert h.status()["held_for"] == pytest.approx(100.0)
    # Held past its first end; over at the new one.
    h.pump(ended_at + HOLD + 5)
    assert h.runner.held == JOB_A and h.ends.held_ended == []
    h.pump(now + 100.0 - 0.5)
    assert h.runner.held == JOB_A
    h.pump(now + 100.0 + 2)
    assert h.runner.held is None and h.ends.held_ended == [JOB_A]
    assert h.ends.changes[-1]["reason"] == "expired"
    assert not (h.state / "held.json").exists()


def test_a_renewal_of_another_job_or_without_held_for_leaves_the_hold(tmp_path: Path) -> None:
    h, renewed, _ = _held_with_tokens(tmp_path)
    for message in (protocol.renew_tokens(3000, JOB_B, 60, held_for=100.0, **FRESH),
                    protocol.renew_tokens(3001, JOB_A, 600, **FRESH)):  # a minor 8 one
        rid = h.send(message)
        assert h.answer(rid) == protocol.ack(rid)
    assert renewed.jobs == [] and [c["hold"] for c in h.ends.changes] == ["started"]
    assert json.loads((h.state / "held.json").read_text())["job"]["log_servers"] == \
        FIRST["log_servers"]
    # Nor does a renewal that comes while the hold is being released.
    h.send(protocol.stop_job(3002, JOB_A, "user_terminated"))
    rid = h.send(protocol.renew_tokens(3003, JOB_A, 60, held_for=100.0, **FRESH))
    assert h.answer(rid) == protocol.ack(rid) and renewed.jobs == []
    h.pump(h.clock.seconds() + 2)
    assert h.runner.held is None and h.ends.held_ended == [JOB_A]


def test_status_says_the_holds_end_only_to_minor_9(tmp_path: Path) -> None:
    h, _, _ = _held_with_tokens(tmp_path)
    old = Connection(h.clock, minor=protocol.HOLD_RENEW_MINOR - 1)
    h.runner.link_opened(old)
    h.conn = old
    status = h.status()
    assert status["held"] == JOB_A and "held_for" not in status
    assert "held_timeout" not in status
