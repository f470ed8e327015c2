"""``twistd treadmill-proxy``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from treadmill.common import keys, settingsfile
from treadmill.common.config import STR, ConfigError, RoleOptions
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
    settings = settingsfile.load(
        "treadmill.proxy",
        types={"ws base url": _ws_base, "port range": _port_range, "static ports": parse_static},
        converters={"port range": parse_port_range},
        groups={"satellite": keys.satellite_settings})

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
