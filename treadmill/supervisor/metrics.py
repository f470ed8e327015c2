"""The supervisor's Prometheus metrics (a registry per supervisor).

Live values (the link, log shipping, image fetching) are read from the service
objects at scrape time; job stage durations and console bytes are observed
as an observer of the runner (events and console). A supervisor serves its
registry on ``metrics.listen``; the fleet (many supervisors in one process, a
load-test tool) serves none, so no metric carries a host label.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from treadmill.common.metrics import role_registry
from treadmill.supervisor.observers import JobObserver

__all__ = ["STAGE_BUCKETS", "SupervisorMetrics"]

# A stage lasts from a second (a mock start) to an hour (a long workload).
STAGE_BUCKETS = (.1, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 4 * 3600)

IMAGE_SOURCES = ("cache", "local", "store")


class _Live(Collector):
    """Values read from the live service objects."""

    def __init__(self, service: Any):
        self.service = service

    def collect(self) -> Iterator[Any]:
        link = self.service.link
        up = GaugeMetricFamily("treadmill_supervisor_link_up",
                               "1 while the WebSocket to the switchboard is open, else 0.")
        up.add_metric([], 1 if link.session is not None else 0)
        yield up
        reconnects = CounterMetricFamily("treadmill_supervisor_link_reconnects",
                                         "Sessions opened after the first since start.")
        reconnects.add_metric([], max(0, link.connections - 1))
        yield reconnects
        backlog = GaugeMetricFamily("treadmill_supervisor_logship_backlog_bytes",
                                    "Log bytes not yet acknowledged, per log server.",
                                    labels=["server"])
        lag = GaugeMetricFamily("treadmill_supervisor_logship_lag_seconds",
                                "Seconds since a log server that is behind last acknowledged "
                                "(0 when caught up), per log server.", labels=["server"])
        logs = self.service.logs
        servers: dict[str, tuple[int, float]] = {}
        for shipper in [*logs.shippers.values(), *logs.closing.values()]:
            for url, (behind, seconds) in shipper.lag().items():
                total, worst = servers.get(url, (0, 0.0))
                servers[url] = (total + behind, max(worst, seconds))
        for url, (behind, seconds) in sorted(servers.items()):
            backlog.add_metric([url], behind)
            lag.add_metric([url], seconds)
        yield backlog
        yield lag
        fetcher = self.service.fetcher
        fetched = CounterMetricFamily("treadmill_supervisor_image_fetch_bytes",
                                      "Image bytes downloaded from stores.", labels=["kind"])
        fetched.add_metric(["layer"], fetcher.downloaded_bytes)
        fetched.add_metric(["manifest"], fetcher.manifest_bytes)
        yield fetched
        layers = CounterMetricFamily("treadmill_supervisor_image_layers",
                                     "Image layers used, by where they were found (cache: the "
                                     "site cache mount; local: images.dir; store: downloaded).",
                                     labels=["source"])
        for source in IMAGE_SOURCES:
            layers.add_metric([source], fetcher.layer_sources.get(source, 0))
        yield layers
        notices = CounterMetricFamily(
            "treadmill_supervisor_console_notices",
            "Console connections the proxies reported, by outcome (forwarded to the audit "
            "log, suppressed over the rate bound, invalid, dropped: the switchboard is "
            "older than protocol minor 7).", labels=["outcome"])
        counts = self.service.console_notices.counts
        for outcome in ("forwarded", "suppressed", "invalid"):
            notices.add_metric([outcome], counts.get(outcome, 0))
        notices.add_metric(["dropped"], self.service.runner.outbox.dropped)
        yield notices


class SupervisorMetrics(JobObserver):
    """The registry of one supervisor, fed as an observer of its runner."""

    def __init__(self, service: Any):
        self.registry = role_registry(_Live(service))
        self.reactor = service.reactor
        self.driver = service.driver.name
        self.stages = Histogram("treadmill_supervisor_job_stage_seconds",
                                "Time a job spent in each stage (initializing stages, ready, "
                                "terminating), by driver.", ["stage", "driver"],
                                registry=self.registry, buckets=STAGE_BUCKETS)
        self.console_bytes = Counter("treadmill_supervisor_console_bytes",
                                     "Console bytes received from the host.",
                                     registry=self.registry)
        self._phase: dict[str, tuple[str, float]] = {}  # job id -> (stage, since)
        service.runner.add_observer(self)

    def event(self, event: dict[str, Any]) -> None:
        """Time the stage a job leaves."""
        job, state = event["job_id"], event["state"]
        stage = (event.get("stage") or state) if state == "initializing" else state
        now = self.reactor.seconds()
        previous = self._phase.get(job)
        if previous is not None and previous[0] == stage:
            return
        if previous is not None:
            self.stages.labels(previous[0], self.driver).observe(max(0.0, now - previous[1]))
        if state == "terminated":
            self._phase.pop(job, None)
        else:
            self._phase[job] = (stage, now)

    def console(self, job_id: str, data: bytes) -> None:
        self.console_bytes.inc(len(data))
