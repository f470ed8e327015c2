"""SIGINT and SIGTERM sent to a real ``tml`` process following a job on the real
switchboard: exit statuses 130 and 143, and what happens to the job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from tests.cli.support import Tml, append_console
from tests.support import switchboard_with_logs
from tests.util.waiting import eventually

pytestmark = pytest.mark.slow

DIGEST = "sha256:" + "6" * 64


async def _interrupt(switchboard: Any, signal: str, *argv: str) -> tuple[Tml, str, int | None]:
    tml = Tml.start(switchboard, *argv)
    job_id = await tml.following()
    tml.transport.signalProcess(signal)
    code = await tml.ended.addTimeout(20, reactor)
    return tml, job_id, code


async def _job(switchboard: Any, job_id: str) -> dict[str, Any]:
    return (await switchboard.admin.get(f"/api/v1/jobs/{job_id}")).body


@pytest_twisted.ensureDeferred
async def test_sigint_cancels_the_job_of_job_run(switchboard) -> None:
    tml, job_id, code = await _interrupt(switchboard, "INT", "job", "run", DIGEST,
                                         "--tag", "nowhere")
    err = tml.err.decode()
    assert code == 130, err
    assert f"tml: interrupted; cancelled job {job_id}" in err
    assert "cannot reach" not in err and "retrying" not in err and "Traceback" not in err
    assert err.rstrip().endswith("tml: interrupted (SIGINT)")
    job = await _job(switchboard, job_id)
    assert job["state"] == "terminated"
    assert job["termination"]["reason"] == "user_terminated"


@pytest_twisted.ensureDeferred
async def test_sigterm_cancels_the_job_of_job_run_unless_kept(switchboard) -> None:
    tml, job_id, code = await _interrupt(switchboard, "TERM", "job", "run", DIGEST,
                                         "--tag", "nowhere")
    assert code == 143, tml.err
    assert (await _job(switchboard, job_id))["state"] == "terminated"

    tml, job_id, code = await _interrupt(switchboard, "TERM", "job", "run", DIGEST,
                                         "--tag", "nowhere", "--keep-on-interrupt")
    err = tml.err.decode()
    assert code == 143, err
    assert f"tml job cancel {job_id}" in err.splitlines()
    assert (await _job(switchboard, job_id))["state"] == "queued"


@pytest_twisted.ensureDeferred
async def test_submit_follow_interrupted_keeps_the_job_and_says_how_to_cancel(
        switchboard) -> None:
    tml, job_id, code = await _interrupt(switchboard, "INT", "job", "submit", DIGEST,
                                         "--tag", "nowhere", "--follow")
    err = tml.err.decode()
    assert code == 130, err
    lines = err.splitlines()
    assert lines.count(f"tml job cancel {job_id}") == 2  # when it starts, and at the end
    assert "cannot reach" not in err and "Traceback" not in err
    assert tml.out.decode().splitlines()[0] == job_id
    assert (await _job(switchboard, job_id))["state"] == "queued"


def test_a_second_signal_ends_tml_at_once() -> None:
    """The first signal cancels the command (which may clean up); the second forces."""
    import signal
    from types import SimpleNamespace

    from treadmill.cli.main import Interrupts

    forced: list[int] = []
    cancelled: list[bool] = []
    interrupts = Interrupts(forced.append)
    ctx = SimpleNamespace(interrupted=None)
    task: Deferred[int] = Deferred(lambda _: cancelled.append(True))
    task.addErrback(lambda f: None)
    interrupts.bind(ctx, task)  # type: ignore[arg-type]
    interrupts.fire(signal.SIGTERM)
    assert (ctx.interrupted, cancelled, forced) == (signal.SIGTERM, [True], [])
    interrupts.fire(signal.SIGINT)
    assert forced == [130]
    # A signal before the command runs interrupts it as soon as it does.
    early = Interrupts(forced.append)
    early.fire(signal.SIGINT)
    ctx2 = SimpleNamespace(interrupted=None)
    task2: Deferred[int] = Deferred()
    task2.addErrback(lambda f: None)
    early.bind(ctx2, task2)  # type: ignore[arg-type]
    assert ctx2.interrupted == signal.SIGINT and task2.called


@pytest_twisted.ensureDeferred
async def test_an_interrupted_console_ends_its_line(migrated_database, tmp_path) -> None:
    """Interrupted while the console stopped mid-line, ``tml job logs --follow`` ends
    that line, so that its last words do not glue onto the console in a CI log."""
    async with switchboard_with_logs(migrated_database, tmp_path) as (sb, _):
        job = (await sb.admin.post("/api/v1/jobs", {"image": DIGEST, "tags": ["nowhere"]})
               ).body
        await append_console(sb, job, 0, b"line 1\nhalf a li")
        tml = Tml.start(sb, "job", "logs", job["id"][:8], "--follow")

        async def printed() -> bool:
            return tml.out.endswith(b"half a li")

        await eventually(printed, timeout=20)
        tml.transport.signalProcess("INT")
        assert await tml.ended.addTimeout(20, reactor) == 130, tml.err
        assert tml.out == b"line 1\nhalf a li\n"
        assert tml.err.decode().splitlines()[-1] == "tml: interrupted (SIGINT)"


@pytest.mark.parametrize("argv, prompt, signal, status", [
    (("login",), b"User: ", "INT", 130),
    (("admin", "user", "add", "zed", "--password-stdin"), b"", "TERM", 143),
])
@pytest_twisted.ensureDeferred
async def test_a_signal_interrupts_a_read_of_standard_input(
        switchboard, argv: tuple[str, ...], prompt: bytes, signal: str, status: int) -> None:
    """A prompt or ``--password-stdin`` reading a pipe that stays open (a CI step's
    standard input) blocks the reactor: the signal handler itself interrupts the read
    (they used to ignore SIGINT and SIGTERM until killed)."""
    tml = Tml.start(switchboard, *argv)  # its standard input: a pipe nobody writes to
    syscall = Path(f"/proc/{tml.transport.pid}/syscall")

    async def reading() -> bool:  # blocked in read(0, …)
        return tml.err == prompt and syscall.read_text().startswith("0 0x0 ")

    await eventually(reading, timeout=20)
    tml.transport.signalProcess(signal)
    assert await tml.ended.addTimeout(20, reactor) == status, tml.err
    assert tml.err.decode().splitlines()[-1] == f"tml: interrupted (SIG{signal})"
    assert (await switchboard.admin.get("/api/v1/users/zed")).status == 404
