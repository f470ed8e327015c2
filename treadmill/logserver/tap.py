"""``twistd treadmill-logserver``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from treadmill.common import cors, keys, settingsfile
from treadmill.common.config import RoleOptions, one_of
from treadmill.common.daemon import twistd_service
from treadmill.logserver.service import LogServerConfig, LogServerService
from treadmill.logserver.streams import FSYNC_POLICIES


def _zero_is_none(value: float) -> float | None:
    return value or None


class Options(RoleOptions):
    """Settings of the log server (``etc/treadmill/logserver.toml`` documents them)."""

    config = LogServerConfig
    settings = settingsfile.load(
        "treadmill.logserver",
        types={"fsync policy": one_of(*FSYNC_POLICIES), "origins": cors.origins},
        converters={"zero is none": _zero_is_none},
        groups={"satellite": keys.satellite_settings})

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
