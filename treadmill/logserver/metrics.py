"""The log server's Prometheus metrics (a registry per server, read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.web.iweb import IRequest


class _Live(Collector):
    """Values read from the live service objects."""

    def __init__(self, service: Any):
        self.service = service

    def collect(self) -> Iterator[Any]:
        store = self.service.store
        api = self.service.api
        stored = GaugeMetricFamily("treadmill_logs_stored_bytes", "Bytes of log streams stored.")
        stored.add_metric([], store.total_bytes)
        yield stored
        jobs = GaugeMetricFamily("treadmill_logs_jobs", "Jobs with log streams stored.")
        jobs.add_metric([], sum(1 for j in store.jobs.values() if j.on_disk))
        yield jobs
        followers = GaugeMetricFamily("treadmill_logs_followers", "Live followers.",
                                      labels=["kind"])
        followers.add_metric(["websocket"], api.follow_factory.followers)
        followers.add_metric(["http"], api.http_followers)
        yield followers
        appended = CounterMetricFamily("treadmill_logs_appended_bytes",
                                       "Bytes appended to log streams.")
        appended.add_metric([], store.appended_bytes)
        yield appended
        appends = CounterMetricFamily("treadmill_logs_appends", "Append requests by outcome.",
                                      labels=["outcome"])
        for outcome, count in sorted(api.outcomes.items()):
            appends.add_metric([outcome], count)
        yield appends
        batches = CounterMetricFamily("treadmill_logs_write_batches",
                                      "Batches written (each one sync per file).")
        batches.add_metric([], store.writer.batches)
        yield batches
        deleted = CounterMetricFamily("treadmill_logs_deleted_jobs",
                                      "Jobs deleted by retention.")
        deleted.add_metric([], store.deleted_jobs)
        yield deleted


class LogServerMetrics:
    """Request counters and live gauges of one log server."""

    def __init__(self, service: Any):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(_Live(service))
        self.requests = Counter("treadmill_http_requests", "HTTP requests answered.",
                                ["method", "code"], registry=self.registry)

    def observe(self, request: IRequest) -> None:
        method = request.method.decode("ascii", "replace") if request.method else "?"
        if method not in ("GET", "POST", "HEAD"):
            method = "other"
        self.requests.labels(method, str(request.code)).inc()
