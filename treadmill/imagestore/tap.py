"""``twistd treadmill-imagestore``: options and service construction."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from twisted.application.service import IService

from treadmill.common import keys, settingsfile
from treadmill.common.config import (
    INT,
    STR,
    STRLIST,
    ConfigError,
    RoleOptions,
    Row,
    Setting,
    table,
)
from treadmill.common.daemon import twistd_service
from treadmill.images.oci import check_store_url
from treadmill.imagestore.auth import anonymous_patterns
from treadmill.imagestore.quota import parse_overrides
from treadmill.imagestore.service import ImageStoreConfig, ImageStoreService

_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4, "p": 1024 ** 5}


def byte_size(value: Any) -> int:
    """A number of bytes: an integer, or a string like ``"500G"``, ``"1.5TiB"`` (powers of
    1024)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*", value.lower())
        if match is None:
            raise ValueError(f"expected a size such as 1073741824, \"500M\" or \"2T\", "
                             f"got {value!r}")
        return int(float(match.group(1)) * _UNITS[match.group(2)])
    number = INT(value)
    if number < 0:
        raise ValueError(f"expected zero or a positive size, got {number}")
    return number


def _namespace_sizes(value: Any) -> dict[str, int]:
    return parse_overrides(value, byte_size)


def store_urls(value: Any) -> list[str]:
    """A list of image store URLs (``http(s)://HOST[:PORT][/PREFIX]``)."""
    return [check_store_url(url) for url in STRLIST(value)]


def _token_value(value: Any) -> str:
    token = STR(value).strip()
    if not token:
        raise ValueError("empty token")
    return token


_CREDENTIALS = ("cache.upstream_", "replicate.")
"""The key prefixes of the two credential groups (:func:`_credentials`)."""


def _credentials(prefix: str, fields: str, whom: str) -> tuple[Setting, ...]:
    """The credentials the store sends to ``whom`` (other image stores): a fixed token, or
    a user and token file for their token flow, the realms they go to, a CA file; keys
    ``prefix + name`` fill the fields ``name`` of the :class:`Credentials` at ``fields``."""
    name, _, leaf = prefix.rpartition(".")
    rows = {
        "token": Row(_token_value, f"A bearer capability token sent as is to the {whom} "
                                   "(tests, fixed setups)."),
        "user": Row(STR, f"User name for the {whom}' token flow (with {prefix}token_file)."),
        "token_file": Row(STR, "File holding that user's API token (read at each token "
                               "request)."),
        "realms": Row(STRLIST, f"Token services (URL prefixes) the credentials for the {whom} "
                               "may be sent to; default: auth.realm."),
        "ca_file": Row(STR, f"CA certificates for https {whom}."),
    }
    return table(name, None, **{leaf + key: dataclasses.replace(row, field=f"{fields}.{key}")
                                for key, row in rows.items()})


class Options(RoleOptions):
    """Settings of the image store (``etc/treadmill/imagestore.toml`` documents them)."""

    config = ImageStoreConfig
    settings = settingsfile.load("treadmill.imagestore", types={
        "anonymous patterns": anonymous_patterns, "byte size": byte_size,
        "namespace sizes": _namespace_sizes, "store urls": store_urls,
    }, groups={"satellite": keys.satellite_settings, "credentials": _credentials})

    def checkSettings(self, values: dict[str, Any], source: str) -> None:
        super().checkSettings(values, source)
        self._check_cache(values, source)
        if values["auth.disabled"]:
            return
        keys.require_keys(values, source, "or auth.disabled = true for a local experiment")
        if not values["auth.realm"]:
            raise ConfigError("set auth.realm, the token endpoint registry clients are sent "
                              "to", key="auth.realm", source=source)


    @staticmethod
    def _check_cache(values: dict[str, Any], source: str) -> None:
        for prefix in _CREDENTIALS:
            token, user, token_file = (prefix + name for name in ("token", "user", "token_file"))
            if bool(values[user]) != bool(values[token_file]):
                raise ConfigError(f"set both {user} and {token_file}, or neither",
                                  key=token_file if values[user] else user, source=source)
            if values[user] and values[token]:
                raise ConfigError(f"set either {token} or {user} and {token_file}, not both",
                                  key=token, source=source)
        if not values["cache.enabled"]:
            return
        if not values["cache.upstreams"]:
            raise ConfigError("a cache needs at least one upstream store", key="cache.upstreams",
                              source=source)


def config_from(values: dict[str, Any]) -> ImageStoreConfig:
    """An :class:`ImageStoreConfig` from parsed option values (``cache`` is None unless
    cache.enabled)."""
    return Options.config_of(values, omit=() if values["cache.enabled"] else ("cache",))


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return twistd_service(reactor, ImageStoreService(reactor, config_from(options.values)),
                          options.values)
