"""Prometheus metrics over HTTP.

Each role serves ``/metrics`` on its ``metrics.listen`` endpoints, in the
Prometheus text format (or OpenMetrics when the scraper asks for it), from its own
registry (:func:`role_registry`); an HTTP role counts its answered requests with a
:class:`RequestCounter`.
"""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.exposition import choose_encoder
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore
from twisted.web.iweb import IRequest
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from treadmill.common.http import HardenedSite, LimitedRequest

__all__ = ["MetricsResource", "RequestCounter", "metrics_resource", "metrics_service",
           "role_registry"]


def role_registry(live: Collector) -> CollectorRegistry:
    """A role's registry: the process's and the platform's collectors, and ``live`` (the
    role's own values, read at each scrape)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(live)
    return registry


class RequestCounter:
    """``treadmill_http_requests`` by method and status code, counted from a site's log
    hook (:func:`treadmill.common.http.log_requests`); a method outside ``methods`` (those
    the API answers) counts as ``other``, so clients cannot grow the label set."""

    def __init__(self, registry: CollectorRegistry, methods: Collection[str],
                 documentation: str = "HTTP requests answered."):
        self.methods = frozenset(methods)
        self.counter = Counter("treadmill_http_requests", documentation, ["method", "code"],
                               registry=registry)

    def observe(self, request: IRequest) -> None:
        """Count a finished request."""
        method = request.method.decode("ascii", "replace") if request.method else "?"
        self.counter.labels(method if method in self.methods else "other",
                            str(request.code)).inc()


class MetricsResource(Resource):
    """Renders a registry in the exposition format the client accepts."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept")
        encoder, content_type = choose_encoder(accept or "")
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return encoder(self.registry)

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)


class _Root(Resource):
    """``/metrics`` and a plain 404 for anything else."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


class _QuietSite(HardenedSite):
    """A Site that does not log every scrape; heads are checked and time-bounded
    like the roles' APIs (:mod:`treadmill.common.http`)."""

    requestFactory = type("MetricsRequest", (LimitedRequest,), {"max_body": 0})

    def log(self, request: Request) -> None:
        pass


def metrics_resource(registry: CollectorRegistry | None = None) -> Resource:
    """A resource serving ``registry`` (default: the global registry)."""
    return MetricsResource(REGISTRY if registry is None else registry)


def metrics_service(
    reactor: IReactorCore,
    endpoints: list[str],
    registry: CollectorRegistry | None = None,
) -> MultiService:
    """Serve ``/metrics`` on every listening endpoint description in ``endpoints``."""
    root = _Root()
    root.putChild(b"metrics", metrics_resource(registry))
    site = _QuietSite(root)
    service = MultiService()
    for desc in endpoints:
        StreamServerEndpointService(serverFromString(reactor, desc), site).setServiceParent(
            service)
    return service
