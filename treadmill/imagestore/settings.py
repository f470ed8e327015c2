"""The image store's settings, declared in ``settings.toml`` beside this module
(:mod:`treadmill.common.settingsfile`), with the types and groups it names; ``tap.Options``
and the cache's ``CacheConfig`` are made from them."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from treadmill.common import keys, settingsfile
from treadmill.common.config import INT, STR, STRLIST, Row, Setting, table
from treadmill.images.oci import check_store_url
from treadmill.imagestore.auth import anonymous_patterns
from treadmill.imagestore.quota import parse_overrides

__all__ = ["SETTINGS", "byte_size", "store_urls"]

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


SETTINGS = settingsfile.load("treadmill.imagestore", types={
    "anonymous patterns": anonymous_patterns, "byte size": byte_size,
    "namespace sizes": _namespace_sizes, "store urls": store_urls,
}, groups={"satellite": keys.satellite_settings, "credentials": _credentials})
