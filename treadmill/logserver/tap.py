"""``twistd treadmill-logserver``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from treadmill.common import cors, keys
from treadmill.common.config import (
    BOOL,
    FLOAT,
    INT,
    STR,
    ConfigError,
    RoleOptions,
    Setting,
    non_negative,
    one_of,
    positive,
    server_endpoints,
)
from treadmill.common.daemon import add_operator_services
from treadmill.logserver.service import DAY, LogServerConfig, LogServerService
from treadmill.logserver.store import FSYNC_POLICIES


class Options(RoleOptions):
    """Settings of the log server (``etc/treadmill/logserver.toml`` documents them)."""

    settings = (
        Setting("listen", server_endpoints, ["tcp:8070:interface=127.0.0.1"],
                "API listeners (endpoint descriptions: tcp:, ssl:, unix:, systemd:)."),
        Setting("root", STR, None, "Directory that holds the log streams.", required=True),
        Setting("service", STR, "treadmill-logserver",
                "This server's name: the audience (aud) its capability tokens must name."),
        *keys.SETTINGS,
        Setting("appends.max_bytes", positive(INT), 1024 * 1024,
                "Largest append (request body) in bytes; larger ones get 413."),
        Setting("streams.max_per_job", positive(INT), 64, "Streams one job may have."),
        Setting("fsync", one_of(*FSYNC_POLICIES), "always",
                "always: an append is acknowledged once fdatasync-ed (group commit); "
                "never: once written to the OS (survives a daemon crash, not a power loss)."),
        Setting("retention.max_age", non_negative(FLOAT), 30 * DAY,
                "Delete a job this many seconds after its last append; 0 keeps jobs forever."),
        Setting("retention.max_bytes", non_negative(INT), 0,
                "Delete the least recently written jobs while the total exceeds this many "
                "bytes; 0: no limit."),
        Setting("retention.interval", positive(FLOAT), 300.0,
                "Seconds between retention passes."),
        Setting("http.access_log", BOOL, True, "Log one line per HTTP request."),
        Setting("http.cors_origins", cors.origins, [],
                "Origins of web consoles (the switchboard's URL, https://host[:port]) "
                "whose pages may read logs with a capability token (CORS)."),
        Setting("follow.ping_interval", positive(FLOAT), 30.0,
                "Seconds between WebSocket pings to followers (and the pong timeout)."),
    )

    def checkSettings(self, values: dict[str, Any], source: str) -> None:
        super().checkSettings(values, source)
        keys.require_keys(values, source)
        if not values["service"]:
            raise ConfigError("must not be empty", key="service", source=source)


def config_from(values: dict[str, Any]) -> LogServerConfig:
    """A :class:`LogServerConfig` from parsed option values."""
    return LogServerConfig(
        root=values["root"], listen=values["listen"],
        auth={key: value for key, value in values.items() if key.startswith("auth.")},
        service=values["service"], max_append=values["appends.max_bytes"],
        fsync=values["fsync"], max_streams=values["streams.max_per_job"],
        retention_max_age=values["retention.max_age"] or None,
        retention_max_bytes=values["retention.max_bytes"] or None,
        retention_interval=values["retention.interval"],
        access_log=values["http.access_log"], ping_interval=values["follow.ping_interval"],
        cors_origins=tuple(values["http.cors_origins"]))


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    service = LogServerService(reactor, config_from(options.values))
    service.exit_on_failure = True
    add_operator_services(reactor, service, options.values, service.namespace(),
                          service.metrics.registry)
    return service
