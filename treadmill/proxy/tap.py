"""``twistd treadmill-proxy``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from treadmill.common import keys
from treadmill.common.config import (
    FLOAT,
    INT,
    STR,
    ConfigError,
    RoleOptions,
    Row,
    http_settings,
    non_negative,
    positive,
    server_endpoints,
    table,
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
        *table("", "tunnels.{leaf}",
               data_listen=Row(
                   server_endpoints, "Listeners for the supervisors' data connections (tcp: or "
                   "ssl:); the first one's port is announced to supervisors.", field="data_listen"),
               public_host=Row(STR, "The host name clients use to reach the public ports."),
               public_url=Row(
                   _ws_base, "ws(s):// base URL clients use for tunnel paths (announced as "
                   "ws_url); unset: supervisors derive it from the URL they use."),
               public_interface=Row(
                   STR, "Interface the public ports listen on (:: for IPv4 and IPv6).",
                   field="tunnels.interface"),
               ports=Row(
                   _port_range, "Range of public ports handed out to tunnels; \"\" for static "
                   "ports only.", default="40000-40999", convert=parse_port_range),
               static=Row(
                   parse_static, "Static public ports: a table \"<job id or host>/<service>\" = "
                   "port (on the command line: key=port,key=port).", default={}, table=True,
                   convert=dict),
               idle_timeout=Row(
                   non_negative(FLOAT), "Close a client connection after this many seconds "
                   "without traffic; 0: never."),
               max_connections_per_tunnel=Row(
                   positive(INT), "Client connections (waiting or active) one tunnel may have."),
               max_tunnels_per_job=Row(positive(INT), "Services one job may publish."),
               grace=Row(
                   non_negative(FLOAT), "Seconds a job's tunnels outlive its lost control "
                   "connection."),
               connect_timeout=Row(
                   positive(FLOAT), "Seconds a client waits for the supervisor's data "
                   "connection.")),
        *keys.satellite_settings("proxy", "auth[]"),
        *table("pool", "tunnels.pool_{leaf}",
               per_job=Row(
                   non_negative(INT), "Idle pooled data connections one job's supervisor may "
                   "keep open here (the dial-back pool, control minor 2); 0: no pool."),
               max=Row(
                   non_negative(INT), "Idle pooled data connections of all jobs together; "
                   "more are closed.")),
        *table("control", "{leaf}",
               ping_interval=Row(
                   positive(FLOAT), "Seconds between WebSocket pings on control connections (and "
                   "the pong timeout).")),
    )

    def checkSettings(self, values: dict[str, Any], source: str) -> None:
        super().checkSettings(values, source)
        keys.require_keys(values, source)
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
