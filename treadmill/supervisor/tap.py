"""``twistd treadmill-supervisor``: options and service construction."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import IService
from twisted.logger import Logger

from treadmill.common import settingsfile
from treadmill.common.config import STR, STRLIST, ConfigError, RoleOptions, check_order, one_of
from treadmill.common.daemon import twistd_service
from treadmill.images.oci import check_store_url
from treadmill.supervisor.config import SupervisorConfig
from treadmill.supervisor.drivers import DRIVER_MODULES, driver_module
from treadmill.supervisor.journal import StateFiles, StateLocked
from treadmill.supervisor.link import parse_url
from treadmill.supervisor.service import SupervisorService

DRIVERS = tuple(DRIVER_MODULES)
DRIVER_SETTINGS = tuple(setting for name in DRIVERS for setting in driver_module(name).SETTINGS)


def _ws_url(value: Any) -> str:
    url = STR(value)
    parse_url(url)  # ValueError with a readable message
    return url


def _absolute_path(value: Any) -> str:
    path = STR(value)
    if not os.path.isabs(path):
        raise ValueError(f"expected an absolute path, got {path!r}")
    return path


def _http_url(value: Any) -> str:
    url = STR(value)
    try:
        return check_store_url(url)
    except ValueError:
        raise ValueError(f"expected an http:// or https:// base URL, got {url!r}") from None


def _http_urls(value: Any) -> list[str]:
    urls = STRLIST(value)
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"expected http:// or https:// URLs, got {url!r}")
    return urls


class Options(RoleOptions):
    """Settings of a supervisor (``etc/treadmill/supervisor-mock.toml`` documents them)."""

    log = Logger()

    config = SupervisorConfig
    settings = settingsfile.load("treadmill.supervisor", types={
        "ws url": _ws_url, "driver": one_of(*DRIVERS), "absolute path": _absolute_path,
        "http url": _http_url, "http urls": _http_urls,
    }, groups={"drivers": lambda: DRIVER_SETTINGS})

    def checkSettings(self, values: dict[str, Any], source: str) -> None:
        super().checkSettings(values, source)
        token, token_file = values["switchboard.token"], values["switchboard.token_file"]
        if bool(token) == bool(token_file):
            raise ConfigError("set exactly one of switchboard.token and switchboard.token_file",
                              key="switchboard.token", source=source)
        if token_file:
            values["switchboard.token"] = read_token(token_file, source)
        elif self["switchboard-token"] is not None:
            self.log.warn("--switchboard-token puts the host token on the command line, "
                          "where other local users can read it; use switchboard.token_file "
                          "(or --switchboard-token-file)")
        if values["images.cache_url"] and not values["images.cache_mount"]:
            raise ConfigError("images.cache_url needs images.cache_mount (the cache's root, "
                              "mounted read-only)", key="images.cache_url", source=source)
        check_order(values, source, ("events.ack_timeout", "events.resend_max"),
                    ("reconnect.initial", "reconnect.max"))
        for key in ("switchboard.ca_file", "images.ca_file", "proxies.ca_file"):
            if values[key]:
                try:
                    with open(values[key], "rb"):
                        pass
                except OSError as e:
                    raise ConfigError(f"cannot read: {e.strerror}", key=key,
                                      source=source) from None


def read_token(path: str, source: str = "command line") -> str:
    """The token in ``path``, whitespace stripped."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        problem = e.strerror if isinstance(e, OSError) else "not UTF-8"
        raise ConfigError(f"cannot read {path}: {problem}", key="switchboard.token_file",
                          source=source) from None
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"{path} does not hold a token", key="switchboard.token_file",
                          source=source)
    return token


def config_from(values: dict[str, Any]) -> SupervisorConfig:
    """A :class:`SupervisorConfig` from parsed option values (the driver's own settings
    in ``driver_values``)."""
    config = Options.config_of(values)
    config.driver_values = {key: value for key, value in values.items()
                            if key.startswith(values["driver"] + ".")}
    return config


def check_state_dir(path: str) -> None:
    """Fail now, with a clear message, if the state directory cannot be used."""
    files = StateFiles(path)
    try:
        files.open()
    except StateLocked as e:
        raise ConfigError(str(e), key="state_dir") from None
    except OSError as e:
        raise ConfigError(f"cannot use {path}: {e.strerror}", key="state_dir") from None
    finally:
        files.close()


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    config = config_from(options.values)
    check_state_dir(config.state_dir)
    return twistd_service(reactor, SupervisorService(reactor, config), options.values)
