"""Test results end to end: real switchboard, log server and (mock) supervisor; the results
stream on the log server; tml job results as JUnit XML, TAP 13 and JSON."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.support import (
    RunningSwitchboard,
    closed_stream,
    mock_supervisor,
    switchboard_with_logs,
)
from tests.util.waiting import eventually
from treadmill.cli.main import run as tml

DIGEST = "sha256:" + "5" * 64
TOCK = {"test_case": r"^test (?P<name>\S+) \.\.\. (?P<result>ok|FAILED|ignored)"
                     r"(?: \((?P<duration>[0-9.]+ ?m?s)\))?",
        "pass": r"^test result: ok\.", "fail": r"^test result: FAILED\.",
        "end": r"^test result: "}
# A name built to break out of JUnit XML and TAP if it were not escaped.
EVIL = 'x"/><testcase name="forged"/></testsuite>&amp;<!--\x1b[31m # SKIP'


@dataclass
class Bed:
    switchboard: RunningSwitchboard
    log_url: str

    async def tml(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        sb = self.switchboard
        code = await tml(reactor, ["--url", sb.url, "--token", sb.admin_token, *args],
                         out, err, {})
        return code, out.getvalue(), err.getvalue()

    async def run(self, body: dict[str, Any]) -> dict[str, Any]:
        r = await self.switchboard.admin.post("/api/v1/jobs", {"tags": ["mock"], **body})
        assert r.status == 201, r.body
        job_id = r.body["id"]

        async def ended() -> dict[str, Any] | None:
            job = (await self.switchboard.admin.get(f"/api/v1/jobs/{job_id}")).body
            return job if job["state"] == "terminated" else None

        return await eventually(ended, timeout=20)

    async def stream(self, job_id: str) -> bytes:
        return await closed_stream(self.switchboard.admin, self.log_url, job_id, "results")


@pytest_twisted.async_yield_fixture
async def bed(migrated_database: str, tmp_path: Path) -> AsyncIterator[Bed]:
    async with switchboard_with_logs(migrated_database, tmp_path,
                                     scheduler_interval=0.2) as (sb, logs):
        r = await sb.admin.post("/api/v1/hosts", {"name": "mock-1", "tags": ["mock"]})
        supervisor = mock_supervisor(sb.url, r.body["token"], tmp_path / "sup",
                                     run_time=0.5, echo=False)
        try:
            await supervisor.connected()
            yield Bed(sb, logs.url)
        finally:
            await supervisor.stopService()


def lines(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw.decode().splitlines()]


def check_tap13(text: str) -> list[tuple[bool, int, str, str]]:
    """Check TAP version 13 structure; return the test points (ok, number, description,
    directive)."""
    rows = text.splitlines()
    assert rows[0] == "TAP version 13"
    plan = re.fullmatch(r"1\.\.(\d+)", rows[1])
    assert plan, rows[1]
    points = []
    in_yaml = False
    for row in rows[2:]:
        if in_yaml:
            if row == "  ...":
                in_yaml = False
            else:
                assert row.startswith("  ") and ": " in row, row
                json.loads(row.split(": ", 1)[1])  # a one-line (JSON) flow scalar
            continue
        if row == "  ---":
            in_yaml = True
            continue
        if row.startswith("#"):
            continue
        match = re.fullmatch(r"(ok|not ok) (\d+) - ((?:[^#\\]|\\.)*?)(?: # (SKIP.*))?", row)
        assert match, row
        points.append((match[1] == "ok", int(match[2]), match[3], match[4] or ""))
    assert not in_yaml
    assert [p[1] for p in points] == list(range(1, int(plan[1]) + 1))
    return points


@pytest_twisted.ensureDeferred
async def test_console_patterns_end_a_job_and_render(bed: Bed) -> None:
    console = ("booting\r\ntest kernel::alarm ... ok (12ms)\r\n"
               "test kernel::aes ... FAILED\r\ntest kernel::rng ... ignored\r\n"
               f"test {EVIL.replace(' ', '_')} ... ok\r\n"
               "test result: FAILED. 2 passed; 1 failed; 1 ignored\r\n"
               "test late::case ... ok\r\n")
    started = time.monotonic()
    job = await bed.run({"image": DIGEST, "results": TOCK, "timeout": 600, "parameters": {
        "mock.run_time": {"value": "inf"}, "mock.console": {"value": console}}})
    assert time.monotonic() - started < 15  # ended by the pattern, not by its timeout
    assert job["termination"] == {"reason": "workload_exited", "exit_status": 1,
                                  "message": "test result: FAILED. 2 passed; 1 failed; "
                                             "1 ignored"}
    assert job["results"] == {"patterns": TOCK, "stream": "results", "servers": [bed.log_url]}
    stream = lines(await bed.stream(job["id"]))
    assert [(s["type"], s.get("name"), s["result"]) for s in stream] == [
        ("test_case", "kernel::alarm", "pass"), ("test_case", "kernel::aes", "fail"),
        ("test_case", "kernel::rng", "skip"), ("test_case", EVIL.replace(" ", "_"), "pass"),
        ("summary", None, "fail")]
    assert stream[0]["duration"] == 0.012
    assert stream[-1] == {"type": "summary", "result": "fail", "passed": 2, "failed": 1,
                          "skipped": 1, "errors": 0, "exit_status": 1,
                          "message": "test result: FAILED. 2 passed; 1 failed; 1 ignored"}

    code, out, err = await bed.tml("job", "results", job["id"], "--junit")
    assert code == 4, err
    root = ElementTree.fromstring(out.encode())  # well-formed
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"),
            suite.get("skipped")) == ("4", "1", "0", "1")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["kernel::alarm", "kernel::aes", "kernel::rng",
                                              EVIL.replace(" ", "_").replace("\x1b", "\ufffd")]
    assert cases[0].get("time") == "0.012"
    assert cases[1].find("failure") is not None and cases[2].find("skipped") is not None
    assert "forged" not in [c.get("name") for c in root.iter("testcase")]
    assert len(list(root.iter("testcase"))) == 4

    code, out, err = await bed.tml("job", "results", job["id"], "--tap")
    assert code == 4, err
    points = check_tap13(out)
    assert [(ok, directive.split(" ")[0]) for ok, _, _, directive in points] == [
        (True, ""), (False, ""), (True, "SKIP"), (True, "")]
    assert "\x1b" not in out and "forged" in points[3][2]

    code, out, err = await bed.tml("--json", "job", "results", job["id"])
    assert code == 4, err
    body = json.loads(out)
    assert body["summary"]["result"] == "fail" and len(body["test_cases"]) == 4
    assert body["test_cases"][3]["name"] == EVIL.replace(" ", "_")

    code, out, err = await bed.tml("job", "results", job["id"])
    assert code == 4 and "FAIL: 2 passed, 1 failed, 1 skipped" in out, (out, err)


@pytest_twisted.ensureDeferred
async def test_image_patterns_and_a_passing_run(bed: Bed) -> None:
    admin = bed.switchboard.admin
    await bed.switchboard.register_store("http://store.example", "store")
    r = await admin.post("/api/v1/images", {"name": "uboot-board", "digest": DIGEST,
                                            "stores": ["http://store.example"],
                                            "results": {"pass": "^Failures: 0$",
                                                        "fail": "^Failures: [1-9]"}})
    assert r.status == 201, r.body
    job = await bed.run({"image": "uboot-board", "parameters": {
        "mock.fetch": {"value": "never"}, "mock.run_time": {"value": "inf"},
        "mock.console": {"value": "=> ut dm\nRunning 2 tests\nFailures: 0\n"}}})
    assert job["termination"]["reason"] == "workload_exited"
    assert job["termination"]["exit_status"] == 0
    assert lines(await bed.stream(job["id"])) == [
        {"type": "summary", "result": "pass", "passed": 0, "failed": 0, "skipped": 0,
         "errors": 0, "exit_status": 0, "message": "results: 0 passed, 0 failed"}]
    code, out, err = await bed.tml("job", "results", job["id"], "--tap")
    assert code == 0, err
    assert check_tap13(out) == [] and "1..0" in out


@pytest_twisted.ensureDeferred
async def test_agent_results_end_to_end(bed: Bed) -> None:
    said = "\n".join(json.dumps(m) for m in (
        {"type": "test_case", "name": "boot", "result": "pass", "duration": 1.25,
         "measurements": [{"name": "boot_time", "value": 1.25, "unit": "s"}]},
        {"type": "test_case", "name": "line\nnot ok 7 - forged\n# SKIP", "result": "fail",
         "message": "</failure><injected/>\n  ...\nok 8 - forged"},
        {"type": "test_case", "name": "disk", "result": "error", "message": "no disk"},
        {"type": "summary", "result": "fail", "message": "2 of 3 failed"},
        {"type": "exit", "status": 2, "message": "tests failed"}))
    job = await bed.run({"image": DIGEST, "parameters": {
        "mock.run_time": {"value": "inf"}, "mock.agent": {"value": said}}})
    assert job["termination"] == {"reason": "workload_exited", "exit_status": 2,
                                  "message": "tests failed"}
    assert job["results"]["patterns"] is None
    stream = lines(await bed.stream(job["id"]))
    assert [s["type"] for s in stream] == ["test_case"] * 3 + ["summary"]
    assert stream[-1] == {"type": "summary", "result": "fail", "passed": 1, "failed": 1,
                          "skipped": 0, "errors": 1, "exit_status": 2,
                          "message": "2 of 3 failed"}

    code, out, err = await bed.tml("job", "results", job["id"], "--junit")
    assert code == 4, err
    root = ElementTree.fromstring(out.encode())
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    assert not list(root.iter("injected"))
    failure = suite.findall("testcase")[1].find("failure")
    assert failure is not None and failure.text == "</failure><injected/>\n  ...\nok 8 - forged"
    prop = suite.findall("testcase")[0].find("properties/property")
    assert prop is not None and prop.attrib == {"name": "boot_time", "value": "1.25 s"}

    code, out, err = await bed.tml("job", "results", job["id"], "--tap")
    assert code == 4, err
    points = check_tap13(out)  # the forged lines stayed inside their test point
    assert [(ok, n) for ok, n, _, _ in points] == [(True, 1), (False, 2), (False, 3)]
    assert all(directive == "" for *_, directive in points)


@pytest_twisted.ensureDeferred
async def test_a_job_without_results_has_no_stream(bed: Bed) -> None:
    job = await bed.run({"image": DIGEST})
    assert job["termination"]["reason"] == "workload_exited"
    code, out, err = await bed.tml("job", "results", job["id"], "--junit")
    assert code == 1 and 'tests="0"' in out, (out, err)
    # Once ended, it says so (not "yet"), in every form.
    assert "has no results (it has ended)" in err and "yet" not in err, err
    code, out, err = await bed.tml("job", "results", job["id"])
    assert code == 1 and out == "no results (the job has ended)\n", (out, err)
    code, out, err = await bed.tml("job", "results", job["id"], "--tap")
    assert code == 1 and out.endswith(": no results (the job has ended)\n"), (out, err)


@pytest_twisted.ensureDeferred
async def test_a_running_job_has_no_results_stream_yet(bed: Bed) -> None:
    r = await bed.switchboard.admin.post("/api/v1/jobs", {
        "tags": ["mock"], "image": DIGEST, "parameters": {"mock.run_time": {"value": "inf"}}})
    job_id = r.body["id"]

    async def ready() -> bool:
        job = (await bed.switchboard.admin.get(f"/api/v1/jobs/{job_id}")).body
        return job["state"] == "ready"

    await eventually(ready, timeout=20)
    code, out, err = await bed.tml("job", "results", job_id)
    assert code == 1 and "has no results stream yet" in err, (out, err)
    assert out == "no summary yet (the job has not ended)\n", out
    await bed.switchboard.admin.post(f"/api/v1/jobs/{job_id}/terminate", {})


# Failed test cases in a workload that exits 0: through the agent, and console test cases
# without a pass, fail or end pattern (the job runs to its end, which is exit status 0).
FAILED_CASES = {
    "agent": ["--param", "mock.agent=" + "\n".join(json.dumps(m) for m in (
        {"type": "test_case", "name": "boot", "result": "pass"},
        {"type": "test_case", "name": "disk", "result": "fail", "message": "no disk"},
        {"type": "test_case", "name": "net", "result": "error"}))],
    "console": ["--results-pattern",
                r"test_case=^check (?P<name>\S+): (?P<result>\S+)$",
                "--param", "mock.console=check boot: ok\ncheck disk: FAILED\n"
                "check net: ???\n"],
}


@pytest.mark.parametrize("source", list(FAILED_CASES))
@pytest_twisted.ensureDeferred
async def test_failed_test_cases_of_a_workload_that_exited_0_fail_the_run(
        bed: Bed, tmp_path: Path, source: str) -> None:
    """``job run``, ``job wait`` and ``job submit --follow`` exit 4, say why, and
    ``summary.json`` says 4, while the job's own exit status stays 0."""
    out_dir = tmp_path / "out"
    args = ["--tag", "mock", "--param", "mock.run_time=0.5", *FAILED_CASES[source]]
    code, out, err = await bed.tml("job", "run", DIGEST, *args, "--artifacts", str(out_dir))
    assert code == 4, (out, err)
    assert "tml: the workload exited 0 but 2 test cases failed\n" in err, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert (summary["exit_status"], summary["tml_exit_status"]) == (0, 4), summary
    results = lines((out_dir / "results").read_bytes())
    assert results[-1]["type"] == "summary" and results[-1]["result"] == "fail", results
    assert summary["artifacts"]["results"] == "results"

    code, out, err = await bed.tml("job", "wait", summary["job"])
    assert code == 4 and "2 test cases failed" in err, (out, err)
    code, out, err = await bed.tml("job", "submit", DIGEST, *args, "--follow")
    assert code == 4 and "2 test cases failed" in err, (out, err)
    code, out, err = await bed.tml("job", "results", summary["job"])
    assert code == 4, (out, err)


@pytest_twisted.ensureDeferred
async def test_passing_test_cases_and_no_results_leave_the_run_green(
        bed: Bed, tmp_path: Path) -> None:
    for extra in (["--results-pattern", r"test_case=^check (?P<name>\S+): (?P<result>\S+)$",
                   "--param", "mock.console=check boot: ok\n"], []):
        out_dir = tmp_path / str(len(extra))
        code, out, err = await bed.tml("job", "run", DIGEST, "--tag", "mock", "--param",
                                       "mock.run_time=0.3", *extra, "--artifacts",
                                       str(out_dir))
        assert code == 0 and "test cases failed" not in err, (extra, out, err)
        summary = json.loads((out_dir / "summary.json").read_text())
        assert summary["tml_exit_status"] == 0
        assert summary["artifacts"]["results"] == ("results" if extra else None), summary


@pytest_twisted.ensureDeferred
async def test_a_failed_summary_without_failed_test_cases_fails_the_run(bed: Bed) -> None:
    said = json.dumps({"type": "summary", "result": "fail", "message": "coverage \x1b[31mlow"})
    code, out, err = await bed.tml("job", "run", DIGEST, "--tag", "mock", "--param",
                                   "mock.run_time=0.5", "--param", f"mock.agent={said}")
    assert code == 4, (out, err)
    assert ("tml: the workload exited 0 but its test results say fail: coverage "
            "\\x1b[31mlow\n") in err, err
