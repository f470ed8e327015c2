"""``twistd treadmill-proxy``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from treadmill.common import keys
from treadmill.common.config import (
    BOOL,
    FLOAT,
    INT,
    STR,
    ConfigError,
    RoleOptions,
    Setting,
    non_negative,
    positive,
    server_endpoints,
)
from treadmill.common.daemon import add_operator_services
from treadmill.proxy.ports import parse_range, parse_static
from treadmill.proxy.service import ProxyConfig, ProxyService
from treadmill.proxy.tunnels import RegistrySettings


def _port_range(value: Any) -> str:
    parse_range(value)
    return str(value)


def _ws_base(value: Any) -> str:
    text = STR(value)
    if not text.startswith(("ws://", "wss://")):
        raise ValueError(f"expected a ws:// or wss:// base URL, got {text!r}")
    return text.rstrip("/")


class Options(RoleOptions):
    """Settings of the proxy (``etc/treadmill/proxy.toml`` documents them)."""

    settings = (
        Setting("listen", server_endpoints, ["tcp:8090:interface=127.0.0.1"],
                "HTTP/WebSocket listeners: the control endpoint and tunnel paths "
                "(endpoint descriptions: tcp:, ssl:, unix:, systemd:)."),
        Setting("data_listen", server_endpoints, ["tcp:8091:interface=127.0.0.1"],
                "Listeners for the supervisors' data connections (tcp: or ssl:); "
                "the first one's port is announced to supervisors."),
        Setting("public_host", STR, "localhost",
                "The host name clients use to reach the public ports."),
        Setting("public_url", _ws_base, None,
                "ws(s):// base URL clients use for tunnel paths (announced as ws_url); "
                "unset: supervisors derive it from the URL they use."),
        Setting("public_interface", STR, "0.0.0.0",
                "Interface the public ports listen on (:: for IPv4 and IPv6)."),
        Setting("ports", _port_range, "40000-40999",
                "Range of public ports handed out to tunnels; \"\" for static ports only."),
        Setting("static", parse_static, {},
                "Static public ports: a table \"<job id or host>/<service>\" = port "
                "(on the command line: key=port,key=port).", table=True),
        Setting("service", STR, "treadmill-proxy",
                "This proxy's name: the audience (aud) its capability tokens must name."),
        *keys.SETTINGS,
        Setting("idle_timeout", non_negative(FLOAT), 3600.0,
                "Close a client connection after this many seconds without traffic; 0: never."),
        Setting("max_connections_per_tunnel", positive(INT), 256,
                "Client connections (waiting or active) one tunnel may have."),
        Setting("max_tunnels_per_job", positive(INT), 16, "Services one job may publish."),
        Setting("grace", non_negative(FLOAT), 30.0,
                "Seconds a job's tunnels outlive its lost control connection."),
        Setting("connect_timeout", positive(FLOAT), 10.0,
                "Seconds a client waits for the supervisor's data connection."),
        Setting("control.ping_interval", positive(FLOAT), 10.0,
                "Seconds between WebSocket pings on control connections (and the pong "
                "timeout)."),
        Setting("http.access_log", BOOL, True, "Log one line per HTTP request."),
    )

    def checkSettings(self, values: dict[str, Any], source: str) -> None:
        super().checkSettings(values, source)
        keys.require_keys(values, source)
        if not values["service"]:
            raise ConfigError("must not be empty", key="service", source=source)
        if not values["public_host"]:
            raise ConfigError("must not be empty", key="public_host", source=source)
        for desc in values["data_listen"]:
            if desc.split(":", 1)[0] not in ("tcp", "tcp6", "ssl"):
                raise ConfigError(f"{desc!r}: data listeners must be tcp: or ssl: (their port "
                                  "is announced to supervisors)", key="data_listen",
                                  source=source)
        port_range = parse_range(values["ports"])
        if port_range is None and not values["static"]:
            raise ConfigError("no public ports: set a range or static ports", key="ports",
                              source=source)


def config_from(values: dict[str, Any]) -> ProxyConfig:
    """A :class:`ProxyConfig` from parsed option values."""
    tunnels = RegistrySettings(
        public_host=values["public_host"], public_url=values["public_url"],
        interface=values["public_interface"], ports=parse_range(values["ports"]),
        static=dict(values["static"]), idle_timeout=values["idle_timeout"],
        max_connections_per_tunnel=values["max_connections_per_tunnel"],
        max_tunnels_per_job=values["max_tunnels_per_job"], grace=values["grace"],
        connect_timeout=values["connect_timeout"])
    return ProxyConfig(
        listen=values["listen"], data_listen=values["data_listen"],
        auth={key: value for key, value in values.items() if key.startswith("auth.")},
        service=values["service"], tunnels=tunnels,
        ping_interval=values["control.ping_interval"], access_log=values["http.access_log"])


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    service = ProxyService(reactor, config_from(options.values))
    service.exit_on_failure = True
    add_operator_services(reactor, service, options.values, service.namespace(),
                          service.metrics.registry)
    return service
