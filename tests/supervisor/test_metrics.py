"""The supervisor's metrics: stage durations from the runner's events, console bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.metrics import SupervisorMetrics
from treadmill.supervisor.observers import IJobObserver
from treadmill.supervisor.service import SupervisorService


def _metrics(clock: Clock, tmp_path: Path) -> tuple[SupervisorMetrics, Any]:
    """The metrics of a real (not started) supervisor whose reactor is ``clock``."""
    service = SupervisorService(clock, SupervisorConfig(
        url="ws://127.0.0.1:9", token="host-token", state_dir=str(tmp_path), durable=False))
    return service.metrics, service.runner


def _value(metrics: SupervisorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_each_stage_is_timed_once_when_the_job_leaves_it(tmp_path: Path) -> None:
    clock = Clock()
    metrics, runner = _metrics(clock, tmp_path)
    assert metrics in runner.observers
    assert verifyObject(IJobObserver, metrics)
    job = "j1"
    steps = [("initializing", "starting", 1.0), ("initializing", "fetching_image", 4.0),
             ("initializing", "fetching_image", 0.0),  # a repeat: the same stage goes on
             ("initializing", "booting", 2.0), ("ready", None, 30.0),
             ("terminating", None, 0.5), ("terminated", None, 0.0)]
    for state, stage, then in steps:
        event = {"job_id": job, "state": state, **({"stage": stage} if stage else {})}
        metrics.event(event)
        clock.advance(then)
    expected = {"starting": 1.0, "fetching_image": 4.0, "booting": 2.0, "ready": 30.0,
                "terminating": 0.5}
    for stage, seconds in expected.items():
        labels = {"stage": stage, "driver": "mock"}
        assert _value(metrics, "treadmill_supervisor_job_stage_seconds_count", **labels) == 1
        assert _value(metrics, "treadmill_supervisor_job_stage_seconds_sum", **labels) == seconds
    assert metrics._phase == {}  # nothing kept for an ended job
    # A job adopted after a restart, first seen ready: timed from then, not before.
    metrics.event({"job_id": "j2", "state": "ready"})
    clock.advance(3)
    metrics.event({"job_id": "j2", "state": "terminated", "reason": "workload_exited"})
    assert _value(metrics, "treadmill_supervisor_job_stage_seconds_sum",
                  stage="ready", driver="mock") == 33.0


def test_console_bytes_count_every_byte(tmp_path: Path) -> None:
    metrics, runner = _metrics(Clock(), tmp_path)
    for data in (b"abc", b"", b"x" * 1000):
        for observer in runner.observers:
            observer.console("j1", data)
    assert _value(metrics, "treadmill_supervisor_console_bytes_total") == 1003
    text = generate_latest(metrics.registry).decode()
    assert "treadmill_supervisor_console_bytes_total 1003.0" in text
    assert "treadmill_supervisor_link_up 0.0" in text  # never connected
