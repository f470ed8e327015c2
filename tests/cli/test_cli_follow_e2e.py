"""Every way a followed job can end, for real: ``tml`` in-process against a real
switchboard, a real log server and real supervisors with the mock driver.

One stack serves the module (a database of its own): two mock hosts tagged
``mock``, and a third tagged ``phoenix`` that the restart test restarts.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from psycopg2.extensions import make_dsn
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from tests.support import (
    RunningSwitchboard,
    mock_supervisor,
    switchboard_with_logs,
)
from tests.util.waiting import eventually
from treadmill.cli.commands import follow as follow_module
from treadmill.common.captoken import Access
from treadmill.dev.pgcluster import create_database, drop_database
from treadmill.protocol.logs import HOLD_MARKER
from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.service import SupervisorService

pytestmark = pytest.mark.slow

DIGEST = "sha256:" + "5" * 64
TAIL_WAIT = 3.0  # CONSOLE_TAIL_WAIT in these tests
EVENT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  [a-z]")


@dataclass
class Stack:
    sb: RunningSwitchboard
    supervisors: dict[str, SupervisorService]
    configs: dict[str, SupervisorConfig]
    env: dict[str, str]

    async def job(self, job_id: str) -> dict[str, Any]:
        return (await self.sb.admin.get(f"/api/v1/jobs/{job_id}")).body

    async def jobs(self) -> list[dict[str, Any]]:
        return (await self.sb.admin.get("/api/v1/jobs")).body["jobs"]

    async def new_job(self, before: set[str]) -> dict[str, Any]:
        """The job submitted since ``before`` (the ids then)."""

        async def found() -> dict[str, Any] | None:
            return next((j for j in await self.jobs() if j["id"] not in before), None)

        return await eventually(found, timeout=10)

    async def state(self, job_id: str, *states: str) -> dict[str, Any]:
        async def reached() -> dict[str, Any] | None:
            job = await self.job(job_id)
            return job if job["state"] in states else None

        return await eventually(reached, timeout=15)


@pytest_twisted.async_yield_fixture(scope="module")
async def stack(pg_admin_dsn: str, tmp_path_factory) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("follow")
    name = f"treadmill_test_{uuid.uuid4().hex[:12]}"
    create_database(pg_admin_dsn, name)
    try:
        async with switchboard_with_logs(make_dsn(pg_admin_dsn, dbname=name), root,
                                         scheduler_interval=0.2,
                                         timeout_interval=0.2) as (sb, _):
            supervisors, configs = {}, {}
            try:
                for host, tags in (("mock-1", ["mock"]), ("mock-2", ["mock"]),
                                   ("phoenix", ["phoenix"])):
                    r = await sb.admin.post("/api/v1/hosts", {"name": host, "tags": tags})
                    supervisors[host] = mock_supervisor(sb.url, r.body["token"], root / host,
                                                        run_time=0.5, console_rate=2000,
                                                        config={"reconnect_max": 0.5})
                    configs[host] = supervisors[host].config
                    await supervisors[host].connected()
                env = {"HOME": str(root / "home"), "TREADMILL_URL": sb.url,
                       "TREADMILL_TOKEN": sb.admin_token}
                yield Stack(sb, supervisors, configs, env)
            finally:
                for supervisor in supervisors.values():
                    await supervisor.stopService()
    finally:
        drop_database(pg_admin_dsn, name)


@pytest.fixture(autouse=True)
def short_tail(monkeypatch):
    monkeypatch.setattr(follow_module, "CONSOLE_TAIL_WAIT", TAIL_WAIT)


def assert_not_glued(out: str) -> None:
    """Every event line starts a line of its own: nothing precedes its time stamp."""
    for line in out.splitlines():
        if re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  (queued|assigned|initializing|ready|"
                     r"terminating|terminated)", line):
            assert EVENT_LINE.match(line), f"glued: {line!r}"


async def _started(tml, stack: Stack, *argv: str) -> tuple[Deferred, dict[str, Any]]:
    before = {j["id"] for j in await stack.jobs()}
    d = Deferred.fromCoroutine(tml(*argv, env=stack.env))
    return d, await stack.new_job(before)


@pytest_twisted.ensureDeferred
async def test_ran_exit_0_with_console_and_artifacts(tml, stack: Stack, tmp_path: Path):
    following, job = await _started(tml, stack, "job", "run", DIGEST, "--tag", "mock",
                                    "--param", "mock.run_time=1", "--artifacts",
                                    str(tmp_path / "a"))
    # A results stream beside the console (as an agent's results would be shipped).
    await stack.state(job["id"], "ready")
    results = b'{"case": "boot", "outcome": "pass"}\n'
    token = stack.sb.service.signer.sign("host:mock-1", "treadmill-logserver",
                                         [Access("job", job["id"], ("append",))], 60)
    import treq

    r = await treq.post(f"{job['logs'][0]}/v1/jobs/{job['id']}/streams/results",
                        params={"offset": "0", "close": "1"}, data=results,
                        headers={"Authorization": f"Bearer {token}"})
    assert r.code == 200, await r.text()
    r = await following.addTimeout(15, reactor)
    assert r.status == 0, r.err
    job_id = r.out.splitlines()[0]
    assert job_id == job["id"]
    assert "mock console" in r.out and "terminated" in r.out
    assert_not_glued(r.out)
    assert f"tml: job {job_id} terminated: workload_exited, exit status 0" in r.err
    assert "interrupting tml cancels it" in r.err
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["job"] == job_id and summary["submitted"] == job_id
    assert (summary["state"], summary["reason"], summary["exit_status"]) == (
        "terminated", "workload_exited", 0)
    assert summary["tml_exit_status"] == 0 and summary["ran"] is True
    assert [j["id"] for j in summary["chain"]] == [job_id]
    assert summary["timings"]["run_seconds"] >= 0.5
    assert summary["artifacts"]["results"] == "results"
    assert (tmp_path / "a" / "results").read_bytes() == results
    console = (tmp_path / "a" / "console.log").read_text()
    access = (await stack.sb.admin.post(f"/api/v1/jobs/{job_id}/logs/token")).body

    stored = await (await treq.get(f"{access['servers'][0]}/v1/jobs/{job_id}/streams/console",
                                   headers={"Authorization": f"Bearer {access['token']}"})
                    ).content()
    assert console.encode() == stored and b"mock console" in stored
    events = [json.loads(line) for line in
              (tmp_path / "a" / "events.jsonl").read_text().splitlines()]
    assert events[0]["state"] == "queued" and events[-1]["state"] == "terminated"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))

    # The same directory again (a CI workspace kept between runs), for a job that never
    # runs: the earlier job's console and results are gone, not passed off as this one's.
    (tmp_path / "a" / "junit.xml").write_text("the pipeline's own file\n")
    r = await Deferred.fromCoroutine(tml(
        "job", "run", DIGEST, "--tag", "typo", "--queue-timeout", "1", "--artifacts",
        str(tmp_path / "a"), env=stack.env)).addTimeout(15, reactor)
    assert r.status == 5, r.err
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["job"] != job_id and summary["ran"] is False
    assert (summary["artifacts"]["console"], summary["artifacts"]["results"]) == (None, None)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "events.jsonl", "junit.xml", "summary.json"]
    events = [json.loads(line) for line in
              (tmp_path / "a" / "events.jsonl").read_text().splitlines()]
    assert {e["job"] for e in events} == {summary["job"]}


@pytest_twisted.ensureDeferred
async def test_workload_failed_is_4_and_wait_agrees(tml, stack: Stack):
    r = await tml("job", "submit", DIGEST, "--tag", "mock", "--param", "mock.exit_status=3",
                  "--follow", env=stack.env)
    assert r.status == 4, r.err
    job_id = r.out.splitlines()[0]
    assert f"tml job cancel {job_id}" in r.err.splitlines()
    assert_not_glued(r.out)
    # A short id works wherever a job id does; wait reports the same outcome.
    r = await tml("job", "wait", job_id[:8], env=stack.env)
    assert r.status == 4 and r.out == "", r.err
    r = await tml("job", "wait", job_id[:6], "--json", env=stack.env)
    assert r.status == 4 and json.loads(r.out)["id"] == job_id


@pytest_twisted.ensureDeferred
async def test_failed_and_held_ends_every_follower(tml, stack: Stack):
    """A failed job whose host stays held (--hold-on-failure) has ended: following it
    ends with its exit status, although its host, console and endpoints live on (the
    console shown up to the line where the held host's begins)."""
    started = reactor.seconds()
    r = await tml("job", "submit", DIGEST, "--tag", "mock", "--param", "mock.exit_status=3",
                  "--param", "mock.run_time=1", "--hold-on-failure", "1h", "--follow",
                  env=stack.env)
    job_id = r.out.splitlines()[0]
    try:
        assert r.status == 4, r.err
        assert "mock console" in r.out and HOLD_MARKER.decode() in r.out
        assert_not_glued(r.out)
        assert reactor.seconds() - started < 1 + 2 * TAIL_WAIT + 5
        assert f"job {job_id} failed; its host" in r.err and "held for debugging" in r.err
        assert f"release: tml job cancel {job_id}" in r.err
        assert f"console: tml job logs {job_id} --follow" in r.err
        assert "was not closed" not in r.err
        held = await stack.job(job_id)
        assert held["state"] == "terminated" and held["held_until"], held
        for argv, status in ((("job", "wait", job_id), 4),
                             (("job", "events", job_id, "-f"), 0),
                             (("job", "run", DIGEST, "--tag", "mock", "--param",
                               "mock.exit_status=2", "--hold-on-failure", "1h",
                               "--no-console"), 4)):
            before = reactor.seconds()
            done = await Deferred.fromCoroutine(tml(*argv, env=stack.env)).addTimeout(
                2 * TAIL_WAIT + 10, reactor)
            assert done.status == status, (argv, done.err)
            assert reactor.seconds() - before < 2 * TAIL_WAIT + 5, argv
            if argv[1] == "run":
                second = next(line.split()[2] for line in done.err.splitlines()
                              if "failed; its host" in line)
                assert (await tml("job", "cancel", second, env=stack.env)).status == 0
    finally:
        assert (await tml("job", "cancel", job_id, env=stack.env)).status == 0


@pytest_twisted.ensureDeferred
async def test_a_held_hosts_console_is_in_the_logs_until_the_hold_ends(tml, stack: Stack):
    """What a held host's console prints after the job's end is in ``tml job logs``:
    ``--follow`` shows it live and ends when ``tml job cancel`` ends the hold; the
    stream is then closed, complete, and ``events`` records the hold's start and end."""
    r = await tml("job", "submit", DIGEST, "--tag", "mock", "--param", "mock.exit_status=3",
                  "--param", "mock.run_time=0.5", "--hold-on-failure", "1h", env=stack.env)
    assert r.status == 0, r.err
    job_id = r.out.split()[0]
    await stack.state(job_id, "terminated")
    following = Deferred.fromCoroutine(tml("job", "logs", job_id, "--follow", env=stack.env))
    await deferLater(reactor, 2 * TAIL_WAIT, lambda: None)
    assert not following.called  # the hold goes on: so does the console
    r = await tml("job", "logs", job_id, env=stack.env)
    assert r.status == 0 and HOLD_MARKER.decode() in r.out, r.err
    held_part = r.out.split(HOLD_MARKER.decode(), 1)[1]
    assert held_part.count("mock console") > 10  # 2000 bytes a second after the end
    assert (await tml("job", "cancel", job_id, env=stack.env)).status == 0
    cancelled = reactor.seconds()
    followed = await following.addTimeout(15, reactor)
    assert followed.status == 0, followed.err
    assert reactor.seconds() - cancelled < TAIL_WAIT  # the stream closed: no tail wait
    assert "was not closed" not in followed.err
    assert followed.out.endswith("\r\n[treadmill: the hold is over: the hold was released "
                                 "(tml job cancel)]\r\n")
    r = await tml("job", "logs", job_id, env=stack.env)
    assert r.out == followed.out  # complete: the follower saw every byte, once
    r = await tml("job", "logs", job_id, "--stream", "events", env=stack.env)
    lines = [json.loads(line) for line in r.out.splitlines()]
    assert lines[-3]["state"] == "terminated" and lines[-3]["held"] is True
    assert [(line.get("hold"), line.get("reason")) for line in lines[-2:]] == [
        ("started", None), ("ended", "released")]
    assert (await stack.job(job_id))["held_until"] is None


@pytest_twisted.ensureDeferred
async def test_never_ran_queue_timeout_ends_every_follower(tml, stack: Stack):
    started = reactor.seconds()
    following, job = await _started(tml, stack, "job", "submit", DIGEST, "--tag", "typo",
                                    "--queue-timeout", "1", "--follow")
    logs = Deferred.fromCoroutine(tml("job", "logs", job["id"], "--follow", env=stack.env))
    waiting = Deferred.fromCoroutine(tml("job", "wait", job["id"], env=stack.env))
    events = Deferred.fromCoroutine(tml("job", "events", job["id"], "-f", env=stack.env))
    r = await following.addTimeout(15, reactor)
    ended = reactor.seconds()
    assert r.status == 5, r.err
    assert "queue_timeout" in r.err and "never ran on a host" in r.err
    assert job["logs"], "the job has log servers, yet no console stream will ever exist"
    # It ended with the job (queue_timeout 1 s), not after the console's tail wait.
    assert ended - started < 1 + TAIL_WAIT / 2
    r = await logs.addTimeout(5, reactor)
    assert r.status == 0 and r.out == "", r.err
    assert "ended without running on a host" in r.err
    assert (await waiting).status == 5
    r = await events
    assert r.status == 0 and r.out.splitlines()[-1].split()[1] == "terminated"
    assert reactor.seconds() - ended < 2
    # Following after its last event: it ended already, so this ends too.
    r = await Deferred.fromCoroutine(tml("job", "events", job["id"], "-f", "--after", "50",
                                         env=stack.env)).addTimeout(5, reactor)
    assert (r.status, r.out) == (0, ""), r.err


@pytest_twisted.ensureDeferred
async def test_cancelled_while_queued(tml, stack: Stack):
    following, job = await _started(tml, stack, "job", "submit", DIGEST, "--tag", "nowhere",
                                    "--follow")
    r = await tml("job", "cancel", job["id"][:8], env=stack.env)
    assert r.status == 0, r.err
    r = await following.addTimeout(10, reactor)
    assert r.status == 5 and "user_terminated" in r.err, r.err


@pytest_twisted.ensureDeferred
async def test_cancelled_while_running(tml, stack: Stack):
    following, job = await _started(tml, stack, "job", "submit", DIGEST, "--tag", "mock",
                                    "--param", "mock.run_time=60", "--follow")
    await stack.state(job["id"], "ready")
    await deferLater(reactor, 0.3, lambda: None)  # some console first
    r = await tml("job", "cancel", job["id"], env=stack.env)
    assert r.status == 0, r.err
    cancelled = reactor.seconds()
    r = await following.addTimeout(15, reactor)
    assert r.status == 5 and "user_terminated" in r.err, r.err
    assert "mock console" in r.out
    assert_not_glued(r.out)
    assert reactor.seconds() - cancelled < TAIL_WAIT  # the stream was closed: no tail wait
    assert "was not closed" not in r.err


@pytest_twisted.ensureDeferred
async def test_timed_out(tml, stack: Stack):
    r = await tml("job", "submit", DIGEST, "--tag", "mock", "--param", "mock.run_time=60",
                  "--timeout", "1", "--follow", env=stack.env)
    assert r.status == 5 and "execution_timeout" in r.err, r.err
    assert_not_glued(r.out)


@pytest_twisted.ensureDeferred
async def test_host_lost(tml, stack: Stack):
    r = await tml("job", "submit", DIGEST, "--tag", "mock", "--param", "mock.crash_at=ready",
                  "--follow", env=stack.env)
    assert r.status == 5 and "host_dropped_job" in r.err, r.err
    assert "restarted as" not in r.err


@pytest_twisted.ensureDeferred
async def test_restarted_is_followed_to_the_end(tml, stack: Stack, tmp_path: Path):
    following, job = await _started(
        tml, stack, "job", "run", DIGEST, "--tag", "phoenix", "--max-restarts", "1",
        "--param", "mock.run_time=3", "--artifacts", str(tmp_path / "a"))
    await stack.state(job["id"], "ready")
    # The supervisor restarts: the mock host cannot be adopted, the job is dropped
    # (host_dropped_job) and the switchboard restarts it as a new job on the same host.
    await stack.supervisors["phoenix"].stopService()
    stack.supervisors["phoenix"] = SupervisorService(reactor, stack.configs["phoenix"])
    stack.supervisors["phoenix"].startService()
    r = await following.addTimeout(30, reactor)
    successor = next(j for j in await stack.jobs() if j["restart_of"] == job["id"])
    assert r.status == 0, r.err
    assert f"restarted as {successor['id']}" in r.err
    assert f"tml: job {successor['id']} terminated: workload_exited, exit status 0" in r.err
    assert_not_glued(r.out)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["job"] == successor["id"] and summary["submitted"] == job["id"]
    assert [(c["id"], c["reason"]) for c in summary["chain"]] == [
        (job["id"], "host_dropped_job"), (successor["id"], "workload_exited")]
    events = [json.loads(line)["job"] for line in
              (tmp_path / "a" / "events.jsonl").read_text().splitlines()]
    assert events[0] == job["id"] and events[-1] == successor["id"]
    assert (tmp_path / "a" / "console.log").exists()
    assert summary["artifacts"]["results"] is None  # no results stream: no file
    assert not (tmp_path / "a" / "results").exists()
