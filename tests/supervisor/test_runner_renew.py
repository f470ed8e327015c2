"""``renew_tokens`` (protocol minor 8) at the runner: the current job's new timeout and
fresh tokens reach its observers (the log shipping and the proxy publishing), are
journaled for a restart, and are what ``status`` reports; for another job nothing
changes, and a switchboard older than minor 8 is told no timeout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from tests.supervisor.peer import JOB_A, JOB_B, job
from tests.supervisor.support import Connection, Harness
from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.jobexposure import JobExposure
from treadmill.supervisor.joblogs import JobLogs
from treadmill.supervisor.observers import JobObserver

OLD = {"log_servers": [{"url": "http://logs:1", "token": "old-log"}],
       "proxies": [{"url": "ws://proxy:1", "token": "old-proxy"}]}
NEW = {"log_servers": [{"url": "http://logs:1", "token": "new-log"}],
       "proxies": [{"url": "ws://proxy:1", "token": "new-proxy"}]}


class Renewals(JobObserver):
    def __init__(self) -> None:
        self.renewed: list[dict[str, Any]] = []

    def tokens_renewed(self, job: dict[str, Any]) -> None:
        self.renewed.append(job)


def _running(tmp_path: Path) -> tuple[Harness, Renewals, JobLogs, JobExposure]:
    h = Harness(tmp_path, hang=True)
    renewals = Renewals()
    logs = JobLogs(h.clock, str(tmp_path / "logs"), durable=False)
    exposure = JobExposure(Clock(), lambda job_id, endpoints: None)
    for observer in (renewals, logs, exposure):
        h.runner.add_observer(observer)
    h.runner.message_received(h.conn, protocol.start_job(900, {**job(), **OLD}))
    h.clock.advance(0)
    return h, renewals, logs, exposure


def _acks(conn: Connection, rid: int) -> list[dict[str, Any]]:
    return [m for _, m in conn.sent if m["type"] == "ack" and m["request_id"] == rid]


def _status(h: Harness, conn: Connection) -> dict[str, Any]:
    """The status, once every event sent so far is acknowledged (it waits for them)."""
    h.runner.message_received(conn, protocol.status_request(77))
    for _ in range(20):
        for _, event in conn.events():
            h.ack(event["request_id"], conn=conn)
        h.clock.advance(0)
    return [m for _, m in conn.sent if m["type"] == "status"][-1]


def test_fresh_tokens_reach_the_observers_the_journal_and_the_status(tmp_path: Path) -> None:
    h, renewals, logs, exposure = _running(tmp_path)
    assert logs.servers[JOB_A] == OLD["log_servers"]
    assert exposure.proxies[JOB_A] == OLD["proxies"]
    assert _status(h, h.conn)["job"]["timeout"] == 60
    h.runner.message_received(h.conn, protocol.renew_tokens(901, JOB_A, 600.0, **NEW))
    h.clock.advance(0)
    assert _acks(h.conn, 901) == [protocol.ack(901)]
    [renewed] = renewals.renewed
    assert renewed["timeout"] == 600.0 and renewed["parameters"] == job()["parameters"]
    assert (renewed["log_servers"], renewed["proxies"]) == (NEW["log_servers"], NEW["proxies"])
    assert logs.servers[JOB_A] == NEW["log_servers"]
    assert exposure.proxies[JOB_A] == NEW["proxies"]
    # A restart re-adopts the job with them; the switchboard sees the new timeout.
    record = json.loads((h.state / "current-job.json").read_text())
    assert record["job"]["timeout"] == 600.0
    assert record["job"]["log_servers"] == NEW["log_servers"]
    assert record["job"]["proxies"] == NEW["proxies"]
    assert _status(h, h.conn)["job"]["timeout"] == 600.0


def test_a_renewal_without_tokens_or_for_another_job_changes_only_what_it_says(
        tmp_path: Path) -> None:
    h, renewals, logs, _ = _running(tmp_path)
    h.runner.message_received(h.conn, protocol.renew_tokens(902, JOB_B, 600.0, **NEW))
    h.clock.advance(0)
    assert _acks(h.conn, 902) == [protocol.ack(902)] and renewals.renewed == []
    assert logs.servers[JOB_A] == OLD["log_servers"]
    assert _status(h, h.conn)["job"]["timeout"] == 60
    # Only the timeout (a switchboard without a signing key): the old tokens stay.
    h.runner.message_received(h.conn, protocol.renew_tokens(903, JOB_A, 90.0))
    h.clock.advance(0)
    assert _acks(h.conn, 903) == [protocol.ack(903)]
    assert renewals.renewed[-1]["log_servers"] == OLD["log_servers"]
    assert _status(h, h.conn)["job"]["timeout"] == 90.0


def test_an_older_switchboard_is_told_no_timeout(tmp_path: Path) -> None:
    h, _, _, _ = _running(tmp_path)
    old = Connection(h.clock, minor=protocol.RENEW_MINOR - 1)
    h.runner.link_opened(old)
    status = _status(h, old)
    assert status["job"]["id"] == JOB_A and "timeout" not in status["job"]
