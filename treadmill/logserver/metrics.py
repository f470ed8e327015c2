"""The log server's Prometheus metrics (a registry per server, read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.web.iweb import IRequest

from treadmill.common.metrics import RequestCounter, role_registry


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
        self.registry = role_registry(_Live(service))
        self.requests = RequestCounter(self.registry, ("GET", "POST", "HEAD"))

    def observe(self, request: IRequest) -> None:
        """Count a finished request (called from the site's log hook)."""
        self.requests.observe(request)
