"""The switchboard's Prometheus metrics.

Each :class:`SwitchboardMetrics` has a registry of its own (several
switchboards may share a process in tests); ``metrics.listen`` serves it with
the process and platform collectors.

With several instances on one database, every metric counts this instance's
own work, except the cluster-wide ``treadmill_jobs``, which only the leader
(``treadmill_instance_leader`` 1) exports, so that a sum over instances is right.
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
                                   "Scheduling passes this instance ran since start.")
        passes.add_metric([], scheduler.passes)
        yield passes
        lost = GaugeMetricFamily("treadmill_scheduler_lock_busy",
                                 "Passes of this instance that found another holding the "
                                 "scheduling lock.")
        lost.add_metric([], scheduler.lost)
        yield lost
        instance = self.service.instance
        leader = GaugeMetricFamily("treadmill_instance_leader",
                                   "1 if this instance leads (schedules, exports "
                                   "treadmill_jobs), else 0.")
        leader.add_metric([], 1 if instance.leader else 0)
        yield leader
        live = GaugeMetricFamily("treadmill_instances_live",
                                 "Live switchboard instances, as this instance last saw.")
        live.add_metric([], instance.live)
        yield live
        rebalanced = GaugeMetricFamily("treadmill_supervisor_links_rebalanced",
                                       "Links this instance closed to rebalance since start.")
        rebalanced.add_metric([], self.service.links.rebalanced)
        yield rebalanced
        if not instance.leader:
            return
        assigned = GaugeMetricFamily("treadmill_scheduler_assigned",
                                     "Jobs assigned by this instance since start.")
        assigned.add_metric([], scheduler.assigned)
        yield assigned
        jobs = GaugeMetricFamily("treadmill_jobs", "Jobs by state, cluster-wide (refreshed "
                                 "periodically; exported by the leader only).",
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
