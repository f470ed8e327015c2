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

A config class made only of settings is derived from them (:func:`config_class`): its
fields, their types and defaults are then written once, in the file.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any, TypeVar

from treadmill.common import config
from treadmill.common.config import FIELD, Setting, non_negative, positive

__all__ = ["CONVERTERS", "GROUPS", "TYPES", "SettingsFileError", "config_class", "load",
           "parse"]

Kind = Callable[[Any], Any]
Group = Callable[..., tuple[Setting, ...]]
T = TypeVar("T")

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
            group = names.group(entry["group"])
            try:
                settings.extend(group(**arguments))
            except TypeError as e:  # a missing or unknown argument
                raise fail(f"group {entry['group']!r}: {e}") from None
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

    def kind(self, name: Any, key: str) -> tuple[Kind, Kind]:
        """The checking function a type name stands for, and the named type's own."""
        rest = name if isinstance(name, str) else ""
        for prefix, modifier in MODIFIERS:
            if rest.startswith(prefix):
                kind, named = self.kind(rest[len(prefix):], key)
                return modifier(kind), named
        if rest not in self.types:
            raise self.fail(f"unknown type {name!r} (known: {', '.join(self.types)}, "
                            "each may follow positive, non-negative or non-negative finite)",
                            key)
        return self.types[rest], self.types[rest]

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
    kind, named = names.kind(entry["type"], key)
    convert = None if "convert" not in entry else names.converter(entry["convert"], key)
    return Setting(key, kind, default, entry["help"], required=required,
                   table=entry.get("table", False), field=field, convert=convert,
                   annotation=_annotation(named, convert))


def _annotation(kind: Kind, convert: Callable[[Any], Any] | None) -> Any:
    """The type of a field filled by ``kind``'s values, ``convert``-ed: from the functions'
    return annotations (``tuple`` and ``list`` keep the items' type)."""
    result = _returns(kind)
    if convert in (tuple, list):
        item = (typing.get_args(result) or (Any,))[0]
        return tuple[item, ...] if convert is tuple else list[item]  # type: ignore[valid-type]
    return result if convert in (None, dict) else _returns(convert)  # type: ignore[arg-type]


def _returns(function: Callable[..., Any]) -> Any:
    try:
        return typing.get_type_hints(function).get("return", Any)
    except TypeError:  # a built-in
        return Any


def config_class(settings: Iterable[Setting], fields: str,
                 **options: Any) -> Callable[[type[T]], type[T]]:
    """A class decorator: the class as a dataclass (``options`` as for
    :func:`dataclasses.dataclass`) with, after the fields it declares itself, a field for
    each setting that fills ``fields.NAME`` (``"links"``: ``links.ping_interval``, ...), in
    the settings' order, typed by its type and defaulting to its default: both are written
    once, in the settings file."""
    def derive(cls: type[T]) -> type[T]:
        annotations = dict(inspect.get_annotations(cls))
        for s in settings:
            head, dot, name = (s.field or "").partition(".")
            if (head, dot) != (fields, ".") or "." in name or name.endswith("[]") \
                    or name in annotations:
                continue
            if s.annotation is None or s.default is FIELD or s.required:
                raise TypeError(f"{cls.__name__}.{name}: {s.key} needs its type and default "
                                "in a settings file")
            value = None if s.default is None else s.kind(s.default)
            if value is not None and s.convert is not None:
                value = s.convert(value)
            annotations[name] = s.annotation if s.default is not None else s.annotation | None
            setattr(cls, name, dataclasses.field(default_factory=functools.partial(
                copy.copy, value)) if isinstance(value, list | dict | set) else value)
        cls.__annotations__ = annotations
        return dataclasses.dataclass(cls, **options)

    return derive
