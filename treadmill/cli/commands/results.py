"""``tml job results``: a job's test results, as a table, JSON, JUnit XML or TAP; and
their verdict on a followed job (:func:`verdict`, for ``job run``, ``job wait`` and
``job submit --follow``).

The results are the job's ``results`` stream on its log servers
(``docs/results.md``), read like ``tml job logs`` reads a stream (the same read
token, replicas and retries). Everything in it came from a host, so every
rendering escapes it: XML escaping (and no characters XML forbids) in JUnit,
no line breaks or directives in TAP descriptions, control characters shown
escaped in the table.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any
from xml.etree import ElementTree

from twisted.internet.defer import Deferred, TimeoutError

from treadmill.cli import output
from treadmill.cli.client import ApiError, Unreachable
from treadmill.cli.commands.follow import Followed, ran_on_a_host
from treadmill.cli.commands.logs import read_stream
from treadmill.cli.context import (
    EXIT_ERROR,
    EXIT_JOB_FAILED,
    EXIT_OK,
    CommandError,
    Context,
    UsageError,
    add_command,
    add_job_id,
)
from treadmill.protocol.results import (
    PATTERN_KEYS,
    STREAM,
    ResultsError,
    check_patterns,
    parse_line,
)

__all__ = ["EXIT_FAILED", "RESULTS_WAIT", "add_patterns_option", "junit", "load",
           "patterns_from", "register", "tap", "verdict"]

EXIT_FAILED = EXIT_JOB_FAILED
"""The summary says the run failed (or ended in error)."""

RESULTS_WAIT = 10.0
"""Seconds :func:`verdict` waits for an ended job's results stream to get its summary
(the supervisor ships it in the background, beside the console)."""

# Characters XML 1.0 does not allow, even escaped.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class _Collect:
    """A stream writer for :func:`read_stream` that keeps the bytes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.count = 0

    def __call__(self, data: bytes) -> None:
        self.data += data
        self.count += len(data)


def _valid_text(value: Any) -> Any:
    """``value`` with lone surrogates (which ``\\ud800`` escapes make) replaced."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {key: _valid_text(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_valid_text(item) for item in value]
    return value


def load(data: bytes) -> dict[str, Any]:
    """The stream's lines as ``{test_cases, summary, invalid_lines}``; a last line
    without its newline (still being written) is left out."""
    cases: list[dict[str, Any]] = []
    summary: dict[str, Any] | None = None
    invalid = 0
    for raw in data.split(b"\n")[:-1]:
        if not raw.strip():
            continue
        try:
            line = parse_line(raw)
        except ResultsError:
            invalid += 1
            continue
        line = _valid_text(line)
        kind = line.pop("type")
        if kind == "test_case":
            cases.append(line)
        else:
            summary = line
    return {"test_cases": cases, "summary": summary, "invalid_lines": invalid}


async def _ended_results(ctx: Context, job_id: str) -> bytes:
    """An ended job's ``results`` stream: as stored now, or, if it has lines but no
    summary yet, followed until it closes or ``RESULTS_WAIT`` seconds passed."""
    collected = _Collect()
    if await read_stream(ctx, job_id, STREAM, False, collected, quiet_missing=True) != EXIT_OK:
        raise CommandError("its results stream could not be read")
    if not collected.count or load(bytes(collected.data))["summary"] is not None:
        return bytes(collected.data)
    followed = _Collect()
    reading = Deferred.fromCoroutine(read_stream(ctx, job_id, STREAM, True, followed))
    reading.addTimeout(RESULTS_WAIT, ctx.reactor)
    try:
        await reading
    except TimeoutError:
        pass
    return bytes(max(followed.data, collected.data, key=len))


async def verdict(ctx: Context, followed: Followed) -> tuple[int, bytes | None]:
    """The exit status of a followed job, its test results considered: a workload that
    exited 0 (status 0) whose results summary says ``fail`` makes it 4, and says so.
    Also the last job's ``results`` stream as read (None if it was not read: the job
    failed anyway, never ran, or has no log servers), for ``--artifacts``."""
    status, final = followed.status, followed.final
    if status != EXIT_OK or not final.get("logs") or not ran_on_a_host(final):
        return status, None
    job_id = str(final["id"])
    try:
        data = await _ended_results(ctx, job_id)
    except (CommandError, ApiError, Unreachable) as e:
        ctx.note(output.clean(f"tml: the test results of job {job_id} are unavailable "
                              f"({e}); the exit status is the workload's"))
        return status, None
    summary = load(data)["summary"]
    if summary is None or summary["result"] == "pass":
        return status, data
    failed = int(summary.get("failed") or 0) + int(summary.get("errors") or 0)
    if failed:
        ctx.note(f"tml: the workload exited 0 but {failed} test "
                 f"case{'s' if failed != 1 else ''} failed")
    else:
        ctx.note(output.clean("tml: the workload exited 0 but its test results say "
                              f"{summary['result']}"
                              + (f": {summary['message']}" if summary.get("message") else "")))
    return EXIT_JOB_FAILED, data


def _xml_text(value: Any) -> str:
    return _NOT_XML.sub("\ufffd", str(value))


def _seconds(value: Any) -> str:
    return f"{float(value or 0):.6f}".rstrip("0").rstrip(".") or "0"


def junit(job_id: str, results: dict[str, Any]) -> str:
    """JUnit XML: one ``<testsuite>`` of the job's test cases in a ``<testsuites>``."""
    cases = results["test_cases"]
    counts = {outcome: sum(1 for c in cases if c["result"] == outcome)
              for outcome in ("pass", "fail", "skip", "error")}
    summary = results["summary"]
    errors = counts["error"] + (1 if summary and summary["result"] == "error" else 0)
    total_time = _seconds(sum(float(c.get("duration") or 0) for c in cases))
    attrs = {"name": _xml_text(f"treadmill job {job_id}"), "tests": str(len(cases)),
             "failures": str(counts["fail"]), "errors": str(errors),
             "skipped": str(counts["skip"]), "time": total_time}
    root = ElementTree.Element("testsuites", attrs)
    suite = ElementTree.SubElement(root, "testsuite", attrs)
    for case in cases:
        element = ElementTree.SubElement(suite, "testcase", {
            "name": _xml_text(case["name"]), "classname": _xml_text(f"job.{job_id}"),
            "time": _seconds(case.get("duration"))})
        message = _xml_text(case.get("message", ""))
        if case.get("measurements"):
            properties = ElementTree.SubElement(element, "properties")
            for m in case["measurements"]:
                ElementTree.SubElement(properties, "property", {
                    "name": _xml_text(m["name"]),
                    "value": _xml_text(f"{m['value']}{' ' + m['unit'] if m.get('unit') else ''}")})
        tag = {"fail": "failure", "error": "error", "skip": "skipped"}.get(case["result"])
        if tag is not None:
            child = ElementTree.SubElement(element, tag, {"message": message} if message else {})
            if message and tag != "skipped":
                child.text = message
    if summary is not None and (summary.get("message") or summary["result"] == "error"):
        err = ElementTree.SubElement(suite, "system-err" if summary["result"] != "pass"
                                     else "system-out")
        err.text = _xml_text(f"summary: {summary['result']}: {summary.get('message', '')}")
    ElementTree.indent(root)
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            + ElementTree.tostring(root, encoding="unicode") + "\n")


def _tap_text(value: Any) -> str:
    """A TAP description or directive text: one line, no directive marker."""
    text = " ".join(str(value).split())
    return output.clean(text).replace("\\", "\\\\").replace("#", "\\#")


def _no_summary(results: dict[str, Any], ended: bool) -> str:
    """What a stream without a summary says: the job has not ended, or it ended without
    results (or its summary is not there: its stream could not be completed)."""
    if not ended:
        return "no summary yet (the job has not ended)"
    return "no summary (the job has ended)" if results["test_cases"] else (
        "no results (the job has ended)")


def tap(job_id: str, results: dict[str, Any], ended: bool = False) -> str:
    """TAP version 13: one test point per test case, details in YAML blocks."""
    cases = results["test_cases"]
    lines = ["TAP version 13", f"1..{len(cases)}"]
    for number, case in enumerate(cases, 1):
        ok = "not ok" if case["result"] in ("fail", "error") else "ok"
        point = f"{ok} {number} - {_tap_text(case['name'])}"
        if case["result"] == "skip":
            point += " # SKIP" + (f" {_tap_text(case['message'])}" if case.get("message")
                                  else "")
        lines.append(point)
        details = {key: case[key] for key in ("message", "duration", "measurements")
                   if key in case and not (key == "message" and case["result"] == "skip")}
        if case["result"] == "error":
            details["severity"] = "error"
        if details:
            # JSON scalars are YAML flow scalars: one line each, quotes escaped.
            lines.append("  ---")
            lines.extend(f"  {key}: {json.dumps(value, ensure_ascii=True)}"
                         for key, value in details.items())
            lines.append("  ...")
    summary = results["summary"]
    if summary is None:
        lines.append(f"# job {_tap_text(job_id)}: {_no_summary(results, ended)}")
    else:
        lines.append(f"# job {_tap_text(job_id)}: {summary['result']}: "
                     f"{summary['passed']} passed, {summary['failed']} failed, "
                     f"{summary['skipped']} skipped, {summary['errors']} errors"
                     + (f": {_tap_text(summary['message'])}" if summary.get("message") else ""))
    return "\n".join(lines) + "\n"


def _table(results: dict[str, Any], ended: bool) -> str:
    rows = [(c["result"].upper(), c["name"],
             f"{float(c['duration']):.3f} s" if "duration" in c else "-",
             c.get("message", "")) for c in results["test_cases"]]
    text = output.render_table(("RESULT", "NAME", "DURATION", "MESSAGE"), rows) if rows else ""
    summary = results["summary"]
    if summary is None:
        text += _no_summary(results, ended) + "\n"
    else:
        text += output.clean(
            f"{summary['result'].upper()}: {summary['passed']} passed, {summary['failed']} "
            f"failed, {summary['skipped']} skipped, {summary['errors']} errors"
            + (f" (exit status {summary['exit_status']})" if "exit_status" in summary else "")
            + (f": {summary['message']}" if summary.get("message") else "")) + "\n"
    return text


async def job_results(ctx: Context) -> int:
    """Print a job's results; exit 0 if they passed, 4 if not, 1 if there is no summary."""
    a = ctx.args
    collected = _Collect()
    status = await read_stream(ctx, a.id, STREAM, False, collected, quiet_missing=True)
    if status != EXIT_OK:
        return status
    results = load(bytes(collected.data))
    ended = results["summary"] is None and await _has_ended(ctx, a.id)
    if not collected.count:
        ctx.note(f"tml: job {a.id} has no results (it has ended)" if ended
                 else f"tml: job {a.id} has no results stream yet")
    if results["invalid_lines"]:
        ctx.note(f"tml: {results['invalid_lines']} lines of the results stream were not "
                 "valid results lines; left out")
    if ctx.json:
        output.print_json(ctx.stdout, {"job": a.id, **results})
    elif a.format == "junit":
        ctx.write(junit(a.id, results))
    elif a.format == "tap":
        ctx.write(tap(a.id, results, ended))
    else:
        ctx.write(_table(results, ended))
    summary = results["summary"]
    if summary is None:
        return EXIT_ERROR
    return EXIT_OK if summary["result"] == "pass" else EXIT_FAILED


async def _has_ended(ctx: Context, job_id: str) -> bool:
    """Whether the job has ended (False if the switchboard cannot say)."""
    try:
        job = await ctx.api.get("jobs", job_id)
    except (ApiError, Unreachable):
        return False
    return job.get("state") == "terminated"


def _pattern(text: str) -> tuple[str, str]:
    """An argparse type: ``KEY=REGEX`` with KEY one of the pattern keys."""
    key, sep, regex = text.partition("=")
    if not sep or key not in PATTERN_KEYS:
        raise argparse.ArgumentTypeError(
            f"expected KEY=REGEX with KEY one of {', '.join(PATTERN_KEYS)}, got {text!r}")
    return key, regex


def add_patterns_option(p: argparse.ArgumentParser, what: str) -> None:
    """``--results-pattern KEY=REGEX`` (repeatable): console patterns (docs/results.md)."""
    p.add_argument("--results-pattern", dest="results_patterns", action="append",
                   type=_pattern, metavar="KEY=REGEX",
                   help=f"a console pattern of {what} (KEY: {', '.join(PATTERN_KEYS)}; "
                   "repeat; docs/results.md)")


def patterns_from(args: argparse.Namespace) -> dict[str, str] | None:
    """The console patterns of ``--results-pattern`` options, checked; None without any."""
    given = getattr(args, "results_patterns", None)
    if not given:
        return None
    patterns = dict(given)
    if len(patterns) != len(given):
        raise UsageError("--results-pattern: each KEY at most once")
    try:
        return check_patterns(patterns, "--results-pattern")
    except ResultsError as e:
        raise UsageError(str(e)) from None


def register(job: Any, common: argparse.ArgumentParser) -> None:
    """Add ``job results`` to the ``job`` group."""
    p = add_command(job, "results", job_results, common,
                    help="print a job's test results (exit 0: passed, 4: failed, 1: no summary)")
    add_job_id(p)
    form = p.add_mutually_exclusive_group()
    form.add_argument("--junit", dest="format", action="store_const", const="junit",
                      help="as JUnit XML")
    form.add_argument("--tap", dest="format", action="store_const", const="tap",
                      help="as TAP version 13")
    p.set_defaults(format="table")
