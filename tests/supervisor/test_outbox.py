"""The runner's outbox on a Clock: resending unacknowledged job events, backing off.

A real :class:`JobRunner`, real state files, the real mock driver; the clock
is a :class:`Clock` and the connection a recorder of what the runner sends
(each message checked against the protocol schema). End-to-end versions over
a real WebSocket are in ``test_runner.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from zope.interface import implementer

from tests.supervisor.peer import JOB_A, JOB_B
from tests.supervisor.support import CAP, ENDPOINTS, TIMEOUT, Connection, Harness
from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.consolenotices import ConsoleNotices
from treadmill.supervisor.drivers import STAGES, IHostSnapshots
from treadmill.supervisor.drivers.mock import MockDriver, MockSettings
from treadmill.supervisor.journal import StateFiles
from treadmill.supervisor.outbox import UNAVAILABLE
from treadmill.supervisor.runner import JobRunner


def body(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "request_id"}


def test_an_unacknowledged_event_is_resent_backing_off_up_to_the_cap(tmp_path: Path) -> None:
    h = Harness(tmp_path, hang=True)
    h.start()
    h.advance_to(400)
    events = h.conn.events()
    # Only the head ("starting"), again and again: the next stage waits for its ack.
    assert {e["stage"] for _, e in events} == {"starting"}
    assert all(body(e) == body(events[0][1]) for _, e in events)
    assert len({e["request_id"] for _, e in events}) == len(events)  # a new id each time
    times = [t for t, _ in events]
    assert times == [0, 5, 15, 35, 75, 115, 155, 195, 235, 275, 315, 355, 395]
    assert len(h.journal()) == len(STAGES)  # nothing is dropped (the stages came while waiting)


def test_jitter_stretches_each_wait(tmp_path: Path) -> None:
    h = Harness(tmp_path, jitter=0.5, hang=True)
    h.start()
    h.advance_to(60)
    times = [t for t, _ in h.conn.events()]
    assert times == [0, 7.5, 20, 42.5]  # 5 + 2.5, 10 + 2.5, 20 + 2.5


def test_an_ack_of_any_copy_acknowledges_it_and_the_rest_are_ignored(tmp_path: Path) -> None:
    h = Harness(tmp_path, hang=True)
    h.start()
    h.advance_to(16)
    copies = [e["request_id"] for _, e in h.conn.events()]
    assert len(copies) == 3
    h.ack(copies[1])  # the second copy's ack comes first
    after = h.conn.events()[3:]
    assert [e["stage"] for _, e in after] == ["fetching_image"]  # at once, in order
    h.ack(copies[0])
    h.ack(copies[2])  # late acks of the other copies acknowledge nothing else
    assert h.runner.pending_events[0]["stage"] == "fetching_image"
    assert len(h.conn.events()) == 4
    # The next event has its own timer, starting from the first wait again.
    h.advance_to(16 + TIMEOUT)
    assert [t for t, _ in h.conn.events()[3:]] == [16, 21]


def test_unavailable_keeps_the_event_and_sends_it_again_later(tmp_path: Path) -> None:
    h = Harness(tmp_path, hang=True)
    h.start()
    for nack_at in (2, 7, 17, 37):  # the switchboard's database is away: "not stored"
        h.advance_to(nack_at)
        h.ack(h.conn.events()[-1][1]["request_id"], (UNAVAILABLE, "the database is away"))
        assert h.runner.pending_events[0]["stage"] == "starting"
        assert len(h.journal()) == min(len(STAGES), 1 + nack_at)
    h.advance_to(200)
    copies = h.conn.events()
    assert all(body(e) == body(copies[0][1]) for _, e in copies)
    # Each pause starts at the nack and doubles (5, 10, 20, 40 s); then the ack timeout.
    assert [t for t, _ in copies] == [0, 7, 17, 37, 77, 117, 157, 197]
    h.ack(copies[-1][1]["request_id"])
    assert h.runner.pending_events[0]["stage"] == "fetching_image"
    assert [e["stage"] for _, e in h.conn.events()[len(copies):]] == ["fetching_image"]


def test_a_cleanly_exited_job_ends_as_workload_exited_through_an_outage(
        tmp_path: Path) -> None:
    h = Harness(tmp_path, run_time=0.0)
    h.start()
    while not any(e["state"] == "terminated" for _, e in h.conn.events()):
        h.ack(h.conn.events()[-1][1]["request_id"])
        h.clock.advance(1)
    finals = [e for _, e in h.conn.events() if e["state"] == "terminated"]
    assert len(finals) == 1
    h.ack(finals[0]["request_id"], (UNAVAILABLE, "the database is away"))
    h.advance_to(h.clock.seconds() + 200)  # no ack at all for a while
    finals = [e for _, e in h.conn.events() if e["state"] == "terminated"]
    assert len(finals) > 3
    h.ack(finals[-1]["request_id"])
    assert body(finals[-1]) == {"type": "job_event", "job_id": JOB_A, "state": "terminated",
                                "reason": "workload_exited", "exit_status": 0,
                                "message": "mock workload finished"}
    assert h.runner.pending_events == [] and h.journal() == []
    h.advance_to(h.clock.seconds() + 3 * CAP)
    assert len([e for _, e in h.conn.events() if e["state"] == "terminated"]) == len(finals)


def test_another_refusal_drops_the_event_as_before(tmp_path: Path) -> None:
    h = Harness(tmp_path, hang=True)
    h.start()
    first = h.conn.events()[0][1]
    h.ack(first["request_id"], ("not_your_job", "no"))
    assert [e["stage"] for _, e in h.conn.events()] == ["starting"]
    h.clock.advance(1)
    assert [e["stage"] for _, e in h.conn.events()] == ["starting", "fetching_image"]
    h.advance_to(100)
    assert "starting" not in [e.get("stage") for e in h.runner.pending_events]


def test_a_new_connection_sends_the_head_at_once_and_the_old_timer_is_gone(
        tmp_path: Path) -> None:
    h = Harness(tmp_path, hang=True)
    h.start()
    h.advance_to(6)  # sent at 0 and 5
    old = h.conn
    h.disconnect()
    h.advance_to(30)
    assert len(old.events()) == 2
    h.conn = h.connect()
    assert [t for t, _ in h.conn.events()] == [30]  # the head, at once
    assert body(h.conn.events()[0][1]) == body(old.events()[0][1])
    # An ack that comes on the old connection acknowledges nothing.
    h.ack(old.events()[1][1]["request_id"], conn=old)
    assert len(h.runner.pending_events) == len(STAGES)
    h.advance_to(30 + TIMEOUT)  # the backoff starts again on the new connection
    assert [t for t, _ in h.conn.events()] == [30, 35]


def test_status_waits_through_resends(tmp_path: Path) -> None:
    h = Harness(tmp_path, hang=True)
    h.start()
    h.runner.message_received(h.conn, protocol.status_request(901))
    h.advance_to(20)
    assert not [m for _, m in h.conn.sent if m["type"] == "status"]
    while h.runner.pending_events:
        h.ack(h.conn.events()[-1][1]["request_id"], (UNAVAILABLE, "busy"))
        h.clock.advance(CAP)
        assert not [m for _, m in h.conn.sent if m["type"] == "status"]
        h.ack(h.conn.events()[-1][1]["request_id"])
    statuses = [m for _, m in h.conn.sent if m["type"] == "status"]
    assert statuses == [{"type": "status", "request_id": 901,
                         "job": {"id": JOB_A, "state": "initializing", "stage": "booting",
                                 "timeout": 60}}]


@pytest.mark.parametrize("minor", [protocol.MINOR])
def test_endpoints_acked_unavailable_are_sent_again(tmp_path: Path, minor: int) -> None:
    h = Harness(tmp_path, hang=True)
    h.conn.minor = minor
    h.start()
    endpoints = ENDPOINTS
    h.runner.report_endpoints(JOB_A, endpoints)
    sent = [m for _, m in h.conn.sent if m["type"] == "job_endpoints"]
    assert len(sent) == 1
    h.ack(sent[0]["request_id"], (UNAVAILABLE, "the database is unavailable"))
    h.clock.advance(TIMEOUT)
    sent = [m for _, m in h.conn.sent if m["type"] == "job_endpoints"]
    assert len(sent) == 2 and sent[1]["endpoints"] == endpoints
    h.ack(sent[1]["request_id"])
    h.clock.advance(3 * CAP)
    assert len([m for _, m in h.conn.sent if m["type"] == "job_endpoints"]) == 2


def test_endpoints_without_an_ack_are_sent_again(tmp_path: Path) -> None:
    h = Harness(tmp_path, hang=True)
    h.start()
    h.runner.report_endpoints(JOB_A, ENDPOINTS)
    h.advance_to(3 * TIMEOUT + 1)
    sent = [(t, m) for t, m in h.conn.sent if m["type"] == "job_endpoints"]
    assert [t for t, _ in sent] == [0, 5, 10, 15]
    assert all(m["endpoints"] == ENDPOINTS for _, m in sent)
    h.ack(sent[0][1]["request_id"])  # an old copy's ack: not the one awaited
    h.ack(sent[-1][1]["request_id"])
    h.advance_to(100)
    assert len([m for _, m in h.conn.sent if m["type"] == "job_endpoints"]) == 4


@implementer(IHostSnapshots)
class SnapshottingMock(MockDriver):
    """The mock host, whose snapshots end as the test says."""

    def __init__(self, clock: Clock):
        super().__init__(clock, MockSettings(echo=False))
        self.pending: list[Deferred[str]] = []

    def snapshot(self, job_id: str, repository: str, store: str) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.pending.append(d)
        return d


@pytest.mark.parametrize("answer", [None, (UNAVAILABLE, "the database is away")])
def test_a_snapshot_result_is_sent_until_acknowledged(tmp_path: Path,
                                                      answer: tuple[str, str] | None) -> None:
    clock = Clock()
    driver = SnapshottingMock(clock)
    runner = JobRunner(clock, driver, StateFiles(str(tmp_path / "state"), durable=False),
                       run_io=lambda fn, *a, **k: maybeDeferred(fn, *a, **k),
                       ack_timeout=TIMEOUT, resend_max=CAP, jitter=lambda: 0.0)
    assert Deferred.fromCoroutine(runner.start()).called
    conn = Connection(clock)
    runner.link_opened(conn)
    snapshot_id = "0b8d3c1e-0000-4000-8000-0000000000ff"
    runner.message_received(conn, protocol.snapshot_job(7, snapshot_id, JOB_A, "alice/snap",
                                                        "http://store:5000"))
    driver.pending[0].callback("sha256:" + "cd" * 32)

    def results() -> list[dict[str, Any]]:
        return [m for _, m in conn.sent if m["type"] == "snapshot_result"]

    assert len(results()) == 1
    if answer is not None:
        runner.message_received(conn, protocol.ack(results()[0]["request_id"], answer))
    clock.advance(TIMEOUT)
    assert len(results()) == 2 and results()[1]["digest"] == "sha256:" + "cd" * 32
    runner.message_received(conn, protocol.ack(results()[1]["request_id"]))
    clock.advance(5 * CAP)
    assert len(results()) == 2


# -- console notices (minor 7): the same outbox, for the audit log -------------------------


def notice(event: str = "opened", user: str = "alice", **extra: Any) -> dict[str, Any]:
    """A proxy's ``console`` notice as ``ExposureManager.on_console`` hands it on."""
    return {"event": event, "conn_id": "c" * 22, "service": "console", "subject": user,
            "jti": "j" * 22, "access": "manage", "peer": "192.0.2.7", "at": 1.5,
            "proxy": "wss://proxy.example", **extra}


def consoles(conn: Connection) -> list[dict[str, Any]]:
    return [m for _, m in conn.sent if m["type"] == "console_event"]


def test_console_notices_are_journaled_sent_in_order_and_survive_a_restart(
        tmp_path: Path) -> None:
    h = Harness(tmp_path, hang=True)
    notices = ConsoleNotices(h.clock, h.runner.outbox)
    h.disconnect()
    notices.report(JOB_A, notice())
    notices.report(JOB_A, notice("closed"))
    assert len(h.journal()) == 2 and h.runner.pending_events[0]["console"]["user"] == "alice"
    h.runner.files.close()  # the process ends (its lock goes with it)
    # A restart: a new runner on the same state directory sends them from the journal.
    again = Harness(tmp_path, hang=True)
    sent = consoles(again.conn)
    assert [body(m) for m in sent] == [{
        "type": "console_event", "job_id": JOB_A, "event": "opened", "conn_id": "c" * 22,
        "service": "console", "proxy": "wss://proxy.example", "user": "alice",
        "jti": "j" * 22, "access": "manage", "peer": "192.0.2.7", "at": 1.5}]
    again.advance_to(TIMEOUT + 0.5)  # no ack: the same notice again
    assert [body(m) for m in consoles(again.conn)] == [body(sent[0])] * 2
    again.ack(consoles(again.conn)[-1]["request_id"])
    assert consoles(again.conn)[-1]["event"] == "closed"
    again.ack(consoles(again.conn)[-1]["request_id"], ("not_your_job", "no"))  # dropped
    assert again.runner.pending_events == [] and again.journal() == []


def test_an_older_switchboard_gets_no_console_notices_and_events_still_flow(
        tmp_path: Path) -> None:
    h = Harness(tmp_path, hang=True)
    h.disconnect()
    ConsoleNotices(h.clock, h.runner.outbox).report(JOB_A, notice())
    h.conn = Connection(h.clock, minor=protocol.CONSOLE_MINOR - 1)
    h.runner.link_opened(h.conn)
    h.start()
    assert consoles(h.conn) == [] and h.runner.outbox.dropped == 1
    assert [e["stage"] for _, e in h.conn.events()] == ["starting"]
    assert not any("console" in e for e in h.runner.pending_events)


def test_a_flood_of_console_notices_is_bounded_and_the_rest_counted(tmp_path: Path) -> None:
    h = Harness(tmp_path, hang=True)
    notices = ConsoleNotices(h.clock, h.runner.outbox, rate=0.5, burst=30)
    for _ in range(1000):
        notices.report(JOB_A, notice())
    assert len(h.runner.pending_events) == 30 and notices.counts["suppressed"] == 970
    h.clock.advance(2.0)  # one token back
    notices.report(JOB_A, notice("closed"))
    last = h.runner.pending_events[-1]["console"]
    assert last["event"] == "closed" and last["suppressed"] == 970
    notices.report(JOB_B, notice())  # another job has its own bucket
    assert h.runner.pending_events[-1]["job_id"] == JOB_B
    assert "suppressed" not in h.runner.pending_events[-1]["console"]
    notices.report(JOB_A, notice(user="bob"))  # and so has another user: not hidden
    assert h.runner.pending_events[-1]["console"]["user"] == "bob"
    assert "suppressed" not in h.runner.pending_events[-1]["console"]


@pytest.mark.parametrize("bad", [{"access": "admin"}, {"subject": ""}, {"conn_id": "x"},
                                 {"peer": None}, {"event": "hijacked"}])
def test_a_malformed_console_notice_is_not_forwarded(tmp_path: Path,
                                                     bad: dict[str, Any]) -> None:
    h = Harness(tmp_path, hang=True)
    notices = ConsoleNotices(h.clock, h.runner.outbox)
    notices.report(JOB_A, notice(**bad))
    assert h.runner.pending_events == [] and notices.counts["invalid"] == 1


def test_consoles_open_at_the_jobs_end_are_reported_closed_once(tmp_path: Path) -> None:
    """The proxy sends no ``closed`` for consoles its job's end closes: the supervisor
    reports them itself (at the end, past the rate bound), and ignores a late one."""
    h = Harness(tmp_path, hang=True)
    notices = ConsoleNotices(h.clock, h.runner.outbox, rate=0.5, burst=2)
    h.runner.add_observer(notices)
    h.start()
    h.clock.advance(7)
    notices.report(JOB_A, notice(conn_id="a" * 16))
    notices.report(JOB_A, notice(conn_id="b" * 16))
    notices.report(JOB_A, notice("closed", conn_id="b" * 16))  # its open got through: sent
    notices.report(JOB_A, notice(conn_id="c" * 16))  # over the bound: never known open
    h.runner.message_received(h.conn, protocol.stop_job(901, JOB_A, "user_terminated"))
    h.advance_to(12)
    entries = h.runner.pending_events
    closes = [e["console"] for e in entries if "console" in e and
              e["console"]["event"] == "closed"]
    assert [c["conn_id"] for c in closes] == ["b" * 16, "a" * 16]
    assert notices.counts["suppressed"] == 1  # c's open
    ended = [i for i, e in enumerate(entries) if e.get("state") == "terminated"]
    assert ended and entries.index({"job_id": JOB_A, "console": closes[1]}) > ended[0]
    assert closes[1]["at"] > 7  # the job's end
    notices.report(JOB_A, notice("closed", conn_id="a" * 16))  # the proxy's, late
    assert len([e for e in h.runner.pending_events if "console" in e]) == 4
