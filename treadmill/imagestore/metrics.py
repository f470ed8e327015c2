"""The image store's Prometheus metrics (a registry per store, read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector as PromCollector
from twisted.web.iweb import IRequest

from treadmill.common.metrics import RequestCounter, role_registry


class _Live(PromCollector):
    """Values read from the live service objects (an ImageStoreService)."""

    def __init__(self, store: Any):
        self.store = store

    def collect(self) -> Iterator[Any]:
        uploads = GaugeMetricFamily("treadmill_imagestore_uploads_active",
                                    "Upload sessions known to this process.")
        uploads.add_metric([], len(self.store.uploads.active))
        yield uploads
        received = CounterMetricFamily("treadmill_imagestore_upload_bytes",
                                       "Blob bytes received and written.")
        received.add_metric([], self.store.uploads.bytes_received)
        yield received
        sent = CounterMetricFamily("treadmill_imagestore_blob_sent_bytes", "Blob bytes served.")
        sent.add_metric([], self.store.api.bytes_sent)
        yield sent
        committed = CounterMetricFamily("treadmill_imagestore_blob_commits",
                                        "Uploads verified and committed.")
        committed.add_metric([], self.store.uploads.committed)
        yield committed
        gc_runs = CounterMetricFamily("treadmill_imagestore_gc_runs", "Garbage collections.")
        gc_runs.add_metric([], self.store.collector.runs)
        yield gc_runs
        gc_deleted = CounterMetricFamily("treadmill_imagestore_gc_deleted_blobs",
                                         "Blobs deleted by garbage collection.")
        gc_deleted.add_metric([], self.store.collector.deleted_total)
        yield gc_deleted
        refused = CounterMetricFamily("treadmill_imagestore_quota_refusals",
                                      "Requests refused by a quota.", labels=["limit"])
        ledger = self.store.ledger
        refused.add_metric(["bytes"], ledger.refusals if ledger is not None else 0)
        refused.add_metric(["sessions"], self.store.uploads.refused_sessions)
        yield refused
        cache = self.store.cache
        if cache is None:
            return
        size = GaugeMetricFamily("treadmill_imagecache_bytes", "Blob bytes in the cache.")
        size.add_metric([], cache.total_bytes)
        yield size
        bound = GaugeMetricFamily("treadmill_imagecache_max_bytes",
                                  "The cache's bound (0: none).")
        bound.add_metric([], cache.config.max_bytes)
        yield bound
        leases = GaugeMetricFamily("treadmill_imagecache_leases", "Active leases.")
        leases.add_metric([], len(cache.leases.active(cache.now())))
        yield leases
        for name, value, text in (
                ("hits", cache.hits, "Manifest and blob requests served from the cache."),
                ("misses", cache.misses, "Manifest and blob requests the cache lacked."),
                ("upstream_blob_fetches", cache.pull.blob_fetches,
                 "Blob downloads from the upstreams."),
                ("upstream_manifest_fetches", cache.pull.manifest_fetches,
                 "Manifest fetches from the upstreams."),
                ("upstream_bytes", cache.pull.fetched_bytes,
                 "Bytes fetched from the upstreams."),
                ("upstream_failures", cache.pull.failures,
                 "Fetches no upstream could answer (502/503)."),
                ("evicted_blobs", cache.evicted_blobs, "Blobs evicted."),
                ("evicted_bytes", cache.evicted_bytes, "Bytes evicted.")):
            counter = CounterMetricFamily(f"treadmill_imagecache_{name}", text)
            counter.add_metric([], value)
            yield counter


class ImageStoreMetrics:
    """The image store's registry: process, live values, HTTP requests by method and code."""

    def __init__(self, store: Any):
        self.registry = role_registry(_Live(store))
        self.requests = RequestCounter(self.registry,
                                       ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"))

    def observe(self, request: IRequest) -> None:
        """Count a finished request (called from the site's log hook)."""
        self.requests.observe(request)
