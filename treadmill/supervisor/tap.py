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
    Setting,
    one_of,
    positive,
)
from treadmill.common.daemon import add_operator_services
from treadmill.images.oci import check_store_url
from treadmill.supervisor.blobcache import DEFAULT_LOCAL_LIMIT
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


def _non_negative_int(value: Any) -> int:
    number = INT(value)
    if number < 0:
        raise ValueError(f"expected an integer >= 0, got {number}")
    return number


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

    settings = (
        Setting("switchboard.url", _ws_url, None,
                "Switchboard base URL, ws:// or wss:// (/api/v1/supervisor is appended).",
                required=True),
        Setting("switchboard.token", STR, None,
                "The host token (or use switchboard.token_file)."),
        Setting("switchboard.token_file", STR, None,
                "File holding the host token, read at start (whitespace stripped)."),
        Setting("switchboard.ca_file", STR, None,
                "PEM file of the CAs trusted for wss:// (default: the system's)."),
        Setting("state_dir", STR, None,
                "The supervisor's state directory (current job, event journal).", required=True),
        Setting("driver", one_of(*DRIVERS), "mock", "Host driver."),
        Setting("reconnect.initial", positive(FLOAT), 1.0,
                "First reconnection delay in seconds (also the jitter's scale)."),
        Setting("reconnect.max", positive(FLOAT), 60.0, "Largest reconnection delay in seconds."),
        Setting("heartbeat.interval", positive(FLOAT), 5.0,
                "Seconds between WebSocket pings to the switchboard."),
        Setting("heartbeat.timeout", positive(FLOAT), 10.0,
                "Seconds without a pong before the connection is dropped."),
        Setting("console.buffer", _non_negative_int, 64 * 1024,
                "Bytes of the job's console output kept in memory."),
        Setting("logs.spool_limit", positive(INT), 64 * 1024 * 1024,
                "Bytes of a job's log output spooled on disk until log servers acknowledge."),
        Setting("shutdown.flush_timeout", positive(FLOAT), 2.0,
                "Seconds a graceful stop waits for unacknowledged job events to be acked."),
        Setting("events.ack_timeout", positive(FLOAT), 5.0,
                "Seconds to wait for the switchboard's ack of a job event before sending it "
                "again (doubling, with jitter, per attempt; also the first pause after an "
                "'unavailable' ack)."),
        Setting("events.resend_max", positive(FLOAT), 60.0,
                "Longest pause in seconds between two sends of one unacknowledged job event."),
        Setting("images.cache_mount", _absolute_path, None,
                "Root of a site image cache's directory, mounted read-only (e.g. over NFS); "
                "layers found there are used in place. Unset: fetch from the job's stores."),
        Setting("images.cache_url", _http_url, None,
                "HTTP(S) base URL of the image cache whose root is images.cache_mount: the "
                "supervisor leases each job's image there, so it is pulled in and never "
                "evicted while the job runs. Unset: no leases."),
        Setting("images.dir", _absolute_path, None,
                "Where downloaded image blobs are kept (default: STATE_DIR/images)."),
        Setting("images.local_limit", _non_negative_int, DEFAULT_LOCAL_LIMIT,
                "Bytes of image blobs kept in images.dir (least recently used go first; "
                "the current job's never)."),
        Setting("images.trusted_realms", _http_urls, [],
                "Token services (URL prefixes) the host token may be sent to when an image "
                "store asks for one (default: the switchboard's URL)."),
        Setting("images.ca_file", STR, None,
                "PEM file of the CAs trusted for https:// image stores "
                "(default: switchboard.ca_file, else the system's)."),
        Setting("proxies.ca_file", STR, None,
                "PEM file of the CAs trusted for wss:// rendezvous proxies "
                "(default: switchboard.ca_file, else the system's)."),
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
        if values["events.ack_timeout"] > values["events.resend_max"]:
            raise ConfigError(f"events.ack_timeout ({values['events.ack_timeout']:g}) exceeds "
                              f"events.resend_max ({values['events.resend_max']:g})",
                              key="events.ack_timeout", source=source)
        if values["reconnect.initial"] > values["reconnect.max"]:
            raise ConfigError(f"reconnect.initial ({values['reconnect.initial']:g}) exceeds "
                              f"reconnect.max ({values['reconnect.max']:g})",
                              key="reconnect.initial", source=source)
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
    """A :class:`SupervisorConfig` from parsed option values."""
    return SupervisorConfig(
        url=values["switchboard.url"], token=values["switchboard.token"],
        state_dir=values["state_dir"], driver=values["driver"],
        ca_file=values["switchboard.ca_file"],
        reconnect_initial=values["reconnect.initial"], reconnect_max=values["reconnect.max"],
        heartbeat_interval=values["heartbeat.interval"],
        heartbeat_timeout=values["heartbeat.timeout"],
        console_buffer=values["console.buffer"],
        log_spool_limit=values["logs.spool_limit"],
        flush_timeout=values["shutdown.flush_timeout"],
        event_ack_timeout=values["events.ack_timeout"],
        event_resend_max=values["events.resend_max"],
        images_cache_mount=values["images.cache_mount"],
        images_cache_url=values["images.cache_url"], images_dir=values["images.dir"],
        images_local_limit=values["images.local_limit"],
        images_trusted_realms=list(values["images.trusted_realms"]),
        images_ca_file=values["images.ca_file"],
        proxies_ca_file=values["proxies.ca_file"],
        driver_values={key: value for key, value in values.items()
                       if key.startswith(values["driver"] + ".")})


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
    service = SupervisorService(reactor, config, exit_on_failure=True)
    add_operator_services(reactor, service, options.values, service.namespace(),
                          service.metrics.registry)
    return service
