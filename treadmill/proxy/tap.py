"""``twistd treadmill-proxy``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from treadmill.common import keys
from treadmill.common.config import (
    FIELD,
    FLOAT,
    INT,
    STR,
    ConfigError,
    RoleOptions,
    Setting,
    http_settings,
    non_negative,
    positive,
    server_endpoints,
)
from treadmill.common.daemon import twistd_service
from treadmill.protocol.proxy import MAX_POOL
from treadmill.proxy.ports import parse_port_range, parse_static
from treadmill.proxy.service import ProxyConfig, ProxyService


def _port_range(value: Any) -> str:
    parse_port_range(value)
    return str(value)


def _ws_base(value: Any) -> str:
    text = STR(value)
    if not text.startswith(("ws://", "wss://")):
        raise ValueError(f"expected a ws:// or wss:// base URL, got {text!r}")
    return text.rstrip("/")


class Options(RoleOptions):
    """Settings of the proxy (``etc/treadmill/proxy.toml`` documents them)."""

    config = ProxyConfig
    settings = (
        *http_settings("HTTP/WebSocket listeners: the control endpoint and tunnel paths"),
        Setting("data_listen", server_endpoints, FIELD,
                "Listeners for the supervisors' data connections (tcp: or ssl:); "
                "the first one's port is announced to supervisors.",
                field="data_listen"),
        Setting("public_host", STR, FIELD,
                "The host name clients use to reach the public ports.",
                field="tunnels.public_host"),
        Setting("public_url", _ws_base, FIELD,
                "ws(s):// base URL clients use for tunnel paths (announced as ws_url); "
                "unset: supervisors derive it from the URL they use.",
                field="tunnels.public_url"),
        Setting("public_interface", STR, FIELD,
                "Interface the public ports listen on (:: for IPv4 and IPv6).",
                field="tunnels.interface"),
        Setting("ports", _port_range, "40000-40999",
                "Range of public ports handed out to tunnels; \"\" for static ports only.",
                field="tunnels.ports", convert=parse_port_range),
        Setting("static", parse_static, {},
                "Static public ports: a table \"<job id or host>/<service>\" = port "
                "(on the command line: key=port,key=port).", table=True,
                field="tunnels.static", convert=dict),
        *keys.satellite_settings("proxy", "auth[]"),
        Setting("idle_timeout", non_negative(FLOAT), FIELD,
                "Close a client connection after this many seconds without traffic; 0: never.",
                field="tunnels.idle_timeout"),
        Setting("max_connections_per_tunnel", positive(INT), FIELD,
                "Client connections (waiting or active) one tunnel may have.",
                field="tunnels.max_connections_per_tunnel"),
        Setting("max_tunnels_per_job", positive(INT), FIELD, "Services one job may publish.",
                field="tunnels.max_tunnels_per_job"),
        Setting("grace", non_negative(FLOAT), FIELD,
                "Seconds a job's tunnels outlive its lost control connection.",
                field="tunnels.grace"),
        Setting("connect_timeout", positive(FLOAT), FIELD,
                "Seconds a client waits for the supervisor's data connection.",
                field="tunnels.connect_timeout"),
        Setting("pool.per_job", non_negative(INT), FIELD,
                "Idle pooled data connections one job's supervisor may keep open here "
                "(the dial-back pool, control minor 2); 0: no pool.",
                field="tunnels.pool_per_job"),
        Setting("pool.max", non_negative(INT), FIELD,
                "Idle pooled data connections of all jobs together; more are closed.",
                field="tunnels.pool_max"),
        Setting("control.ping_interval", positive(FLOAT), FIELD,
                "Seconds between WebSocket pings on control connections (and the pong "
                "timeout).",
                field="ping_interval"),
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
        if values["pool.per_job"] > MAX_POOL:
            raise ConfigError(f"at most {MAX_POOL}", key="pool.per_job", source=source)
        port_range = parse_port_range(values["ports"])
        if port_range is None and not values["static"]:
            raise ConfigError("no public ports: set a range or static ports", key="ports",
                              source=source)


def config_from(values: dict[str, Any]) -> ProxyConfig:
    """A :class:`ProxyConfig` from parsed option values."""
    return Options.config_of(values)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return twistd_service(reactor, ProxyService(reactor, config_from(options.values)),
                          options.values)
