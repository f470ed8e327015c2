"""Results from console patterns and the agent: JobResults, and the runner ending a job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import succeed
from zope.interface import implementer

from tests.supervisor.peer import JOB_A, FakeSwitchboard, job
from treadmill.protocol import results as fmt
from treadmill.supervisor.drivers import IHostDriver
from treadmill.supervisor.observers import JobObserver
from treadmill.supervisor.results import JobResults
from treadmill.supervisor.service import SupervisorService

TOCK = {"test_case": r"^test (?P<name>\S+) \.\.\. (?P<result>ok|FAILED|ignored)"
                     r"(?: \((?P<duration>[0-9.]+ ?m?s)\))?",
        "pass": r"^test result: ok\.", "fail": r"^test result: FAILED\.",
        "end": r"^test result: "}


class Made:
    def __init__(self, patterns: dict[str, str] | None) -> None:
        self.lines: list[dict[str, Any]] = []
        self.ends: list[tuple[int, str]] = []
        self.results = JobResults("job", patterns, self.write,
                                  lambda status, message: self.ends.append((status, message)))
        self.results.listen()

    def write(self, raw: bytes) -> None:
        assert raw.endswith(b"\n") and raw.count(b"\n") == 1
        self.lines.append(fmt.parse_line(raw))


def cases(lines: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(line["name"], line["result"]) for line in lines if line["type"] == "test_case"]


def test_console_lines_become_test_cases_across_chunks() -> None:
    made = Made(TOCK)
    text = (b"booting\r\ntest a::one ... ok (12ms)\r\ntest a::two ... FAI"
            b"LED\r\ntest a::three ... ignored\nnoise test x ... ok\n"
            b"test result: FAILED. 1 passed; 1 failed\r\nafter the end ... ok\n")
    for i in range(0, len(text), 7):  # in small pieces, splitting lines anywhere
        made.results.console(text[i:i + 7])
    assert cases(made.lines) == [("a::one", "pass"), ("a::two", "fail"), ("a::three", "skip")]
    assert made.lines[0]["duration"] == 0.012 and made.lines[0]["source"] == "console"
    assert made.ends == [(1, "test result: FAILED. 1 passed; 1 failed")]
    made.results.finish("workload_exited", 1, "")
    assert made.lines[-1] == {"type": "summary", "result": "fail", "passed": 1, "failed": 1,
                              "skipped": 1, "errors": 0, "exit_status": 1,
                              "message": "test result: FAILED. 1 passed; 1 failed"}
    made.results.finish("workload_exited", 1, "")  # once only
    assert len(made.lines) == 4


def test_console_output_before_booting_is_not_matched() -> None:
    made = Made(TOCK)
    made.results.listening = False
    made.results.console(b"test old ... ok\ntest result: ok.\n")  # a flash tool, old firmware
    made.results.listen()
    made.results.console(b"test new ... ok\n")
    assert cases(made.lines) == [("new", "pass")] and made.ends == []


def test_a_pass_line_ends_the_run_with_status_zero() -> None:
    made = Made(TOCK)
    made.results.console(b"test t ... ok\ntest result: ok. 1 passed\n")
    assert made.ends == [(0, "results: 1 passed, 0 failed")]


def test_without_an_end_pattern_pass_or_fail_ends_the_run() -> None:
    made = Made({"pass": "^Kernel tests passed$", "fail": "Kernel panic"})
    made.results.console(b"Kernel tests passed\n")
    assert made.ends == [(0, "results: 0 passed, 0 failed")]
    made = Made({"pass": "^Kernel tests passed$", "fail": "Kernel panic"})
    made.results.console(b"Kernel panic - not syncing\n")
    assert made.ends[0][0] == 1


def test_an_end_without_the_expected_pass_line_is_a_failure() -> None:
    made = Made({"pass": "^PASS$", "end": "^END$"})
    made.results.console(b"END\n")
    assert made.ends[0][0] == 1
    made = Made({"end": "^END$"})  # nothing expected: no failures is a pass
    made.results.console(b"END\n")
    assert made.ends[0][0] == 0


def test_a_failed_case_fails_the_run_even_after_a_pass_line() -> None:
    made = Made(TOCK)
    made.results.console(b"test t ... FAILED\ntest result: ok.\n")
    assert made.ends[0][0] == 1


def test_only_the_first_bytes_of_a_long_line_are_matched() -> None:
    made = Made({"test_case": r"(?P<name>x+) (?P<result>ok)", "fail": "FAIL"})
    made.results.console(b"x" * fmt.MAX_MATCH_LINE + b" ok FAIL\n")
    made.results.console(b"y" * 200_000)  # a line without end: its start is matched once
    made.results.console(b"FAIL\nxx ok\n")
    assert made.ends == [] and cases(made.lines) == [("xx", "pass")]


def test_bytes_that_are_not_utf8_are_matched_as_replacement_characters() -> None:
    """Line noise on a board's serial console (a stray byte, a character cut in two) is
    matched as U+FFFD: RE2 matches no invalid UTF-8 with ``.`` or ``\\S``, so such a line
    lost its test case, and a fail line its verdict."""
    made = Made({"test_case": r"^test (?P<name>\S+) (?P<result>ok|FAILED)$",
                 "fail": r"^FAIL: .+$"})
    made.results.console(b"test caf\xc3\xa9 ok\ntest a\xffb FAILED\ntest cut\xe2\x82 ok\r\n")
    assert cases(made.lines) == [("caf\u00e9", "pass"), ("a\ufffdb", "fail"),
                                 ("cut\ufffd", "pass")]
    made.results.console(b"FAIL: \x00\xfe\xff\r\n")
    assert made.ends == [(1, "FAIL: \x00\ufffd\ufffd")]


def test_agent_messages_and_the_summary() -> None:
    made = Made(None)
    assert not made.results.active
    made.results.agent({"type": "test_case", "name": "t", "result": "pass", "duration": 1,
                        "measurements": [{"name": "mb_s", "value": 12.5}]})
    made.results.agent({"type": "summary", "result": "fail", "message": "flaky"})
    made.results.console(b"test x ... ok\n")  # no patterns: the console is not read
    made.results.finish("workload_exited", 0)
    assert made.lines == [
        {"type": "test_case", "name": "t", "result": "pass", "duration": 1, "source": "agent",
         "measurements": [{"name": "mb_s", "value": 12.5}]},
        {"type": "summary", "result": "fail", "passed": 1, "failed": 0, "skipped": 0,
         "errors": 0, "exit_status": 0, "message": "flaky"}]


def test_exit_status_decides_without_a_verdict_and_other_ends_are_errors() -> None:
    made = Made(None)
    made.results.agent({"type": "test_case", "name": "t", "result": "pass"})
    made.results.finish("workload_exited", 3)
    assert made.lines[-1]["result"] == "fail"
    made = Made(TOCK)
    made.results.finish("execution_timeout", None, "too slow")
    assert made.lines == [{"type": "summary", "result": "error", "passed": 0, "failed": 0,
                           "skipped": 0, "errors": 0,
                           "message": "the job ended execution_timeout: too slow"}]
    made = Made(None)
    made.results.finish("workload_exited", 0)
    assert made.lines == []  # no patterns, nothing from the agent: no results


# -- the runner ----------------------------------------------------------------------------

def observe(service: SupervisorService) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []

    class Results(JobObserver):
        def results(self, job_id: str, line: bytes) -> None:
            lines.append({"job": job_id, **json.loads(line)})

    service.runner.add_observer(Results())
    return lines


@pytest_twisted.ensureDeferred
async def test_console_patterns_end_the_job_workload_exited(
        peer: FakeSwitchboard, supervisors: Any, tmp_path: Path) -> None:
    service = supervisors()
    lines = observe(service)
    conn = await peer.connection()
    start = {**job(run_time="inf", console="test a ... ok\ntest b ... FAILED\n"
                   "test result: FAILED. 1 passed; 1 failed\n"), "results": TOCK}
    assert (await conn.start(start))["ok"] is True
    events = await conn.events_until("terminated")
    assert events[-1]["reason"] == "workload_exited" and events[-1]["exit_status"] == 1
    assert events[-2]["state"] == "terminating"
    assert events[-1]["message"] == "test result: FAILED. 1 passed; 1 failed"
    assert [(line["type"], line.get("name")) for line in lines] == [
        ("test_case", "a"), ("test_case", "b"), ("summary", None)]
    assert lines[-1]["result"] == "fail" and lines[-1]["exit_status"] == 1
    assert all(line["job"] == JOB_A for line in lines)


@pytest_twisted.ensureDeferred
async def test_a_passing_console_run_exits_zero(peer: FakeSwitchboard, supervisors: Any) -> None:
    service = supervisors()
    lines = observe(service)
    conn = await peer.connection()
    await conn.start({**job(run_time="inf", console="test a ... ok\ntest result: ok.\n"),
                      "results": TOCK})
    events = await conn.events_until("terminated")
    assert events[-1]["reason"] == "workload_exited" and events[-1]["exit_status"] == 0
    assert lines[-1]["result"] == "pass" and lines[-1]["passed"] == 1


@pytest_twisted.ensureDeferred
async def test_agent_results_through_the_mock_agent(peer: FakeSwitchboard,
                                                    supervisors: Any) -> None:
    service = supervisors()
    lines = observe(service)
    conn = await peer.connection()
    said = "\n".join(json.dumps(m) for m in (
        {"type": "test_case", "name": "boot", "result": "pass", "duration": 0.5},
        {"type": "test_case", "name": "net", "result": "skip", "message": "no network"},
        {"type": "test_case", "name": "bad", "result": "sideways"},  # invalid: not recorded
        {"type": "summary", "result": "pass"},
        {"type": "exit", "status": 0, "message": "all good"}))
    await conn.start(job(run_time="inf", agent=said))
    events = await conn.events_until("terminated")
    assert events[-1] == {**events[-1], "reason": "workload_exited", "exit_status": 0,
                          "message": "all good"}
    assert [(line["type"], line.get("name"), line["result"]) for line in lines] == [
        ("test_case", "boot", "pass"), ("test_case", "net", "skip"), ("summary", None, "pass")]
    assert lines[-1]["skipped"] == 1 and lines[0]["source"] == "agent"


@pytest_twisted.ensureDeferred
async def test_a_user_stop_is_not_taken_for_the_end_of_the_run(
        peer: FakeSwitchboard, supervisors: Any) -> None:
    service = supervisors()
    lines = observe(service)
    conn = await peer.connection()
    await conn.start({**job(run_time="inf", console="test a ... ok\n"), "results": TOCK})
    await conn.events_until("ready")
    await conn.stop(JOB_A, "user_terminated")
    events = await conn.events_until("terminated")
    assert events[-1]["reason"] == "user_terminated" and "exit_status" not in events[-1]
    assert lines[-1]["result"] == "error" and lines[-1]["passed"] == 1


def test_a_lone_surrogate_from_the_agent_still_makes_a_utf8_line() -> None:
    made = Made(None)
    made.results.agent({"type": "test_case", "name": "bad \ud800 name", "result": "pass"})
    assert made.lines[0]["name"] == "bad ? name"


@implementer(IHostDriver)
class Adopting:
    """A host that keeps its job across supervisor restarts (as a VM or a board does)."""

    name = "adopting"

    def __init__(self) -> None:
        self.reporter: Any = None

    def start(self, job: dict[str, Any], reporter: Any) -> Any:
        self.reporter = reporter
        reporter.stage("booting")
        reporter.ready()
        return succeed(None)

    def stop(self, job_id: str, reason: str) -> Any:
        reactor.callLater(0, self.reporter.stopped, reason)
        return succeed(None)

    def adopt(self, job: dict[str, Any], reporter: Any) -> bool:
        self.reporter = reporter
        return True

    def shutdown(self) -> None:
        return None


@pytest_twisted.ensureDeferred
async def test_an_adopted_job_goes_on_matching_after_a_restart(
        peer: FakeSwitchboard, supervisors: Any) -> None:
    first = Adopting()
    service = supervisors(driver=first)
    conn = await peer.connection()
    await conn.start({**job(), "results": TOCK})
    await conn.events_until("ready")
    first.reporter.console(b"test before ... ok\n")
    await service.stopService()

    second = Adopting()
    restarted = supervisors(driver=second)
    lines = observe(restarted)
    conn = await peer.connection()
    second.reporter.console(b"test after ... FAILED\ntest result: FAILED.\n")
    events = await conn.events_until("terminated")
    assert events[-1]["reason"] == "workload_exited" and events[-1]["exit_status"] == 1
    assert [(line["type"], line.get("name")) for line in lines] == [
        ("test_case", "after"), ("summary", None)]
    assert lines[-1]["failed"] == 1 and lines[-1]["passed"] == 0
    assert lines[-1]["message"] == "test result: FAILED. (counted since a supervisor restart)"
