"""``twistd treadmill-logserver``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from treadmill.common import cors, keys
from treadmill.common.config import (
    FLOAT,
    INT,
    STR,
    RoleOptions,
    Row,
    http_settings,
    non_negative,
    one_of,
    positive,
    table,
)
from treadmill.common.daemon import twistd_service
from treadmill.logserver.service import DAY, LogServerConfig, LogServerService
from treadmill.logserver.streams import FSYNC_POLICIES


def _zero_is_none(value: float) -> float | None:
    return value or None


class Options(RoleOptions):
    """Settings of the log server (``etc/treadmill/logserver.toml`` documents them)."""

    config = LogServerConfig
    settings = (
        *http_settings("API listeners"),
        *table("", "{leaf}",
               root=Row(STR, "Directory that holds the log streams.", default=None, required=True),
               fsync=Row(
                   one_of(*FSYNC_POLICIES), "always: an append is acknowledged once fdatasync-ed "
                   "(group commit); never: once written to the OS (survives a daemon crash, not a "
                   "power loss).")),
        *keys.satellite_settings("server", "auth[]"),
        *table("appends", None,
               max_bytes=Row(
                   positive(INT), "Largest append (request body) in bytes; larger ones get 413.",
                   field="max_append")),
        *table("streams", None,
               max_per_job=Row(positive(INT), "Streams one job may have.", field="max_streams")),
        *table("retention", "retention_{leaf}",
               max_age=Row(
                   non_negative(FLOAT), "Delete a job this many seconds after its last append; 0 "
                   "keeps jobs forever.", default=30 * DAY, convert=_zero_is_none),
               max_bytes=Row(
                   non_negative(INT), "Delete the least recently written jobs while the total "
                   "exceeds this many bytes; 0: no limit.", default=0, convert=_zero_is_none),
               interval=Row(positive(FLOAT), "Seconds between retention passes.")),
        *table("http", "{leaf}",
               cors_origins=Row(
                   cors.origins, "Origins of web consoles (the switchboard's URL, "
                   "https://host[:port]) whose pages may read logs with a capability token (CORS).",
                   default=[], convert=tuple)),
        *table("follow", "{leaf}",
               ping_interval=Row(
                   positive(FLOAT), "Seconds between WebSocket pings to followers (and the pong "
                   "timeout).")),
    )

    def checkSettings(self, values: dict[str, Any], source: str) -> None:
        super().checkSettings(values, source)
        keys.require_keys(values, source)


def config_from(values: dict[str, Any]) -> LogServerConfig:
    """A :class:`LogServerConfig` from parsed option values."""
    return Options.config_of(values)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return twistd_service(reactor, LogServerService(reactor, config_from(options.values)),
                          options.values)
