"""The serial driver end to end: a real switchboard, a real supervisor, the fake board.

The board image is in a cache mount (an image store's layout on disk), so
the supervisor's real ImageFetcher fetches and verifies it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from tests.proxy.support import echo_client
from tests.supervisor.serial.support import FakeBoard, board_host, write_cache
from tests.support import Client, RunningSwitchboard, closed_stream, switchboard_with_logs
from tests.util.waiting import eventually, sleep
from treadmill.protocol.logs import HOLD_MARKER
from treadmill.supervisor.service import SupervisorService


@dataclass
class Bed:
    switchboard: RunningSwitchboard
    board: FakeBoard
    cache: Path
    supervisor: SupervisorService

    @property
    def admin(self) -> Client:
        return self.switchboard.admin

    async def run(self, app: bytes, timeout: float = 30.0) -> dict[str, Any]:
        digest = write_cache(self.cache, {"app.bin": app})
        r = await self.admin.post("/api/v1/jobs", {"image": digest, "tags": ["board"]})
        assert r.status == 201, r.body
        job_id = r.body["id"]

        async def done() -> dict[str, Any] | None:
            body = (await self.admin.get(f"/api/v1/jobs/{job_id}")).body
            return body if body["state"] == "terminated" else None

        return await eventually(done, timeout=timeout)


@pytest_twisted.async_yield_fixture
async def bed(migrated_database: str, tmp_path: Path) -> AsyncIterator[Bed]:
    async with switchboard_with_logs(migrated_database, tmp_path, scheduler_interval=0.2,
                                     timeout_interval=0.1, max_host_failures=2) as (sb, _):
        board = await FakeBoard(tmp_path / "board").start()
        try:
            async with board_host(sb, board, tmp_path, health__timeout=2.0,
                                  boot__timeout=3.0) as supervisor:
                yield Bed(sb, board, tmp_path / "cache", supervisor)
        finally:
            board.stop()


@pytest_twisted.ensureDeferred
async def test_a_board_job_runs_and_a_sick_board_leaves_service(bed: Bed) -> None:
    final = await bed.run(b'print hi\nagent {"type":"ready"}\nexit 5 five\n')
    assert final["termination"] == {"reason": "workload_exited", "exit_status": 5,
                                    "message": "five"}, final
    # The board breaks: its health check fails before every start, each job ends
    # host_start_failure, and after hosts.max_failures (2) the host is out of service.
    bed.board.ctl("break")
    # The first job finds out at boot (the board panics instead of running its app),
    # and the health check after it fails; the next start checks again and fails.
    final = await bed.run(b'agent {"type":"ready"}\nexit 0\n')
    assert final["termination"]["reason"] == "host_start_failure", final
    assert "the agent did not say ready" in final["termination"]["message"]
    # That first failure, at boot, of an image never seen ready, is blamed on the image
    # (docs/operations.md, "Host health"); the failing checks in starting, before the
    # image is fetched, are the host's.
    for _ in range(2):
        final = await bed.run(b'agent {"type":"ready"}\nexit 0\n')
        assert final["termination"]["reason"] == "host_start_failure", final
        assert "board health check failed" in final["termination"]["message"]
    host = (await bed.admin.get("/api/v1/hosts/board-1")).body
    assert host["healthy"] is False and host["consecutive_failures"] == 2
    # Fixed and put back in service by an admin, it runs jobs again.
    bed.board.ctl("fix")
    r = await bed.admin.post("/api/v1/hosts/board-1/enable")
    assert r.status == 200, r.body
    final = await bed.run(b'agent {"type":"ready"}\nexit 0\n')
    assert final["termination"]["reason"] == "workload_exited", final


@pytest_twisted.ensureDeferred
async def test_a_held_board_waits_for_its_owner_until_cancelled(bed: Bed) -> None:
    """hold_on_failure through a real switchboard and supervisor: the failed job ends held,
    the board is left as it is (no clean-up) and takes no other job, its console (a line
    typed at it, its answer) going into the job's log; the cancel cleans it as after any
    job, closes the log, and the waiting job runs."""
    digest = write_cache(bed.cache, {"app.bin": b'agent {"type":"ready"}\nexit 3 broken\nread\n'})
    r = await bed.admin.post("/api/v1/jobs", {"image": digest, "tags": ["board"],
                                              "hold_on_failure": 600})
    assert r.status == 201, r.body
    job_id = r.body["id"]

    async def held() -> dict[str, Any] | None:
        body = (await bed.admin.get(f"/api/v1/jobs/{job_id}")).body
        return body if body["state"] == "terminated" and body["held_until"] else None

    final = await eventually(held, timeout=30)
    assert final["termination"] == {"reason": "workload_exited", "exit_status": 3,
                                    "message": "broken"}, final
    assert bed.supervisor.runner.held == job_id
    since = len(bed.board.events())
    digest = write_cache(bed.cache, {"app.bin": b'agent {"type":"ready"}\nexit 0\n'})
    waiting = (await bed.admin.post("/api/v1/jobs", {"image": digest, "tags": ["board"]})
               ).body["id"]
    await sleep(1.0)  # five scheduling passes
    assert (await bed.admin.get(f"/api/v1/jobs/{waiting}")).body["state"] == "queued"
    assert "erased" not in bed.board.events()[since:]  # the board is as it was
    bridge = bed.supervisor.driver.run.bridge  # tml job connect JOB console, in short
    client = await echo_client(bridge.port.getHost().port)
    client.transport.write(b"typed at the held board\n")
    await client.wait_for(len(b"got: typed at the held board"), timeout=10)
    client.transport.loseConnection()

    r = await bed.admin.post(f"/api/v1/jobs/{job_id}/terminate")  # tml job cancel
    assert r.status == 200, r.body

    async def done() -> dict[str, Any] | None:
        body = (await bed.admin.get(f"/api/v1/jobs/{waiting}")).body
        return body if body["state"] == "terminated" else None

    assert (await eventually(done, timeout=30))["termination"]["exit_status"] == 0
    assert "erased" in bed.board.events()[since:]  # cleaned before the next job
    released = (await bed.admin.get(f"/api/v1/jobs/{job_id}")).body
    assert released["held_until"] is None and released["termination"]["exit_status"] == 3
    console = await closed_stream(bed.admin, released["logs"][0], job_id, "console")
    _, marker, held = console.partition(HOLD_MARKER)
    assert marker and b"got: typed at the held board" in held
    assert console.endswith(b"[treadmill: the hold is over: the hold was released "
                            b"(tml job cancel)]\r\n")


@pytest_twisted.ensureDeferred
async def test_a_supervisor_restart_ends_a_boards_hold_and_the_next_job_cleans_first(
        migrated_database: str, tmp_path: Path) -> None:
    """A board cannot be re-adopted (its console of the meantime is lost): the restarted
    supervisor ends the hold and closes the job's log saying so, the switchboard frees the
    host, and the next job cleans and checks the board before it runs."""
    async with switchboard_with_logs(migrated_database, tmp_path,
                                     scheduler_interval=0.2) as (sb, _):
        board = await FakeBoard(tmp_path / "board").start()
        restarted: SupervisorService | None = None
        try:
            async with board_host(sb, board, tmp_path) as supervisor:
                bed = Bed(sb, board, tmp_path / "cache", supervisor)
                digest = write_cache(bed.cache, {"app.bin": b'agent {"type":"ready"}\nexit 3 x\n'})
                job_id = (await bed.admin.post("/api/v1/jobs", {
                    "image": digest, "tags": ["board"], "hold_on_failure": 600})).body["id"]

                async def held() -> bool:
                    return bool((await bed.admin.get(f"/api/v1/jobs/{job_id}")).body["held_until"])

                await eventually(held, timeout=30)
                config = supervisor.config
                await supervisor.stopService()
            since = len(board.events())
            restarted = SupervisorService(reactor, config)
            restarted.startService()
            await restarted.ready()
            assert restarted.runner.held is None  # the hold is over
            await restarted.connected()

            async def freed() -> bool:
                return (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body["held_until"] is None

            await eventually(freed, timeout=30)
            job = (await sb.admin.get(f"/api/v1/jobs/{job_id}")).body
            console = await closed_stream(sb.admin, job["logs"][0], job_id, "console")
            assert HOLD_MARKER in console and console.endswith(
                b"[treadmill: the hold is over: the supervisor restarted and could not re-adopt "
                b"the held host]\r\n")
            final = await Bed(sb, board, tmp_path / "cache", restarted).run(
                b'agent {"type":"ready"}\nexit 0\n')
            assert final["termination"]["exit_status"] == 0, final
            events = board.events()[since:]
            assert events.index("erased") < next(i for i, e in enumerate(events)
                                                 if e.startswith("flashed"))
        finally:
            if restarted is not None and restarted.running:
                await restarted.stopService()
                await restarted.driver.shutdown()
            board.stop()
