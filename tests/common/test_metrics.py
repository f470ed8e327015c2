"""The Prometheus ``/metrics`` listener."""

from __future__ import annotations

import pytest_twisted
import treq
from prometheus_client import CollectorRegistry, Counter
from twisted.internet import reactor

from treadmill.common.metrics import metrics_service


def _port(service):
    child = next(iter(service))
    return child._waitingForPort.addCallback(lambda port: port.getHost().port)


@pytest_twisted.inlineCallbacks
def test_metrics_served_over_http():
    registry = CollectorRegistry()
    counter = Counter("treadmill_test_jobs", "Jobs seen by the test.", registry=registry)
    counter.inc(3)
    service = metrics_service(reactor, ["tcp:0:interface=127.0.0.1"], registry=registry)
    service.startService()
    try:
        port = yield _port(service)
        response = yield treq.get(f"http://127.0.0.1:{port}/metrics")
        body = yield response.text()
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
        assert "treadmill_test_jobs_total 3.0" in body

        response = yield treq.get(f"http://127.0.0.1:{port}/metrics",
                                  headers={"Accept": "application/openmetrics-text"})
        body = yield response.text()
        assert response.headers.getRawHeaders("content-type")[0].startswith(
            "application/openmetrics-text")
        assert body.rstrip().endswith("# EOF")

        response = yield treq.get(f"http://127.0.0.1:{port}/other")
        yield response.content()
        assert response.code == 404
    finally:
        yield service.stopService()
