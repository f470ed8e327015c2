"""The switchboard's Prometheus metrics.

Each :class:`SwitchboardMetrics` has a registry of its own (several
switchboards may share a process in tests); ``metrics.listen`` serves it with
the process and platform collectors.

With several instances on one database, every metric counts this instance's
own work (a job's end is counted by the instance whose transaction ended it,
once it commits), except the cluster-wide ``treadmill_jobs`` and
``treadmill_hosts``, which only the leader (``treadmill_instance_leader`` 1)
exports, so that a sum over instances is right.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.web.iweb import IRequest

from treadmill.common.metrics import RequestCounter, role_registry
from treadmill.switchboard.jobstate import Reason, State


class _Live(Collector):
    """Values read at scrape time from the live service objects."""

    def __init__(self, service: Any):
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        links, scheduler, instance = (self.service.links, self.service.scheduler,
                                      self.service.instance)
        for family, name, text, value in (
                (GaugeMetricFamily, "treadmill_supervisor_links",
                 "Supervisor links held by this instance.", len(links.by_host)),
                (GaugeMetricFamily, "treadmill_job_watchers", "Live job event watchers.",
                 self.service.watchers.count),
                (CounterMetricFamily, "treadmill_scheduler_passes",
                 "Scheduling passes this instance ran since start.", scheduler.counts.passes),
                (CounterMetricFamily, "treadmill_scheduler_lock_busy",
                 "Passes of this instance that found another holding the scheduling lock.",
                 scheduler.counts.lost),
                (CounterMetricFamily, "treadmill_scheduler_assigned",
                 "Jobs assigned by this instance since start.", scheduler.counts.assigned),
                (GaugeMetricFamily, "treadmill_instance_leader",
                 "1 if this instance leads (schedules, exports treadmill_jobs and "
                 "treadmill_hosts), else 0.", 1 if instance.is_leader() else 0),
                (GaugeMetricFamily, "treadmill_instances_live",
                 "Live switchboard instances, as this instance last saw.", instance.cluster.live),
                (CounterMetricFamily, "treadmill_supervisor_links_rebalanced",
                 "Links this instance closed to rebalance since start.", links.rebalanced),
                (GaugeMetricFamily, "treadmill_supervisor_link_handshakes",
                 "Supervisor link handshakes under way on this instance (at most "
                 "supervisors.max_handshakes).", links.gate.in_progress),
                (GaugeMetricFamily, "treadmill_supervisor_link_handshakes_waiting",
                 "Supervisor link upgrades waiting for a handshake slot on this instance "
                 "(at most supervisors.handshake_queue).", links.gate.waiting),
                (CounterMetricFamily, "treadmill_supervisor_link_handshakes_queued",
                 "Supervisor link upgrades that waited for a handshake slot since start.",
                 links.gate.queued),
                (CounterMetricFamily, "treadmill_supervisor_link_handshake_queue_pauses",
                 "Times the handshake queue stopped draining for 100 ms because this "
                 "instance's reactor ran late.", links.gate.paused),
                (CounterMetricFamily, "treadmill_supervisor_link_handshakes_refused",
                 "Supervisor link upgrades this instance refused with 503 since start: the "
                 "handshake queue was full, or an upgrade waited supervisors.handshake_wait "
                 "seconds.", links.gate.refused)):
            metric = family(name, text)
            metric.add_metric([], value)
            yield metric
        if not instance.is_leader():
            return
        jobs = GaugeMetricFamily("treadmill_jobs", "Jobs by state, cluster-wide (refreshed "
                                 "periodically; exported by the leader only).",
                                 labels=["state"])
        for state in State:
            jobs.add_metric([state.value], self.service.job_counts.get(state.value, 0))
        yield jobs
        hosts = GaugeMetricFamily("treadmill_hosts", "Hosts registered, connected, healthy, "
                                  "enabled and busy, cluster-wide (refreshed periodically; "
                                  "exported by the leader only).", labels=["state"])
        for state in HOST_STATES:
            hosts.add_metric([state], self.service.host_counts.get(state, 0))
        yield hosts


HOST_STATES = ("registered", "connected", "healthy", "enabled", "busy")
"""The ``state`` labels of ``treadmill_hosts`` (they overlap: a busy host is connected)."""

# Seconds from a job's submission to its assignment, and from its assignment to its
# start: a queue of hours, a start of a few seconds.
QUEUE_BUCKETS = (.1, .5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
DISPATCH_BUCKETS = (.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300)


class SwitchboardMetrics:
    """Request counters and live gauges of one switchboard."""

    def __init__(self, service: Any):
        self.registry = role_registry(_Live(service))
        self.requests = RequestCounter(self.registry, ("GET", "POST", "PUT", "PATCH", "DELETE"),
                                       "HTTP API requests answered.")
        self.latency = Histogram("treadmill_http_request_seconds",
                                 "Time from a request's arrival to its answer.",
                                 registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                          2.5, 5))

        self.outcomes = Counter("treadmill_jobs_terminated", "Jobs this instance ended, by "
                                "termination reason.", ["reason"], registry=self.registry)
        for reason in Reason:
            self.outcomes.labels(reason.value)
        self.queue_wait = Histogram("treadmill_job_queue_wait_seconds",
                                    "Time from a job's submission to its assignment (jobs "
                                    "this instance assigned).", registry=self.registry,
                                    buckets=QUEUE_BUCKETS)
        self.dispatch = Histogram("treadmill_job_dispatch_seconds",
                                  "Time from a job's assignment to its start on the host (starts "
                                  "this instance recorded).", registry=self.registry,
                                  buckets=DISPATCH_BUCKETS)
        service.pool.on_commit = self.committed

    def committed(self, notes: list[tuple[str, Any]]) -> None:
        """Count what a committed transaction of this instance did to jobs."""
        for kind, value in notes:
            if kind == "terminated":
                self.outcomes.labels(value).inc()
            elif kind == "queue_wait":
                self.queue_wait.observe(max(0.0, value))
            elif kind == "dispatch":
                self.dispatch.observe(max(0.0, value))

    def observe(self, request: IRequest) -> None:
        """Count a finished request and its latency (called from the site's log hook)."""
        self.requests.observe(request)
        started = getattr(request, "started", None)
        if started is not None:
            self.latency.observe(time.monotonic() - started)
