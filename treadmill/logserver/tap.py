"""``twistd treadmill-logserver``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from treadmill.common import cors, keys
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
    one_of,
    positive,
)
from treadmill.common.daemon import twistd_service
from treadmill.logserver.service import DAY, LogServerConfig, LogServerService
from treadmill.logserver.store import FSYNC_POLICIES


def _zero_is_none(value: float) -> float | None:
    return value or None


class Options(RoleOptions):
    """Settings of the log server (``etc/treadmill/logserver.toml`` documents them)."""

    config = LogServerConfig
    settings = (
        *http_settings("API listeners"),
        Setting("root", STR, None, "Directory that holds the log streams.", required=True,
                field="root"),
        *keys.satellite_settings("server", "auth[]"),
        Setting("appends.max_bytes", positive(INT), FIELD,
                "Largest append (request body) in bytes; larger ones get 413.",
                field="max_append"),
        Setting("streams.max_per_job", positive(INT), FIELD, "Streams one job may have.",
                field="max_streams"),
        Setting("fsync", one_of(*FSYNC_POLICIES), FIELD,
                "always: an append is acknowledged once fdatasync-ed (group commit); "
                "never: once written to the OS (survives a daemon crash, not a power loss).",
                field="fsync"),
        Setting("retention.max_age", non_negative(FLOAT), 30 * DAY,
                "Delete a job this many seconds after its last append; 0 keeps jobs forever.",
                field="retention_max_age", convert=_zero_is_none),
        Setting("retention.max_bytes", non_negative(INT), 0,
                "Delete the least recently written jobs while the total exceeds this many "
                "bytes; 0: no limit.", field="retention_max_bytes", convert=_zero_is_none),
        Setting("retention.interval", positive(FLOAT), FIELD,
                "Seconds between retention passes.", field="retention_interval"),
        Setting("http.cors_origins", cors.origins, [],
                "Origins of web consoles (the switchboard's URL, https://host[:port]) "
                "whose pages may read logs with a capability token (CORS).",
                field="cors_origins", convert=tuple),
        Setting("follow.ping_interval", positive(FLOAT), FIELD,
                "Seconds between WebSocket pings to followers (and the pong timeout).",
                field="ping_interval"),
    )

    def checkSettings(self, values: dict[str, Any], source: str) -> None:
        super().checkSettings(values, source)
        keys.require_keys(values, source)
        if not values["service"]:
            raise ConfigError("must not be empty", key="service", source=source)


def config_from(values: dict[str, Any]) -> LogServerConfig:
    """A :class:`LogServerConfig` from parsed option values."""
    return Options.config_of(values)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return twistd_service(reactor, LogServerService(reactor, config_from(options.values)),
                          options.values)
