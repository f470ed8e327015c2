"""The proxy's service tree.

    proxy (ProxyService)
    ├── keys      the switchboard's capability keys (file, or fetched and refreshed)
    ├── data      the data listeners (supervisors dial back here)
    ├── http      /healthz, the control WebSocket, tunnel WebSockets (Klein)
    ├── manhole   optional SSH manhole
    └── metrics   optional Prometheus listeners

Public tunnel ports are not services of the tree: the registry binds and
releases them as jobs publish and unpublish. Stopping the service closes
every control connection with 4005 (going away) and every tunnel.

For tests and tools, in-process::

    service = ProxyService(reactor, ProxyConfig(listen=[...], data_listen=[...],
                                                auth={"auth.keys_file": ...}))
    service.startService()
    await service.ready()
    port = service.ports()[0].getHost().port
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.http import combinedLogFormatter

from treadmill.common.daemon import RoleService, listeners
from treadmill.common.http import limited_site, log_requests
from treadmill.common.keys import KeySource, attach_keys
from treadmill.proxy.api import ProxyAPI
from treadmill.proxy.control import ControlFactory
from treadmill.proxy.legs import DataFactory, PublicFactory, TunnelFactory
from treadmill.proxy.metrics import ProxyMetrics
from treadmill.proxy.tunnels import TunnelConfig, TunnelTable

__all__ = ["ProxyConfig", "ProxyService"]

_TOKEN_QUERY = re.compile(rb"(?<=[?&]token=)[^&#]*")


class _Redacted:
    """A request whose ``uri`` has its console token hidden; the rest as the request's."""

    def __init__(self, request: Any, uri: bytes):
        self._request = request
        self.uri = uri

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def redacting_log_formatter(timestamp: str, request: Any) -> str:
    """The combined log format, without the ``token`` query value of a console URL."""
    uri = request.uri
    if b"token=" in uri:
        request = _Redacted(request, _TOKEN_QUERY.sub(b"REDACTED", uri))
    return combinedLogFormatter(timestamp, request)  # type: ignore[no-any-return]


@dataclass
class ProxyConfig:
    """Everything a proxy needs, already validated; its defaults are the settings'
    (``tap.Options``: each setting names its field here)."""

    listen: list[str] = field(default_factory=lambda: ["tcp:8090:interface=127.0.0.1"])
    data_listen: list[str] = field(default_factory=lambda: ["tcp:8091:interface=127.0.0.1"])
    auth: dict[str, Any] = field(default_factory=dict)  # the auth.* settings
    service: str = "treadmill-proxy"
    tunnels: TunnelConfig = field(default_factory=TunnelConfig)
    ping_interval: float = 10.0
    access_log: bool = True


class ProxyService(RoleService):
    """The root service of a proxy process; ``ready()`` fires when the data and HTTP
    listeners listen."""

    log = Logger()
    start_failure = "The proxy cannot start"

    def __init__(self, reactor: Any, config: ProxyConfig, *, keys: KeySource | None = None):
        super().__init__()
        self.setName("proxy")
        self.reactor = reactor
        self.config = config
        self.keys, self.verifier = attach_keys(self, reactor, config.auth, config.service, keys)
        self.registry = TunnelTable(
            reactor, config.tunnels, self.verifier,
            public_factory=lambda tunnel: PublicFactory(self.registry, tunnel),
            data_port=self._data_port,
            data_tls=any(d.startswith("ssl:") for d in config.data_listen))
        self.control = ControlFactory(self.registry, ping_interval=config.ping_interval)
        self.tunnel_sockets = TunnelFactory(self.registry)
        self.api = ProxyAPI(self.registry, self.verifier, self.control, self.tunnel_sockets)
        self.site = limited_site(self.api.resource(), 64 * 1024,
                                 logFormatter=redacting_log_formatter)
        log_requests(self.site, config.access_log)
        self.metrics = ProxyMetrics(self.registry)
        self._ports: list[Any] = []
        self._data_ports: list[Any] = []

    def namespace(self) -> dict[str, Any]:
        """What the manhole shows an operator."""
        registry = self.registry

        def list_tunnels() -> list[dict[str, Any]]:
            """Jobs holding tunnels: job, control connected, each tunnel's port and clients."""
            return [session.info() for session in registry.sessions.values()]

        return {"proxy": self, "registry": self.registry, "keys": self.keys,
                "metrics": self.metrics, "reactor": self.reactor, "list_tunnels": list_tunnels}

    def _data_port(self) -> int:
        if not self._data_ports:
            raise RuntimeError("the data listener is not bound yet")
        return self._data_ports[0].getHost().port  # type: ignore[no-any-return]

    async def _start(self) -> None:
        data = listeners(self.reactor, self.config.data_listen,
                         DataFactory(self.registry, self.config.tunnels.connect_timeout),
                         "data")
        data.setServiceParent(self)
        self._data_ports = [await service._waitingForPort  # type: ignore[attr-defined]
                            for service in data]
        if self._stopping:
            return
        self.registry.start()
        http = listeners(self.reactor, self.config.listen,
                         self.site, "http")
        http.setServiceParent(self)
        self._ports = [await service._waitingForPort  # type: ignore[attr-defined]
                       for service in http]
        settings = self.config.tunnels
        self.log.info("Proxy listening on {listen}, data on {data}; public host {host}, ports "
                      "{ports}, {static} static", listen=", ".join(self.config.listen),
                      data=", ".join(self.config.data_listen), host=settings.public_host,
                      ports=self.registry.ports.describe(), static=len(settings.static))

    def ports(self) -> list[Any]:
        """The listening ports of the HTTP endpoint (for tests that listen on port 0)."""
        return list(self._ports)

    def data_ports(self) -> list[Any]:
        return list(self._data_ports)

    def stopService(self) -> Deferred[None]:
        self._stopping = True
        self.registry.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await super().stopService()
        # The listeners are made again by the next start.
        for name in ("data", "http"):
            child = self.namedServices.get(name)
            if child is not None:
                self.removeService(child)  # already stopped
        self._ports, self._data_ports = [], []

