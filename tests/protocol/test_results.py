"""The results line format and console patterns (treadmill/protocol/results.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from treadmill.protocol import agent
from treadmill.protocol import results as fmt
from treadmill.protocol.supervisor import schema as supervisor_schema

CASE = r"^test (?P<name>\S+) \.\.\. (?P<result>\w+)(?: \((?P<duration>[0-9.]+ ?m?s)\))?"


def test_good_patterns_are_returned() -> None:
    patterns = {"test_case": CASE, "pass": "^ALL PASS$", "fail": "FAILED", "end": "^done$"}
    assert fmt.check_patterns(patterns) == patterns
    assert set(fmt.compile_patterns(patterns)) == set(patterns)


@pytest.mark.parametrize(("patterns", "problem"), [
    ({}, "results: minProperties"),
    ([], "results: type"),
    ({"test_cases": "x"}, "results: additionalProperties"),
    ({"end": ""}, "results.end: minLength"),
    ({"end": 5}, "results.end: type"),
    ({"end": "a" * 513}, "results.end: maxLength"),
    ({"end": "("}, "results.end: not an RE2 regular expression"),
    ({"end": r"(\w)\1"}, "results.end: not an RE2 regular expression"),
    ({"end": "(?=lookahead)"}, "results.end: not an RE2 regular expression"),
    ({"end": "(a{1000}){1000}"}, "results.end: not an RE2 regular expression"),
    ({"test_case": "(?P<name>x)"}, "results.test_case: needs a named group (?P<result>"),
    ({"test_case": "(?P<result>x)"}, "results.test_case: needs a named group (?P<name>"),
    ({"test_case": "(?P<name>x)(?P<result>y)(?P<who>z)"}, "unknown named group 'who'"),
])
def test_bad_patterns_are_refused(patterns: Any, problem: str) -> None:
    with pytest.raises(fmt.ResultsError) as e:
        fmt.check_patterns(patterns)
    assert problem in str(e.value)


def test_patterns_that_backtrack_in_python_match_in_linear_time() -> None:
    # Python's re takes minutes on this line; RE2 does not backtrack.
    compiled = fmt.compile_patterns({"end": r"\s*\s*\s*\s*x", "fail": "(a+)+$"})
    assert compiled["end"].search(b" " * fmt.MAX_MATCH_LINE) is None
    assert compiled["fail"].search(b"a" * fmt.MAX_MATCH_LINE + b"!") is None


@pytest.mark.parametrize(("word", "outcome"), [
    ("ok", "pass"), ("PASSED", "pass"), ("Pass", "pass"), ("not  ok", "fail"),
    ("FAILED", "fail"), ("skipped", "skip"), ("IGNORED", "skip"), ("error", "error"),
    ("weird", "error"), ("", "error"),
])
def test_outcome_words(word: str, outcome: str) -> None:
    assert fmt.normalise_outcome(word) == outcome


@pytest.mark.parametrize(("text", "seconds"), [
    ("1.5", 1.5), ("250ms", 0.25), ("12 us", 12e-6), ("3s", 3.0), (".5", 0.5),
    ("abc", None), ("1e999", None), ("-1", None), ("", None),
])
def test_durations(text: str, seconds: float | None) -> None:
    assert fmt.parse_duration(text) == seconds


def test_lines_round_trip_and_are_checked() -> None:
    case = fmt.test_case("boot", "pass", duration=0.5, message="fine",
                         measurements=[{"name": "t", "value": 1.5, "unit": "s"}], source="agent")
    summary = fmt.summarise({"pass": 2, "fail": 1}, result="fail", exit_status=1)
    for line in (case, summary):
        raw = fmt.encode(line)
        assert raw.endswith(b"\n") and raw.count(b"\n") == 1
        assert fmt.parse_line(raw) == line
    assert summary == {"type": "summary", "result": "fail", "passed": 2, "failed": 1,
                       "skipped": 0, "errors": 0, "exit_status": 1}
    assert fmt.test_case("x" * 999, "bogus")["name"] == "x" * fmt.MAX_NAME
    assert fmt.test_case("", "bogus")["result"] == "error"


@pytest.mark.parametrize("raw", [
    b"nope", b"[]", b'{"type":"other"}', b'{"type":"test_case","name":"x"}',
    b'{"type":"test_case","name":"x","result":"maybe"}',
    b'{"type":"summary","result":"pass"}',
])
def test_bad_lines_are_refused(raw: bytes) -> None:
    with pytest.raises(fmt.ResultsError):
        fmt.parse_line(raw)


def test_newline_in_a_name_stays_inside_one_line() -> None:
    raw = fmt.encode(fmt.test_case("a\nb</testcase>", "pass"))
    assert raw.count(b"\n") == 1
    assert fmt.parse_line(raw)["name"] == "a\nb</testcase>"


def test_the_protocol_schema_carries_the_same_patterns() -> None:
    start = supervisor_schema()["$defs"]["JobStart"]["properties"]["results"]
    mine = {key: value for key, value in fmt.PATTERNS_SCHEMA.items() if key != "description"}
    theirs = {key: value for key, value in start.items() if key != "description"}
    assert mine == theirs


class Recording(agent.AgentHandler):
    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.invalid: list[str] = []

    def agent_result(self, message: dict[str, Any]) -> None:
        self.results.append(message)

    def agent_invalid(self, problem: str) -> None:
        self.invalid.append(problem)


def test_agent_test_case_and_summary_messages() -> None:
    handler = Recording()
    sent: list[bytes] = []
    console = agent.ConsoleAgentFilter(handler, lambda _: None, sent.append)
    case = {"type": "test_case", "name": "t1", "result": "fail", "duration": 0.1,
            "message": "expected 1", "measurements": [{"name": "ms", "value": 3}]}
    console.feed(b"@@treadmill " + json.dumps(case).encode() + b"\r\n")
    console.feed(b'@@treadmill {"type":"summary","result":"fail"}\n')
    assert handler.results == [case, {"type": "summary", "result": "fail"}]
    for bad in (b'{"type":"test_case","name":"t"}', b'{"type":"test_case","name":"t",'
                b'"result":"pass","extra":1}', b'{"type":"summary","result":"error"}',
                b'{"type":"test_case","name":"t","result":"pass","duration":-1}'):
        console.feed(b"@@treadmill " + bad + b"\n")
    assert len(handler.invalid) == 4 and len(sent) == 4
    assert len(handler.results) == 2
