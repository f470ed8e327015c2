"""The switchboard's settings, declared in ``settings.toml`` beside this module
(:mod:`treadmill.common.settingsfile`); ``tap.Options`` and the config classes they fill
(``LinkPolicy``, ``PasswordPolicy``) are made from them."""

from __future__ import annotations

from treadmill.common import settingsfile

__all__ = ["SETTINGS"]


def _base_urls(urls: list[str]) -> tuple[str, ...]:
    return tuple(url.rstrip("/") for url in urls)


SETTINGS = settingsfile.load("treadmill.switchboard", converters={"base urls": _base_urls})
