"""The ``twistd --logger`` observers."""

from __future__ import annotations

import io
import json

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from treadmill.common import logging as tlogging


def _emit(observer, emit) -> None:
    publisher = LogPublisher(observer)
    emit(Logger(namespace="treadmill.test", observer=publisher))


def _fail() -> Failure:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        return Failure()
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (LogLevel.debug, 7),
        (LogLevel.info, 6),
        (LogLevel.warn, 4),
        (LogLevel.error, 3),
        (LogLevel.critical, 2),
    ],
)
def test_text_priority_prefix(level: LogLevel, priority: int) -> None:
    out = io.StringIO()
    observer = tlogging.build_text(out, minimum=LogLevel.debug)
    _emit(observer, lambda log: log.emit(level, "job {job} ready", job="j1"))
    assert out.getvalue() == f"<{priority}>[treadmill.test] job j1 ready\n"


def test_text_failure_traceback_indented() -> None:
    out = io.StringIO()
    observer = tlogging.build_text(out)
    _emit(observer, lambda log: log.failure("handler crashed", _fail()))
    lines = out.getvalue().splitlines()
    assert lines[0] == "<2>[treadmill.test] handler crashed"
    assert len(lines) > 2
    assert all(line.startswith("<2>    ") for line in lines[1:])
    assert "ZeroDivisionError" in lines[-1]


def test_text_filters_by_level() -> None:
    out = io.StringIO()
    observer = tlogging.build_text(out, minimum=LogLevel.warn)

    def emit(log: Logger) -> None:
        log.debug("d")
        log.info("i")
        log.warn("w")
        log.error("e")

    _emit(observer, emit)
    assert out.getvalue() == "<4>[treadmill.test] w\n<3>[treadmill.test] e\n"


def test_event_without_level_or_namespace_counts_as_info() -> None:
    out = io.StringIO()
    tlogging.build_text(out, minimum=LogLevel.info)({"log_format": "bare {x}", "x": 1})
    tlogging.build_text(out, minimum=LogLevel.warn)({"log_format": "dropped"})
    assert out.getvalue() == "<6>[-] bare 1\n"


def test_json_shape() -> None:
    out = io.StringIO()
    observer = tlogging.build_json(out)
    observer({
        "log_level": LogLevel.warn,
        "log_namespace": "treadmill.test",
        "log_format": "host {host} lost",
        "log_time": 1795453200.5,
        "host": "board-1",
        "obj": object(),
    })
    record = json.loads(out.getvalue())
    assert record["time"] == "2026-11-23T17:00:00.500000Z"
    assert record["level"] == "warn"
    assert record["namespace"] == "treadmill.test"
    assert record["message"] == "host board-1 lost"
    assert record["fields"]["host"] == "board-1"
    assert record["fields"]["obj"].startswith("<object object")
    assert "failure" not in record


def test_json_failure_and_one_line_per_event() -> None:
    out = io.StringIO()
    observer = tlogging.build_json(out)

    def emit(log: Logger) -> None:
        log.failure("boom", _fail())
        log.info("after\nnewline")

    _emit(observer, emit)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "critical"
    assert first["message"] == "boom"
    assert "ZeroDivisionError" in first["failure"]
    assert second["message"] == "after\nnewline"


def test_json_filters_by_level() -> None:
    out = io.StringIO()
    observer = tlogging.build_json(out, minimum=LogLevel.error)
    _emit(observer, lambda log: (log.info("no"), log.error("yes")))
    assert [json.loads(line)["message"] for line in out.getvalue().splitlines()] == ["yes"]


@pytest.mark.parametrize(
    ("value", "level"),
    [
        (None, LogLevel.info),
        ("", LogLevel.info),
        ("debug", LogLevel.debug),
        ("INFO", LogLevel.info),
        ("warn", LogLevel.warn),
        ("warning", LogLevel.warn),
        ("error", LogLevel.error),
    ],
)
def test_level_from_env(value: str | None, level: LogLevel) -> None:
    env = {} if value is None else {tlogging.LEVEL_ENV: value}
    assert tlogging.level_from_env(env) is level


def test_level_from_env_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="TREADMILL_LOG_LEVEL"):
        tlogging.level_from_env({tlogging.LEVEL_ENV: "verbose"})


def test_factories_use_env_and_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(tlogging.LEVEL_ENV, "debug")
    for factory in (tlogging.text, tlogging.json):
        _emit(factory(), lambda log: log.debug("visible"))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "<7>[treadmill.test] visible"
    assert json.loads(out[1])["level"] == "debug"
