"""A job's test results, from console patterns and the agent (``docs/results.md``).

The runner makes one :class:`JobResults` per job. Console output (every
driver's: the runner's console path is shared) from the job's ``booting``
stage on (a board's reset into the job's firmware) is split into lines, each cut
to :data:`~treadmill.protocol.results.MAX_MATCH_LINE` bytes (invalid UTF-8 as
U+FFFD) and matched with the job's console patterns (RE2, linear time); the
agent's ``test_case`` and ``summary`` messages arrive through
:meth:`JobResults.agent`. Each test case
becomes a line of the job's ``results`` stream (``write``); when the console
shows the end of the run, ``end(exit_status, message)`` asks the runner to end
the job ``workload_exited``; when the job ends, :meth:`JobResults.finish`
writes the ``summary`` line. A job with neither patterns nor results from its
agent writes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from treadmill.protocol import results as fmt

__all__ = ["MAX_CASES", "JobResults"]

MAX_CASES = 100_000
"""Test cases recorded per job; later ones are counted as dropped, not written."""
_MAX_BUFFER = 64 * 1024


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace").strip() if value else ""


def _utf8(line: bytes) -> bytes:
    """``line`` with each invalid UTF-8 sequence as U+FFFD: RE2 matches no invalid byte
    with ``.``, ``\\S`` or ``[^ ]``, so line noise would hide a test case or a verdict."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("utf-8", "replace").encode("utf-8")
    return line


class JobResults:
    """One job's results: console patterns and agent messages in, ``results`` lines out."""

    log = Logger()

    def __init__(self, job_id: str, patterns: dict[str, str] | None,
                 write: Callable[[bytes], None], end: Callable[[int, str], None]):
        self.job_id = job_id
        self.patterns = fmt.compile_patterns(patterns) if patterns else {}
        self.write = write
        self.end = end
        self.counts: Counter[str] = Counter()
        self.dropped = 0
        self.verdict: str | None = None  # "pass"/"fail": a console line or the agent said so
        self.verdict_message = ""
        self.ended = False  # the console showed the end of the run
        self.listening = False  # console lines count from the booting stage on
        self.resumed = False  # made by a restarted supervisor: earlier counts are lost
        self.finished = False  # the summary is written
        self._buffer = b""
        self._discarding = False

    @property
    def active(self) -> bool:
        """Whether this job has results: patterns, or something the agent reported."""
        return bool(self.patterns) or bool(self.counts) or self.verdict is not None

    # -- in ----------------------------------------------------------------------------

    def listen(self) -> None:
        """The job reached ``booting`` (or ``ready``): its own output starts. Console
        output before (a flash tool's, a health check's, old firmware's) is not matched."""
        self.listening = True

    def console(self, data: bytes) -> None:
        """Console output: match complete lines (a long line's first bytes only)."""
        if not self.patterns or self.ended or not self.listening:
            return
        buffer = self._buffer + data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                self._buffer = buffer[start:]
                if len(self._buffer) > _MAX_BUFFER:  # a line without end: match its start
                    if not self._discarding:
                        self._line(self._buffer)
                    self._discarding = True
                    self._buffer = b""
                return
            line, start = buffer[start:end], end + 1
            if self._discarding:
                self._discarding = False
                continue
            self._line(line)
            if self.ended:
                self._buffer = b""
                return

    def agent(self, message: dict[str, Any]) -> None:
        """A validated ``test_case`` or ``summary`` message from the job's agent."""
        if self.finished:
            return
        if message["type"] == "summary":
            self.verdict = message["result"]
            self.verdict_message = message.get("message", "")
            return
        fields = {key: message[key] for key in ("duration", "message", "measurements")
                  if key in message}
        self._case(fmt.test_case(message["name"], message["result"], source="agent",
                                 **fields))

    # -- matching ----------------------------------------------------------------------

    def _line(self, raw: bytes) -> None:
        line = _utf8(raw[:fmt.MAX_MATCH_LINE].rstrip(b"\r"))
        patterns = self.patterns
        case = patterns.get("test_case")
        match = case.search(line) if case is not None else None
        if match is not None:
            groups = match.groupdict()
            duration = groups.get("duration")
            self._case(fmt.test_case(
                _text(groups.get("name")), fmt.normalise_outcome(_text(groups.get("result"))),
                duration=fmt.parse_duration(_text(duration)) if duration else None,
                message=_text(groups.get("message")), source="console"))
        stops = "end" not in patterns
        if "fail" in patterns and patterns["fail"].search(line):
            self.verdict = "fail"
            self.verdict_message = _text(line)
            if stops:
                self._end()
                return
        if "pass" in patterns and patterns["pass"].search(line):
            if self.verdict is None:
                self.verdict = "pass"
            if stops:
                self._end()
                return
        if "end" in patterns and patterns["end"].search(line):
            self._end()

    def _case(self, line: dict[str, Any]) -> None:
        if self.finished:
            return
        if sum(self.counts.values()) >= MAX_CASES:
            if not self.dropped:
                self.log.warn("job {job}: more than {count} test cases; dropping the rest",
                              job=self.job_id, count=MAX_CASES)
            self.dropped += 1
            return
        self.counts[line["result"]] += 1
        self.write(fmt.encode(line))

    def _end(self) -> None:
        self.ended = True
        self._buffer = b""
        result = self.result(None)
        message = self.verdict_message if result == "fail" and self.verdict_message else (
            f"results: {self.counts['pass']} passed, {self.counts['fail']} failed")
        self.end(0 if result == "pass" else 1, message)

    # -- out ---------------------------------------------------------------------------

    def result(self, exit_status: int | None) -> str:
        """The run's verdict: ``pass`` or ``fail``."""
        if self.verdict == "fail" or self.counts["fail"] or self.counts["error"]:
            return "fail"
        if self.verdict == "pass":
            return "pass"
        if "pass" in self.patterns:
            return "fail"  # the console never showed the pass line
        if exit_status is not None:
            return "pass" if exit_status == 0 else "fail"
        return "pass"

    def finish(self, reason: str, exit_status: int | None, message: str = "") -> None:
        """The job ended: write the ``summary`` line (once, if the job has results)."""
        if self.finished or not self.active:
            return
        self.finished = True
        result = self.result(exit_status) if reason == "workload_exited" else "error"
        if result == "error":
            message = f"the job ended {reason}" + (f": {message}" if message else "")
        else:  # the verdict's own words (the agent's summary, the fail line) first
            message = self.verdict_message or message
        if self.dropped:
            message = f"{message} ({self.dropped} test cases dropped)".strip()
        if self.resumed:
            message = f"{message} (counted since a supervisor restart)".strip()
        self.write(fmt.encode(fmt.summarise(self.counts, result=result,
                                            exit_status=exit_status, message=message)))
