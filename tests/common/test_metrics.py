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


def test_requests_are_counted_by_method_and_code_and_unknown_methods_fold_into_other():
    from twisted.web.test.requesthelper import DummyRequest

    from treadmill.common.metrics import RequestCounter, role_registry

    class Live:
        def collect(self):
            return []

    registry = role_registry(Live())
    requests = RequestCounter(registry, ("GET", "POST"))
    for method, code in ((b"GET", 200), (b"GET", 200), (b"POST", 404), (b"BREW", 405),
                         (b"\xff" * 200, 400)):
        request = DummyRequest([b""])
        request.method, request.code = method, code
        requests.observe(request)

    def count(method: str, code: str) -> float | None:
        return registry.get_sample_value("treadmill_http_requests_total",
                                         {"method": method, "code": code})

    assert (count("GET", "200"), count("POST", "404"), count("other", "405"),
            count("other", "400")) == (2, 1, 1, 1)
    assert registry.get_sample_value("process_open_fds") is not None  # the process collector
