"""``tml`` when its standard output cannot be written: the reader went away (``tml job
logs -f ID | head``), the descriptor is closed (``>&-``) or the disk is full. The command
stops (``job run`` cancels its job, as on an interrupt) and exits 141 quietly when the
reader went away, else 1 with a message; never a traceback, never a retry loop."""

from __future__ import annotations

import errno
import io
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.cli.support import Tml, append_console
from tests.support import switchboard_with_logs
from tests.util.waiting import eventually
from treadmill.cli.main import run
from treadmill.cli.streams import EXIT_PIPE, GuardedOutput

DIGEST = "sha256:" + "7" * 64


class Failing(io.StringIO):
    """A standard output whose writes (or only its flushes) fail with ``code`` once
    ``after`` writes went through."""

    def __init__(self, code: int, after: int = 0, flush_only: bool = False) -> None:
        super().__init__()
        self.code, self.after, self.flush_only = code, after, flush_only

    def write(self, text: str) -> int:
        if not self.flush_only and self.after <= 0:
            raise OSError(self.code, "failed")
        self.after -= 1
        return super().write(text)

    def flush(self) -> None:
        if self.flush_only:
            raise OSError(self.code, "No space left on device")


def test_the_first_failure_is_kept_and_later_writes_are_dropped() -> None:
    errors: list[OSError] = []
    out = GuardedOutput(Failing(errno.EPIPE, after=1))  # type: ignore[arg-type]
    out.on_error = errors.append
    assert out.write("kept\n") == 5
    assert out.write("lost\n") == 5 and out.write("dropped\n") == 8
    out.flush()
    assert [e.errno for e in errors] == [errno.EPIPE]
    assert out.pipe_closed
    assert out.exit_status(pytest.fail) == EXIT_PIPE


def test_another_failure_is_an_error_with_its_reason() -> None:
    out = GuardedOutput(Failing(errno.ENOSPC, flush_only=True))  # type: ignore[arg-type]
    out.write("{}\n")
    out.flush()
    said: list[str] = []
    assert out.exit_status(said.append) == 1
    assert said == ["cannot write to standard output: No space left on device"]


async def _tml(sb: Any, stdout: io.StringIO, *argv: str) -> tuple[int, str]:
    err = io.StringIO()
    code = await run(reactor, ["--url", sb.url, *argv], stdout, err,  # type: ignore[arg-type]
                     {"TREADMILL_TOKEN": sb.admin_token})
    return code, err.getvalue()


@pytest_twisted.ensureDeferred
async def test_json_left_in_the_buffer_that_cannot_be_flushed_is_an_error(switchboard) -> None:
    """``tml job ls --json >/dev/full``: the JSON fits the buffer, its flush fails."""
    code, err = await _tml(switchboard, Failing(errno.ENOSPC, flush_only=True),
                           "job", "ls", "--json")
    assert (code, err) == (1, "tml: error: cannot write to standard output: "
                              "No space left on device\n")


@pytest_twisted.ensureDeferred
async def test_job_run_whose_reader_went_away_cancels_its_job(switchboard) -> None:
    """``tml job run … | head -1``: the job is cancelled, as on SIGINT, and the status is
    141; stderr says what became of the job, without 'interrupted (SIGPIPE)'."""
    code, err = await _tml(switchboard, Failing(errno.EPIPE, after=1),
                           "job", "run", DIGEST, "--tag", "nowhere")
    assert code == EXIT_PIPE, err
    assert "cancelled job" in err and "Traceback" not in err and "SIGPIPE" not in err
    jobs = (await switchboard.admin.get("/api/v1/jobs")).body["jobs"]
    assert [j["state"] for j in jobs] in (["terminated"], ["terminating"])


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_logs_follow_stops_at_once_when_its_reader_goes_away(migrated_database,
                                                                   tmp_path) -> None:
    """A real ``tml job logs --follow`` whose reader closed the pipe exits 141 at its
    next write, quietly: it used to take its own EPIPE for the log server's failure and
    retry for ever ('log server …: Broken pipe; retrying')."""
    async with switchboard_with_logs(migrated_database, tmp_path) as (sb, _):
        job = (await sb.admin.post("/api/v1/jobs", {"image": DIGEST, "tags": ["nowhere"]})
               ).body
        await append_console(sb, job, 0, b"line 1\n")
        tml = Tml.start(sb, "job", "logs", job["id"], "--follow")

        async def printed() -> bool:
            return tml.out == b"line 1\n"

        await eventually(printed, timeout=20)
        tml.transport.closeChildFD(1)
        await append_console(sb, job, 7, b"line 2\n")
        assert await tml.ended.addTimeout(20, reactor) == EXIT_PIPE, tml.err
        assert tml.err == b""


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_closed_standard_output_is_an_error_not_a_traceback(switchboard) -> None:
    """``tml job ls >&-``: exit status 1 and one line that says why."""
    tml = Tml.start(switchboard, "job", "ls", child_fds={0: "w", 2: "r"})
    assert await tml.ended.addTimeout(20, reactor) == 1, tml.err
    assert tml.err == b"tml: error: cannot write to standard output: Bad file descriptor\n"
