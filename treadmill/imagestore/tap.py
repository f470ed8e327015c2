"""``twistd treadmill-imagestore``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from treadmill.common import keys
from treadmill.common.config import (
    BOOL,
    FLOAT,
    INT,
    STR,
    ConfigError,
    RoleOptions,
    Setting,
    positive,
    server_endpoints,
)
from treadmill.common.daemon import add_operator_services
from treadmill.imagestore.auth import anonymous_patterns
from treadmill.imagestore.service import DEFAULT_LISTEN, ImageStoreConfig, ImageStoreService


def _non_negative(value: Any) -> float:
    number = FLOAT(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"expected zero or a positive number, got {number}")
    return number


class Options(RoleOptions):
    """Settings of the image store (``etc/treadmill/imagestore.toml`` documents them)."""

    settings = (
        Setting("listen", server_endpoints, [DEFAULT_LISTEN],
                "Registry listeners (endpoint descriptions: tcp:, ssl:, unix:, systemd:)."),
        Setting("root", STR, None,
                "Storage directory (blobs, repositories, uploads); see docs/imagestore.md.",
                required=True),
        Setting("service", STR, "treadmill-imagestore",
                "This store's name: the audience (aud) its capability tokens must carry."),
        *keys.SETTINGS,
        Setting("auth.realm", STR, None,
                "Token endpoint clients are sent to on 401, e.g. "
                "https://switchboard.example/api/v1/registry/token."),
        Setting("auth.disabled", BOOL, False,
                "Accept every request without a token (local experiments only)."),
        Setting("anonymous_pull", anonymous_patterns, [],
                "Repositories anyone may pull without a token: true, or glob patterns "
                "(\"demo/*\" one level, \"public/**\" any depth)."),
        Setting("uploads.max_age", positive(FLOAT), 24 * 3600.0,
                "Seconds an idle upload session is kept before it is removed."),
        Setting("manifests.max_size", positive(INT), 4 * 1024 * 1024,
                "Largest manifest accepted, in bytes."),
        Setting("gc.interval", _non_negative, 0.0,
                "Seconds between garbage collections; 0 runs them only on demand."),
        Setting("gc.grace", _non_negative, 3600.0,
                "Seconds a newly uploaded, mounted or HEAD-checked blob is safe from "
                "garbage collection while no manifest references it."),
        Setting("http.access_log", BOOL, True, "Log one line per HTTP request."),
        Setting("io_threads", positive(INT), 8, "Threads for disk work."),
    )

    def checkSettings(self, values: dict[str, Any], source: str) -> None:
        super().checkSettings(values, source)
        if values["auth.disabled"]:
            return
        if not values["auth.keys_url"] and not values["auth.keys_file"]:
            raise ConfigError("set auth.keys_file or auth.keys_url (or auth.disabled = true "
                              "for a local experiment)", key="auth.keys_file", source=source)
        if not values["auth.realm"]:
            raise ConfigError("set auth.realm, the token endpoint registry clients are sent "
                              "to", key="auth.realm", source=source)


def config_from(values: dict[str, Any]) -> ImageStoreConfig:
    """An :class:`ImageStoreConfig` from parsed option values."""
    return ImageStoreConfig(
        root=values["root"], listen=values["listen"], service=values["service"],
        keys_url=values["auth.keys_url"], keys_file=values["auth.keys_file"],
        keys_refresh=values["auth.keys_refresh"], issuer=values["auth.issuer"],
        ca_file=values["auth.ca_file"], realm=values["auth.realm"],
        auth_disabled=values["auth.disabled"], anonymous_pull=values["anonymous_pull"],
        upload_max_age=values["uploads.max_age"],
        manifest_max_size=values["manifests.max_size"], gc_interval=values["gc.interval"],
        gc_grace=values["gc.grace"], access_log=values["http.access_log"],
        io_threads=values["io_threads"])


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    service = ImageStoreService(reactor, config_from(options.values))
    add_operator_services(reactor, service, options.values, service.namespace(),
                          service.metrics.registry)
    return service
