"""A job's test results: the ``results`` log stream and console patterns (``docs/results.md``).

The supervisor writes a job's results to its log servers as the ``results``
stream, one JSON object per line (compact, sorted keys)::

    {"duration":0.25,"name":"boot","result":"pass","type":"test_case"}
    {"errors":0,"exit_status":0,"failed":0,"passed":1,"result":"pass","skipped":0,"type":"summary"}

``test_case`` lines come from the agent (``docs/agent.md``) or from console
patterns; one ``summary`` line ends the stream. ``tml job results`` reads the
stream back (:func:`parse_line`) and renders it as JUnit XML, TAP or JSON.

Console patterns (:func:`check_patterns`) are RE2 regular expressions
(google-re2: no backtracking, so matching time is linear in the line's
length) applied to each console line of at most :data:`MAX_MATCH_LINE`
bytes. They are checked when a job or image is submitted: at most one per
kind, bounded in size, compiled (RE2 refuses backreferences, lookarounds and
huge repetition counts).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import re2
from jsonschema.exceptions import best_match

from treadmill.common.schema import validator

__all__ = ["MAX_MATCH_LINE", "OUTCOMES", "PATTERNS_SCHEMA", "PATTERN_KEYS", "STREAM",
           "ResultsError", "check_patterns", "compile_patterns", "encode",
           "normalise_outcome", "parse_duration", "parse_line", "summarise", "test_case"]

STREAM = "results"
OUTCOMES = ("pass", "fail", "skip", "error")
MAX_MATCH_LINE = 1024
"""Console lines are cut to this many bytes before patterns are applied."""
MAX_PATTERN = 512
PATTERN_KEYS = ("test_case", "pass", "fail", "end")
MAX_NAME = 256
MAX_MESSAGE = 4096
MAX_MEASUREMENTS = 32

_WORDS = {
    "pass": "pass", "passed": "pass", "ok": "pass", "success": "pass", "succeeded": "pass",
    "fail": "fail", "failed": "fail", "failure": "fail", "not ok": "fail", "fault": "fail",
    "skip": "skip", "skipped": "skip", "ignored": "skip", "ignore": "skip",
    "disabled": "skip", "error": "error", "errored": "error",
}

_PATTERN = {"type": "string", "minLength": 1, "maxLength": MAX_PATTERN}
PATTERNS_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "minProperties": 1,
    "description": "Console patterns (docs/results.md): regular expressions applied to each "
                   "console line; test_case needs the named groups name and result.",
    "properties": {key: _PATTERN for key in PATTERN_KEYS},
}

MEASUREMENT: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["name", "value"],
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 128},
                   "value": {"type": "number"},
                   "unit": {"type": "string", "maxLength": 32}},
}
TEST_CASE_FIELDS: dict[str, Any] = {
    "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
    "result": {"enum": list(OUTCOMES)},
    "duration": {"type": "number", "minimum": 0},
    "message": {"type": "string", "maxLength": MAX_MESSAGE},
    "measurements": {"type": "array", "maxItems": MAX_MEASUREMENTS, "items": MEASUREMENT},
}
_COUNT = {"type": "integer", "minimum": 0}
LINE_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["type"],
    "properties": {"type": {"enum": ["test_case", "summary"]}},
    "allOf": [
        {"if": {"properties": {"type": {"const": "test_case"}}},
         "then": {"required": ["name", "result"],
                  "properties": {"type": True, "source": {"enum": ["agent", "console"]},
                                 **TEST_CASE_FIELDS}}},
        {"if": {"properties": {"type": {"const": "summary"}}},
         "then": {"required": ["result", "passed", "failed", "skipped", "errors"],
                  "properties": {"type": True, "result": {"enum": ["pass", "fail", "error"]},
                                 "passed": _COUNT, "failed": _COUNT, "skipped": _COUNT,
                                 "errors": _COUNT, "exit_status": {"type": "integer"},
                                 "message": {"type": "string", "maxLength": MAX_MESSAGE}}}},
    ],
}


class ResultsError(ValueError):
    """Console patterns or a results line that cannot be used."""


def _first_error(value: Any, schema: dict[str, Any], where: str = "") -> str | None:
    """``where.path: validator check failed`` for the best error, or None."""
    error = best_match(validator(schema).iter_errors(value))
    if error is None:
        return None
    path = ".".join([where, *(str(p) for p in error.absolute_path)]).strip(".")
    return f"{path + ': ' if path else ''}{error.validator} check failed"


def _compile(text: str) -> Any:
    options = re2.Options()
    options.log_errors = False
    return re2.compile(text, options)


def check_patterns(patterns: Any, where: str = "results") -> dict[str, str]:
    """Validate console patterns; raise :class:`ResultsError` naming the problem."""
    problem = _first_error(patterns, PATTERNS_SCHEMA, where)
    if problem is not None:
        raise ResultsError(problem)
    for key, text in patterns.items():
        try:
            compiled = _compile(text)
        except re2.error as e:
            detail = e.args[0].decode("utf-8", "replace") if e.args and isinstance(
                e.args[0], bytes) else str(e)
            raise ResultsError(f"{where}.{key}: not an RE2 regular expression: "
                               f"{detail}") from None
        if key == "test_case":
            groups = compiled.groupindex
            for group in ("name", "result"):
                if group not in groups:
                    raise ResultsError(f"{where}.test_case: needs a named group "
                                       f"(?P<{group}>...)")
            unknown = set(groups) - {"name", "result", "duration", "message"}
            if unknown:
                raise ResultsError(f"{where}.test_case: unknown named group "
                                   f"{sorted(unknown)[0]!r} (name, result, duration, message)")
    return dict(patterns)


def compile_patterns(patterns: dict[str, str]) -> dict[str, Any]:
    """Checked patterns, compiled (RE2: matching time is linear in the line's length)."""
    check_patterns(patterns)
    return {key: _compile(text) for key, text in patterns.items()}


def normalise_outcome(word: str) -> str:
    """``PASSED``, ``ok``, ``not ok``, ``skipped``… as one of :data:`OUTCOMES` (else error)."""
    return _WORDS.get(" ".join(word.lower().split()), "error")


_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|us|µs|s|sec|secs|seconds)?\s*")
_UNITS = {"ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def parse_duration(text: str) -> float | None:
    """``1.5``, ``250ms``, ``12 us``, ``3s`` as seconds; None if it is none of those."""
    match = _DURATION.fullmatch(text)
    if match is None:
        return None
    value = float(match.group(1)) * _UNITS.get(match.group(2) or "s", 1.0)
    return value if math.isfinite(value) else None


def test_case(name: str, result: str, *, duration: float | None = None,
              message: str | None = None, measurements: list[dict[str, Any]] | None = None,
              source: str | None = None) -> dict[str, Any]:
    """A ``test_case`` line's object, fields cut to their bounds."""
    line: dict[str, Any] = {"type": "test_case", "name": name[:MAX_NAME] or "unnamed",
                            "result": result if result in OUTCOMES else "error"}
    if duration is not None:
        line["duration"] = duration
    if message:
        line["message"] = message[:MAX_MESSAGE]
    if measurements:
        line["measurements"] = measurements[:MAX_MEASUREMENTS]
    if source:
        line["source"] = source
    return line


def summarise(cases: dict[str, int], *, result: str, exit_status: int | None = None,
              message: str | None = None) -> dict[str, Any]:
    """The ``summary`` line from counts of outcomes (``{"pass": 3, "fail": 1}``)."""
    line: dict[str, Any] = {"type": "summary", "result": result,
                            "passed": cases.get("pass", 0), "failed": cases.get("fail", 0),
                            "skipped": cases.get("skip", 0), "errors": cases.get("error", 0)}
    if exit_status is not None:
        line["exit_status"] = exit_status
    if message:
        line["message"] = message[:MAX_MESSAGE]
    return line


def encode(line: dict[str, Any]) -> bytes:
    """One line of the ``results`` stream (valid UTF-8: a lone surrogate an agent's JSON
    escaped becomes ``?``)."""
    return json.dumps(line, separators=(",", ":"), sort_keys=True,
                      ensure_ascii=False).encode("utf-8", "replace") + b"\n"


def parse_line(raw: bytes | str) -> dict[str, Any]:
    """Decode and check one line of the ``results`` stream."""
    try:
        line = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ResultsError(f"malformed results line: {e}") from None
    if not isinstance(line, dict):
        raise ResultsError("a results line is a JSON object")
    problem = _first_error(line, LINE_SCHEMA)
    if problem is not None:
        raise ResultsError(f"invalid results line: {problem}")
    return line
