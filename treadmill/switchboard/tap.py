"""``twistd treadmill-switchboard``: options and service construction."""

from __future__ import annotations

import argparse
from typing import Any

from twisted.application.service import IService

from treadmill.common.captoken import MAX_TTL
from treadmill.common.config import ConfigError, RoleOptions, check_order
from treadmill.common.daemon import twistd_service
from treadmill.switchboard.service import SwitchboardConfig, SwitchboardService
from treadmill.switchboard.settings import SETTINGS


class Options(RoleOptions):
    """Settings of the switchboard (``etc/treadmill/switchboard.toml`` documents them)."""

    config = SwitchboardConfig
    settings = SETTINGS

    def checkSettings(self, values: dict[str, Any], source: str) -> None:
        super().checkSettings(values, source)
        check_order(values, source, ("jobs.default_timeout", "jobs.max_timeout"),
                    ("jobs.default_queue_timeout", "jobs.max_queue_timeout"))
        longest = MAX_TTL - 3600.0  # a job's log write token lives its timeout plus an hour
        if values["jobs.max_timeout"] > longest:
            raise ConfigError(f"jobs.max_timeout ({values['jobs.max_timeout']:g}) exceeds "
                              f"{longest:g} seconds, the longest a job's log write token "
                              "can cover", key="jobs.max_timeout", source=source)
        if values["login.hashing_queue"] < 0:
            raise ConfigError("login.hashing_queue must be 0 or more",
                              key="login.hashing_queue", source=source)


def database_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--database-dsn``, for the command-line tools beside the daemon
    (:func:`parsed_dsn`)."""
    parser.add_argument("--config", help="switchboard TOML configuration")
    parser.add_argument("--database-dsn",
                        help="overrides database.dsn of the configuration (put passwords "
                             "in ~/.pgpass or PGPASSFILE, not here)")


def parsed_dsn(parser: argparse.ArgumentParser, args: argparse.Namespace, tool: str) -> str:
    """The ``database.dsn`` that :func:`database_arguments` name; exits 2 with a message
    starting ``tool:`` if the configuration is wrong."""
    try:
        return database_dsn(args.config, args.database_dsn)
    except ConfigError as e:
        parser.exit(2, f"{tool}: {e}\n")


def database_dsn(config: str | None, dsn: str | None) -> str:
    """``database.dsn`` from a configuration file and an override, as the daemon reads it
    (for the command-line tools beside it); raises ``ConfigError``."""
    options = Options()
    flags = []
    if config:
        flags += ["--config", config]
    if dsn:
        flags += ["--database-dsn", dsn]
    options.parseOptions(flags)
    return options.values["database.dsn"]


def config_from(values: dict[str, Any]) -> SwitchboardConfig:
    """A :class:`SwitchboardConfig` from parsed option values."""
    return Options.config_of(values)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return twistd_service(reactor, SwitchboardService(reactor, config_from(options.values)),
                          options.values)
