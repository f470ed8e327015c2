"""Log observers for ``twistd --logger``.

``twistd --logger treadmill.common.logging.text`` writes one line per event to
standard output, prefixed with the sd-daemon priority (``<6>``) so that
journald records the level and adds the timestamp itself.
``twistd --logger treadmill.common.logging.json`` writes one JSON object per
line, for log shippers.

Both drop events below ``TREADMILL_LOG_LEVEL`` (``debug``, ``info``, ``warn``,
``error``, ``critical``; default ``info``).
"""

from __future__ import annotations

import json as _json
import os
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
)
from twisted.python.failure import Failure
from zope.interface import provider

__all__ = ["LEVEL_ENV", "build_json", "build_text", "json", "level_from_env", "rfc3339", "text"]

LEVEL_ENV = "TREADMILL_LOG_LEVEL"

# sd-daemon(3) priorities.
_PRIORITY: dict[LogLevel, int] = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}

_LEVEL_NAMES: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


def level_from_env(environ: Mapping[str, str] | None = None) -> LogLevel:
    """The minimum level named by ``TREADMILL_LOG_LEVEL`` (default info)."""
    env = os.environ if environ is None else environ
    name = env.get(LEVEL_ENV, "").strip().lower() or "info"
    try:
        return _LEVEL_NAMES[name]
    except KeyError:
        raise ValueError(
            f"{LEVEL_ENV}={name!r}: expected one of debug, info, warn, error, critical"
        ) from None


def _level_predicate(minimum: LogLevel) -> Callable[[LogEvent], Any]:
    """Filter on level; events without a level or namespace count as info."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=minimum)

    def check(event: LogEvent) -> Any:
        if event.get("log_level") is not None and event.get("log_namespace"):
            return predicate(event)
        return PredicateResult.maybe if LogLevel.info >= minimum else PredicateResult.no

    return check


def _filtered(observer: ILogObserver, minimum: LogLevel) -> ILogObserver:
    return FilteringLogObserver(observer, [_level_predicate(minimum)])


def _message(event: LogEvent) -> str:
    message = formatEvent(event)
    failure = event.get("log_failure")
    if not message and isinstance(failure, Failure):
        message = failure.getErrorMessage()
    return message


def _traceback(event: LogEvent) -> str | None:
    failure = event.get("log_failure")
    if not isinstance(failure, Failure):
        return None
    try:
        return failure.getTraceback().rstrip("\n")
    except Exception:
        return f"(cannot format failure: {failure!r})"


def _text_observer(stream: TextIO) -> ILogObserver:
    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        level = event.get("log_level") or LogLevel.info
        prefix = f"<{_PRIORITY.get(level, 6)}>"
        namespace = event.get("log_namespace") or "-"
        lines = _message(event).splitlines() or [""]
        tb = _traceback(event)
        if tb:
            lines.extend("    " + line for line in tb.splitlines())
        # journald reads the priority per line: repeat it on continuation lines.
        out = [f"{prefix}[{namespace}] {lines[0]}"]
        out.extend(f"{prefix}{line}" for line in lines[1:])
        stream.write("\n".join(out) + "\n")
        stream.flush()

    return observe


def rfc3339(timestamp: float | None) -> str:
    """``timestamp`` (POSIX seconds; None: now) as RFC 3339 UTC, to the microsecond."""
    when = datetime.now(UTC) if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _fields(event: LogEvent) -> dict[str, Any]:
    """The event's own structured keys that survive JSON encoding."""
    fields: dict[str, Any] = {}
    for key, value in event.items():
        if key.startswith(("log_", "_")) or key in ("format", "message", "isError", "system",
                                                   "time", "why", "failure"):
            continue
        try:
            _json.dumps(value)
        except (TypeError, ValueError):
            value = repr(value)
        fields[key] = value
    return fields


def _json_observer(stream: TextIO) -> ILogObserver:
    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        level = event.get("log_level") or LogLevel.info
        record: dict[str, Any] = {
            "time": rfc3339(event.get("log_time")),
            "level": level.name,
            "namespace": event.get("log_namespace") or "-",
            "message": _message(event),
        }
        tb = _traceback(event)
        if tb:
            record["failure"] = tb
        fields = _fields(event)
        if fields:
            record["fields"] = fields
        stream.write(_json.dumps(record, ensure_ascii=False) + "\n")
        stream.flush()

    return observe


def build_text(stream: TextIO | None = None, minimum: LogLevel | None = None) -> ILogObserver:
    """A filtered text observer writing to ``stream`` (default standard output)."""
    return _filtered(
        _text_observer(sys.stdout if stream is None else stream),
        level_from_env() if minimum is None else minimum,
    )


def build_json(stream: TextIO | None = None, minimum: LogLevel | None = None) -> ILogObserver:
    """A filtered JSON-lines observer writing to ``stream`` (default standard output)."""
    return _filtered(
        _json_observer(sys.stdout if stream is None else stream),
        level_from_env() if minimum is None else minimum,
    )


def text() -> ILogObserver:
    """``twistd --logger`` factory: journald-friendly text lines on standard output."""
    return build_text()


def json() -> ILogObserver:
    """``twistd --logger`` factory: JSON lines on standard output."""
    return build_json()
