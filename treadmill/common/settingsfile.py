"""A role's settings declared as data: the ``settings.toml`` its package ships.

The file is a list of entries in ``--help`` order, and a table of the config fields they
fill. Each ``[[settings]]`` entry is one setting (``key``) or a group of settings that a
function of the role or :mod:`treadmill.common` makes (``group``)::

    [fields]                     # TOML table -> config field, {leaf}: the key's last part
    database = "{leaf}"
    supervisors = "links.{leaf}"

    [[settings]]
    group = "http"               # http_settings(listeners = "API listeners")
    listeners = "API listeners"

    [[settings]]
    key = "database.pool_size"
    type = "positive int"
    help = "Connections in the pool."

A setting's entry has ``key``, ``type`` and ``help``, and may have ``default`` (absent:
the config field's default), ``unset = true`` (no default: the field keeps its own),
``required = true`` (no default; the file or the command line must give it), ``field``
(another field than ``[fields]`` names; ``false``: none), ``table = true`` (a TOML table
with free-form keys) and ``convert`` (a converter's name). Types are :data:`TYPES`, the
role's own (``types``), or one of them behind ``positive``, ``non-negative`` or
``non-negative finite``; converters are :data:`CONVERTERS` or the role's. An unknown
name or key is a :class:`SettingsFileError` when the role's module is imported.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

from treadmill.common import config
from treadmill.common.config import FIELD, Setting, non_negative, positive

__all__ = ["CONVERTERS", "GROUPS", "TYPES", "SettingsFileError", "load", "parse"]

Kind = Callable[[Any], Any]
Group = Callable[..., tuple[Setting, ...]]

TYPES: Mapping[str, Kind] = {
    "str": config.STR, "int": config.INT, "float": config.FLOAT, "bool": config.BOOL,
    "strlist": config.STRLIST, "server endpoint": config.server_endpoint,
    "server endpoints": config.server_endpoints, "client endpoint": config.client_endpoint,
}
"""The types every settings file may name."""

MODIFIERS: tuple[tuple[str, Callable[[Kind], Kind]], ...] = (
    ("positive ", positive),
    ("non-negative finite ", lambda kind: non_negative(kind, finite=True)),
    ("non-negative ", non_negative),
)
"""Prefixes of a type name that narrow the number type after them."""

CONVERTERS: Mapping[str, Callable[[Any], Any]] = {"tuple": tuple, "list": list, "dict": dict}
"""The converters every settings file may name (the checked value to the field's shape)."""

GROUPS: Mapping[str, Group] = {"http": config.http_settings}
"""The groups every settings file may name."""

_ENTRY = frozenset({"key", "type", "help", "default", "unset", "required", "field", "table",
                    "convert"})


class SettingsFileError(ValueError):
    """A settings file is malformed: a programming error, found when its role is imported."""


def load(package: str, *, types: Mapping[str, Kind] | None = None,
         converters: Mapping[str, Callable[[Any], Any]] | None = None,
         groups: Mapping[str, Group] | None = None) -> tuple[Setting, ...]:
    """The settings of ``package``'s ``settings.toml``; ``types``, ``converters`` and
    ``groups`` are the role's own names, beside the common ones."""
    text = resources.files(package).joinpath("settings.toml").read_text(encoding="utf-8")
    return parse(text, f"{package.replace('.', '/')}/settings.toml", types=types,
                 converters=converters, groups=groups)


def parse(text: str, source: str, *, types: Mapping[str, Kind] | None = None,
          converters: Mapping[str, Callable[[Any], Any]] | None = None,
          groups: Mapping[str, Group] | None = None) -> tuple[Setting, ...]:
    """The settings a settings file's ``text`` declares (``source`` names it in errors)."""
    def fail(problem: str, key: str | None = None) -> SettingsFileError:
        return SettingsFileError(f"{source}: {key + ': ' if key else ''}{problem}")

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise fail(f"invalid TOML: {e}") from None
    for name in data.keys() - {"fields", "settings"}:
        raise fail(f"unknown key {name!r} (expected fields and [[settings]])")
    names = _Names(fail, {**TYPES, **(types or {})}, {**CONVERTERS, **(converters or {})},
                   {**GROUPS, **(groups or {})})
    templates = data.get("fields", {})
    settings: list[Setting] = []
    for entry in data.get("settings", []):
        if "group" in entry:
            arguments = {k: v for k, v in entry.items() if k != "group"}
            settings.extend(names.group(entry["group"])(**arguments))
        elif "key" in entry:
            settings.append(_setting(entry, templates, names, fail))
        else:
            raise fail(f"an entry needs a key or a group: {entry!r}")
    seen: set[str] = set()
    for setting in settings:
        if setting.key in seen:
            raise fail("declared twice", setting.key)
        seen.add(setting.key)
    return tuple(settings)


class _Names:
    """The types, converters and groups a file may name, looked up with clear errors."""

    def __init__(self, fail: Callable[..., SettingsFileError], types: Mapping[str, Kind],
                 converters: Mapping[str, Callable[[Any], Any]], groups: Mapping[str, Group]):
        self.fail, self.types, self.converters, self.groups = fail, types, converters, groups

    def kind(self, name: Any, key: str) -> Kind:
        rest = name if isinstance(name, str) else ""
        for prefix, modifier in MODIFIERS:
            if rest.startswith(prefix):
                return modifier(self.kind(rest[len(prefix):], key))
        if rest not in self.types:
            raise self.fail(f"unknown type {name!r} (known: {', '.join(self.types)}, "
                            "each may follow positive, non-negative or non-negative finite)",
                            key)
        return self.types[rest]

    def converter(self, name: Any, key: str) -> Callable[[Any], Any]:
        if name not in self.converters:
            raise self.fail(f"unknown converter {name!r} (known: {', '.join(self.converters)})",
                            key)
        return self.converters[name]

    def group(self, name: Any) -> Group:
        if name not in self.groups:
            raise self.fail(f"unknown group {name!r} (known: {', '.join(self.groups)})")
        return self.groups[name]


def _setting(entry: Mapping[str, Any], templates: Mapping[str, str], names: _Names,
             fail: Callable[..., SettingsFileError]) -> Setting:
    key = entry["key"]
    for name in entry.keys() - _ENTRY:
        raise fail(f"unknown key {name!r} (known: {', '.join(sorted(_ENTRY))})", key)
    for name in ("type", "help"):
        if name not in entry:
            raise fail(f"{name} is missing", key)
    required, unset = entry.get("required", False), entry.get("unset", False)
    if sum(("default" in entry, required, unset)) > 1:
        raise fail("give at most one of default, unset and required", key)
    default = entry.get("default", None if required or unset else FIELD)
    table, _, leaf = key.rpartition(".")
    field = entry.get("field", True)
    if field is True:
        template = templates.get(table)
        field = None if template is None else template.format(leaf=leaf)
    elif field is False:
        field = None
    elif not isinstance(field, str):
        raise fail(f"field must be a string or false, got {field!r}", key)
    convert = entry.get("convert")
    return Setting(key, names.kind(entry["type"], key), default, entry["help"],
                   required=required, table=entry.get("table", False), field=field,
                   convert=None if convert is None else names.converter(convert, key))
