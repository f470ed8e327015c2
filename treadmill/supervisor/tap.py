"""``twistd treadmill-supervisor``: options and service construction."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import IService

from treadmill.common.config import (
    FLOAT,
    INT,
    STR,
    STRLIST,
    ConfigError,
    RoleOptions,
    Row,
    check_order,
    non_negative,
    one_of,
    positive,
    table,
)
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

    config = SupervisorConfig
    settings = (
        *table("switchboard", "{leaf}",
               url=Row(
                   _ws_url, "Switchboard base URL, ws:// or wss:// (/api/v1/supervisor is "
                   "appended).", default=None, required=True),
               token=Row(STR, "The host token (or use switchboard.token_file).", default=None),
               token_file=Row(
                   STR, "File holding the host token, read at start (whitespace stripped).",
                   default=None, field=None),
               ca_file=Row(
                   STR, "PEM file of the CAs trusted for wss:// (default: the system's).",
                   default=None)),
        *table("", "{leaf}",
               state_dir=Row(
                   STR, "The supervisor's state directory (current job, event journal).",
                   default=None, required=True),
               driver=Row(one_of(*DRIVERS), "Host driver.")),
        *table("reconnect", "reconnect_{leaf}",
               initial=Row(
                   positive(FLOAT), "First reconnection delay in seconds (also the jitter's "
                   "scale)."),
               max=Row(positive(FLOAT), "Largest reconnection delay in seconds.")),
        *table("heartbeat", "heartbeat_{leaf}",
               interval=Row(positive(FLOAT), "Seconds between WebSocket pings to the switchboard."),
               timeout=Row(
                   positive(FLOAT), "Seconds without a pong before the connection is dropped.")),
        *table("console", None,
               buffer=Row(
                   non_negative(INT), "Bytes of the job's console output kept in memory.",
                   field="console_buffer")),
        *table("logs", None,
               spool_limit=Row(
                   positive(INT), "Bytes of a job's log output spooled on disk until log servers "
                   "acknowledge.", field="log_spool_limit")),
        *table("shutdown", "{leaf}",
               flush_timeout=Row(
                   positive(FLOAT), "Seconds a graceful stop waits for unacknowledged job events "
                   "to be acked.")),
        *table("events", "event_{leaf}",
               ack_timeout=Row(
                   positive(FLOAT), "Seconds to wait for the switchboard's ack of a job event "
                   "before sending it again (doubling, with jitter, per attempt; also the first "
                   "pause after an 'unavailable' ack)."),
               resend_max=Row(
                   positive(FLOAT), "Longest pause in seconds between two sends of one "
                   "unacknowledged job event.")),
        *table("images", "images_{leaf}",
               cache_mount=Row(
                   _absolute_path, "Root of a site image cache's directory, mounted read-only "
                   "(e.g. over NFS); layers found there are used in place. Unset: fetch from the "
                   "job's stores.", default=None),
               cache_url=Row(
                   _http_url, "HTTP(S) base URL of the image cache whose root is "
                   "images.cache_mount: the supervisor leases each job's image there, so it is "
                   "pulled in and never evicted while the job runs. Unset: no leases.",
                   default=None),
               dir=Row(
                   _absolute_path, "Where downloaded image blobs are kept (default: "
                   "STATE_DIR/images).", default=None),
               local_limit=Row(
                   non_negative(INT), "Bytes of image blobs kept in images.dir (least recently "
                   "used go first; the current job's never)."),
               trusted_realms=Row(
                   _http_urls, "Token services (URL prefixes) the host token may be sent to when "
                   "an image store asks for one (default: the switchboard's URL).", default=[],
                   convert=list),
               ca_file=Row(
                   STR, "PEM file of the CAs trusted for https:// image stores (default: "
                   "switchboard.ca_file, else the system's).", default=None)),
        *table("proxies", None,
               ca_file=Row(
                   STR, "PEM file of the CAs trusted for wss:// rendezvous proxies (default: "
                   "switchboard.ca_file, else the system's).", default=None,
                   field="proxies_ca_file")),
        *DRIVER_SETTINGS,
    )

    def checkSettings(self, values: dict[str, Any], source: str) -> None:
        super().checkSettings(values, source)
        token, token_file = values["switchboard.token"], values["switchboard.token_file"]
        if bool(token) == bool(token_file):
            raise ConfigError("set exactly one of switchboard.token and switchboard.token_file",
                              key="switchboard.token", source=source)
        if token_file:
            values["switchboard.token"] = read_token(token_file, source)
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
