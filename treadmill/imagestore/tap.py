"""``twistd treadmill-imagestore``: options and service construction."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from treadmill.common import keys
from treadmill.common.config import ConfigError, RoleOptions
from treadmill.common.daemon import twistd_service
from treadmill.imagestore.service import ImageStoreConfig, ImageStoreService

# byte_size and _namespace_sizes: the tests take them from here.
from treadmill.imagestore.settings import SETTINGS, _namespace_sizes, byte_size  # noqa: F401

_CREDENTIALS = ("cache.upstream_", "replicate.")
"""The key prefixes of the two credential groups (``settings._credentials``)."""


class Options(RoleOptions):
    """Settings of the image store (``etc/treadmill/imagestore.toml`` documents them)."""

    config = ImageStoreConfig
    settings = SETTINGS

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
