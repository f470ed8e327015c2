"""The proxy's Prometheus metrics (a registry per proxy, read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from treadmill.common.metrics import role_registry

# TunnelTable.counts keys reported as connection outcomes; the rest are events.
OUTCOMES = ("spliced", "refused_limit", "connect_timeout", "connect_failed", "client_gave_up",
            "idle_timeout")
DATA_REFUSALS = ("data_unknown", "data_refused", "data_malformed", "data_no_header")


class _Live(Collector):
    def __init__(self, registry: Any):
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        reg = self.registry
        summary = reg.summary()
        jobs = GaugeMetricFamily("treadmill_proxy_jobs", "Jobs with tunnels or a control "
                                 "connection.", labels=["connected"])
        jobs.add_metric(["true"], summary["connected"])
        jobs.add_metric(["false"], summary["jobs"] - summary["connected"])
        yield jobs
        tunnels = GaugeMetricFamily("treadmill_proxy_tunnels", "Published services.")
        tunnels.add_metric([], summary["tunnels"])
        yield tunnels
        ports = GaugeMetricFamily("treadmill_proxy_ports_in_use", "Public ports bound.")
        ports.add_metric([], summary["ports_in_use"])
        yield ports
        conns = GaugeMetricFamily("treadmill_proxy_connections", "Client connections.",
                                  labels=["state"])
        conns.add_metric(["waiting"], summary["pending"])
        conns.add_metric(["active"], summary["active"])
        yield conns
        pooled = GaugeMetricFamily("treadmill_proxy_pooled", "Idle pooled data connections "
                                   "(the dial-back pool).")
        pooled.add_metric([], summary["pooled"])
        yield pooled
        outcomes = CounterMetricFamily("treadmill_proxy_clients", "Client connections by "
                                       "outcome.", labels=["outcome"])
        for outcome in OUTCOMES:
            outcomes.add_metric([outcome], reg.counts.get(outcome, 0))
        yield outcomes
        refused = CounterMetricFamily("treadmill_proxy_data_refused", "Data connections "
                                      "refused.", labels=["reason"])
        for reason in DATA_REFUSALS:
            refused.add_metric([reason.removeprefix("data_")], reg.counts.get(reason, 0))
        yield refused
        moved = CounterMetricFamily("treadmill_proxy_bytes", "Bytes relayed (both directions).")
        moved.add_metric([], reg.bytes_closed + sum(s.transferred for s in reg.splices))
        yield moved
        events = CounterMetricFamily("treadmill_proxy_events", "Control events.",
                                     labels=["event"])
        for name, count in sorted(reg.counts.items()):
            if name not in OUTCOMES and name not in DATA_REFUSALS:
                events.add_metric([name], count)
        yield events


class ProxyMetrics:
    """Live gauges and counters of one proxy."""

    def __init__(self, registry: Any):
        self.registry = role_registry(_Live(registry))
