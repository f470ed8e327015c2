"""The switchboard's Prometheus metrics.

Each :class:`SwitchboardMetrics` has a registry of its own (several
switchboards may share a process in tests); ``metrics.listen`` serves it with
the process and platform collectors.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.web.iweb import IRequest

from treadmill.switchboard.jobstate import State


class _Live(Collector):
    """Values read at scrape time from the live service objects."""

    def __init__(self, service: Any):
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        links = GaugeMetricFamily("treadmill_supervisor_links",
                                  "Supervisor links held by this instance.")
        links.add_metric([], len(self.service.links.by_host))
        yield links
        watchers = GaugeMetricFamily("treadmill_job_watchers", "Live job event watchers.")
        watchers.add_metric([], self.service.watchers.count)
        yield watchers
        scheduler = self.service.scheduler
        passes = GaugeMetricFamily("treadmill_scheduler_passes",
                                   "Scheduling passes since start.")
        passes.add_metric([], scheduler.passes)
        yield passes
        assigned = GaugeMetricFamily("treadmill_scheduler_assigned",
                                     "Jobs assigned by this instance since start.")
        assigned.add_metric([], scheduler.assigned)
        yield assigned
        jobs = GaugeMetricFamily("treadmill_jobs", "Jobs by state (refreshed periodically).",
                                 labels=["state"])
        for state in State:
            jobs.add_metric([state.value], self.service.job_counts.get(state.value, 0))
        yield jobs


class SwitchboardMetrics:
    """Request counters and live gauges of one switchboard."""

    def __init__(self, service: Any):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(_Live(service))
        self.requests = Counter("treadmill_http_requests", "HTTP API requests answered.",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("treadmill_http_request_seconds",
                                 "Time from a request's arrival to its answer.",
                                 registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                          2.5, 5))

    def observe(self, request: IRequest) -> None:
        """Count a finished request (called from the site's log hook)."""
        method = request.method.decode("ascii", "replace") if request.method else "?"
        if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            method = "other"
        self.requests.labels(method, str(request.code)).inc()
        started = getattr(request, "started", None)
        if started is not None:
            self.latency.observe(time.monotonic() - started)
