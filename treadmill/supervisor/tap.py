"""``twistd treadmill-supervisor``: options and service construction."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import IService

from treadmill.common.config import (
    FIELD,
    FLOAT,
    INT,
    STR,
    STRLIST,
    ConfigError,
    RoleOptions,
    Setting,
    check_order,
    non_negative,
    one_of,
    positive,
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
        Setting("switchboard.url", _ws_url, None,
                "Switchboard base URL, ws:// or wss:// (/api/v1/supervisor is appended).",
                required=True,
                field="url"),
        Setting("switchboard.token", STR, None,
                "The host token (or use switchboard.token_file).",
                field="token"),
        Setting("switchboard.token_file", STR, None,
                "File holding the host token, read at start (whitespace stripped)."),
        Setting("switchboard.ca_file", STR, None,
                "PEM file of the CAs trusted for wss:// (default: the system's).",
                field="ca_file"),
        Setting("state_dir", STR, None,
                "The supervisor's state directory (current job, event journal).", required=True,
                field="state_dir"),
        Setting("driver", one_of(*DRIVERS), FIELD, "Host driver.",
                field="driver"),
        Setting("reconnect.initial", positive(FLOAT), FIELD,
                "First reconnection delay in seconds (also the jitter's scale).",
                field="reconnect_initial"),
        Setting("reconnect.max", positive(FLOAT), FIELD, "Largest reconnection delay in seconds.",
                field="reconnect_max"),
        Setting("heartbeat.interval", positive(FLOAT), FIELD,
                "Seconds between WebSocket pings to the switchboard.",
                field="heartbeat_interval"),
        Setting("heartbeat.timeout", positive(FLOAT), FIELD,
                "Seconds without a pong before the connection is dropped.",
                field="heartbeat_timeout"),
        Setting("console.buffer", non_negative(INT), FIELD,
                "Bytes of the job's console output kept in memory.",
                field="console_buffer"),
        Setting("logs.spool_limit", positive(INT), FIELD,
                "Bytes of a job's log output spooled on disk until log servers acknowledge.",
                field="log_spool_limit"),
        Setting("shutdown.flush_timeout", positive(FLOAT), FIELD,
                "Seconds a graceful stop waits for unacknowledged job events to be acked.",
                field="flush_timeout"),
        Setting("events.ack_timeout", positive(FLOAT), FIELD,
                "Seconds to wait for the switchboard's ack of a job event before sending it "
                "again (doubling, with jitter, per attempt; also the first pause after an "
                "'unavailable' ack).",
                field="event_ack_timeout"),
        Setting("events.resend_max", positive(FLOAT), FIELD,
                "Longest pause in seconds between two sends of one unacknowledged job event.",
                field="event_resend_max"),
        Setting("images.cache_mount", _absolute_path, None,
                "Root of a site image cache's directory, mounted read-only (e.g. over NFS); "
                "layers found there are used in place. Unset: fetch from the job's stores.",
                field="images_cache_mount"),
        Setting("images.cache_url", _http_url, None,
                "HTTP(S) base URL of the image cache whose root is images.cache_mount: the "
                "supervisor leases each job's image there, so it is pulled in and never "
                "evicted while the job runs. Unset: no leases.",
                field="images_cache_url"),
        Setting("images.dir", _absolute_path, None,
                "Where downloaded image blobs are kept (default: STATE_DIR/images).",
                field="images_dir"),
        Setting("images.local_limit", non_negative(INT), FIELD,
                "Bytes of image blobs kept in images.dir (least recently used go first; "
                "the current job's never).",
                field="images_local_limit"),
        Setting("images.trusted_realms", _http_urls, [],
                "Token services (URL prefixes) the host token may be sent to when an image "
                "store asks for one (default: the switchboard's URL).",
                field="images_trusted_realms", convert=list),
        Setting("images.ca_file", STR, None,
                "PEM file of the CAs trusted for https:// image stores "
                "(default: switchboard.ca_file, else the system's).",
                field="images_ca_file"),
        Setting("proxies.ca_file", STR, None,
                "PEM file of the CAs trusted for wss:// rendezvous proxies "
                "(default: switchboard.ca_file, else the system's).",
                field="proxies_ca_file"),
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
