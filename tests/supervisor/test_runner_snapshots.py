"""The runner's side of snapshot_job: ack at once, the outcome as snapshot_result until acked."""

from __future__ import annotations

import uuid
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from zope.interface import implementer

from tests.supervisor.peer import JOB_A, job
from treadmill.protocol import supervisor as protocol
from treadmill.supervisor.drivers import IHostSnapshots, SnapshotError
from treadmill.supervisor.drivers.mock import MockDriver

DIGEST = "sha256:" + "e" * 64


@implementer(IHostSnapshots)
class SnapshottingMock(MockDriver):
    """The mock host, with snapshots whose outcome the test decides."""

    def __init__(self) -> None:
        super().__init__(reactor)
        self.calls: list[tuple[str, str, str]] = []
        self.pending: list[Deferred[str]] = []

    def snapshot(self, job_id: str, repository: str, store: str) -> Deferred[str]:
        self.calls.append((job_id, repository, store))
        d: Deferred[str] = Deferred()
        self.pending.append(d)
        return d


def command(snapshot_id: str, job_id: str = JOB_A) -> dict[str, Any]:
    return protocol.snapshot_job(0, snapshot_id, job_id, "alice/snap", "http://store:5000")


@pytest_twisted.ensureDeferred
async def test_a_driver_without_snapshots_says_not_supported(peered: Any) -> None:
    peer, _ = peered(minor=3)
    conn = await peer.connection()
    message = command(str(uuid.uuid4()))
    ack = await conn.command({**message, "request_id": conn.next_rid()})
    assert ack["ok"] is False and ack["error"]["code"] == "not_supported"


@pytest_twisted.ensureDeferred
async def test_the_result_follows_and_is_resent_until_acked(peered: Any) -> None:
    driver = SnapshottingMock()
    peer, service = peered(minor=3, driver=driver)
    conn = await peer.connection()
    await conn.start(job(run_time=0.05))
    await conn.events_until("terminated")
    sid = str(uuid.uuid4())
    assert (await conn.command({**command(sid), "request_id": conn.next_rid()}))["ok"]
    # The same snapshot again while it runs joins it.
    assert (await conn.command({**command(sid), "request_id": conn.next_rid()}))["ok"]
    assert driver.calls == [(JOB_A, "alice/snap", "http://store:5000")]
    driver.pending[0].callback(DIGEST)
    result = await conn.wait_for(lambda m: m["type"] == "snapshot_result")
    assert result["snapshot_id"] == sid and result["digest"] == DIGEST
    conn.drop()  # before acking it: sent again on the next connection
    again = await peer.connection()
    resent = await again.wait_for(lambda m: m["type"] == "snapshot_result")
    assert resent["digest"] == DIGEST
    again.send(protocol.ack(resent["request_id"]))
    # Asked again after that: acked, the result sent once more only if still held.
    await again.nothing(0.2)
    assert service.runner.snapshots.unacknowledged == {}


@pytest_twisted.ensureDeferred
async def test_driver_errors_become_error_results(peered: Any) -> None:
    driver = SnapshottingMock()
    peer, _ = peered(minor=3, driver=driver)
    conn = await peer.connection()
    await conn.start(job(run_time="inf"))
    await conn.events_until("ready")
    ack = await conn.command({**command(str(uuid.uuid4())), "request_id": conn.next_rid()})
    assert ack["ok"] is False and ack["error"]["code"] == "unknown_job"  # still running
    await conn.stop(JOB_A)
    await conn.events_until("terminated")
    sid = str(uuid.uuid4())
    await conn.command({**command(sid), "request_id": conn.next_rid()})
    driver.pending[0].errback(SnapshotError("unknown_job", "the disk is no longer kept"))
    result = await conn.wait_for(lambda m: m["type"] == "snapshot_result")
    assert result["error"] == {"code": "unknown_job", "message": "the disk is no longer kept"}
    sid2 = str(uuid.uuid4())
    await conn.command({**command(sid2), "request_id": conn.next_rid()})
    driver.pending[1].errback(RuntimeError("boom"))
    result = await conn.wait_for(lambda m: m["type"] == "snapshot_result"
                                 and m["snapshot_id"] == sid2)
    assert result["error"]["code"] == "failed" and "RuntimeError" in result["error"]["message"]
