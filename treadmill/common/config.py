"""Role configuration: a TOML file supplies defaults, the command line overrides.

Each role declares its settings once, as a tuple of :class:`Setting`. A
setting has a dotted key (``database.dsn``) that names a table and key in the
TOML file, and a command-line flag derived from it (``--database-dsn``).
:class:`RoleOptions` turns the table into ``usage.Options`` parameters, loads
the file named by ``--config``, checks every key and value, and leaves the
merged result in ``options.values``: a flat mapping of dotted key to value.

A setting also names the field of the role's config dataclass it fills
(``field="timeouts.statement"``; dots reach into nested dataclasses), so that
:func:`build` makes the config from the values, and a setting whose default is
:data:`FIELD` takes it from that field (``RoleOptions.config`` names the dataclass).
Roles declare their settings as data, in the ``settings.toml`` of their package
(:mod:`treadmill.common.settingsfile`); shared groups (:data:`COMMON_SETTINGS`,
:func:`http_settings`) are written here as :func:`table` groups of :class:`Row`, one per
TOML table: the key is the table and the row's keyword, the field the one the table's
template names, the default the field's, unless the row says otherwise; so each key,
default and field is written once.

Errors name the file, the key and the problem, and are ``UsageError`` so that
``twistd`` prints them and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.python import usage


class ConfigError(usage.UsageError):
    """A configuration file or option is invalid."""

    def __init__(self, problem: str, *, key: str | None = None, source: str | None = None):
        self.problem = problem
        self.key = key
        self.source = source
        where = ""
        if source:
            where += f"{source}: "
        if key:
            where += f"{key}: "
        super().__init__(where + problem)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 10)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    raise ValueError(f"expected an integer, got {type(value).__name__}")


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    raise ValueError(f"expected a number, got {type(value).__name__}")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"expected a boolean, got {value!r}")


def _strlist(value: Any) -> list[str]:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ValueError("expected a list of strings")


def _endpoint(value: Any, parse: Callable[[Any, str], Any], what: str) -> str:
    desc = _str(value)
    try:
        parse(MemoryReactor(), desc)
    except Exception as e:
        raise ValueError(f"invalid {what} endpoint {desc!r}: {e}") from None
    return desc


def server_endpoint(value: Any) -> str:
    """Check a listening endpoint description (``tcp:8080:interface=::1``)."""
    return _endpoint(value, serverFromString, "listening")


def client_endpoint(value: Any) -> str:
    """Check a connecting endpoint description (``tcp:host=example.org:port=80``)."""
    return _endpoint(value, clientFromString, "client")


def server_endpoints(value: Any) -> list[str]:
    """A list of listening endpoint descriptions; a string is one endpoint."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError("expected an endpoint or a list of endpoints")
    return [server_endpoint(item) for item in items]


def one_of(*choices: str) -> Callable[[Any], str]:
    """A string that must be one of ``choices``."""

    def check(value: Any) -> str:
        value = _str(value)
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    check.__name__ = "one of " + "|".join(choices)
    return check


def positive(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A finite number that must be greater than zero."""

    def check(value: Any) -> Any:
        value = kind(value)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"expected a positive number, got {value}")
        return value

    return check


def non_negative(kind: Callable[[Any], Any], *, finite: bool = False) -> Callable[[Any], Any]:
    """A number that must be zero or more (not NaN; with ``finite``, not infinite)."""

    def check(value: Any) -> Any:
        value = kind(value)
        if value < 0 or value != value or (finite and value == math.inf):
            raise ValueError(f"expected zero or more, got {value}")
        return value

    return check


STR = _str
INT = _int
FLOAT = _float
BOOL = _bool
STRLIST = _strlist


class _FieldDefault:
    def __repr__(self) -> str:
        return "FIELD"


FIELD: Any = _FieldDefault()
"""A :class:`Setting` default: the default of the config field the setting names."""


@dataclass(frozen=True)
class Setting:
    """One configuration setting of a role.

    ``key`` is dotted (``table.key``); ``kind`` converts and checks a value
    from the file or the command line and raises ``ValueError`` with a
    readable message; ``default`` of ``None`` means "unset" (the field keeps
    its own default), :data:`FIELD` means the field's default; ``required``
    settings must come from the file or the command line.
    """

    key: str
    kind: Callable[[Any], Any]
    default: Any
    help: str
    required: bool = False
    table: bool = False
    """The value is a whole TOML table with free-form keys (not flattened)."""
    field: str | None = None
    """The config dataclass field the value fills: ``name``, ``nested.name``, or
    ``name[]`` for an entry of a mapping field, keyed by :attr:`key`."""
    convert: Callable[[Any], Any] | None = None
    """Turns the checked value into the field's shape (``tuple``, "0 means None")."""
    annotation: Any = dataclasses.field(default=None, compare=False, repr=False)
    """The type of the field's value, where a settings file declares the setting (a
    derived config class's annotation, :func:`treadmill.common.settingsfile.config_class`)."""

    @property
    def flag(self) -> str:
        return self.key.replace(".", "-").replace("_", "-")


class _TableField:
    def __repr__(self) -> str:
        return "TABLE"


TABLE: Any = _TableField()
"""A :class:`Row`'s field: the one its :func:`table` names for it."""


@dataclass(frozen=True)
class Row:
    """A setting in a :func:`table`, given as a keyword: the last part of its key.

    ``kind``, ``help``, ``default``, ``required``, ``table`` and ``convert`` are the
    :class:`Setting`'s; ``field`` is :data:`TABLE` (the table's field for the key), another
    field, or None (the value fills no field: ``default`` is then given).
    """

    kind: Callable[[Any], Any]
    help: str
    default: Any = FIELD
    field: str | None = TABLE
    required: bool = False
    table: bool = False
    convert: Callable[[Any], Any] | None = None


def table(name: str, fields: str | None = None, /, **rows: Row) -> tuple[Setting, ...]:
    """The settings of the TOML table ``name`` (``""``: keys at the top level), one a
    keyword (``pool_size=Row(...)`` is ``database.pool_size``). Each fills the config field
    ``fields`` names, ``{leaf}`` standing for its keyword (``"limits.{leaf}"``, ``"auth[]"``;
    None: no field), unless its row names its own: so a key, its field and its default are
    written once."""
    settings = []
    for leaf, row in rows.items():
        field = row.field
        if field is TABLE:
            field = None if fields is None else fields.format(leaf=leaf)
        settings.append(Setting(f"{name}.{leaf}" if name else leaf, row.kind, row.default,
                                row.help, required=row.required, table=row.table, field=field,
                                convert=row.convert))
    return tuple(settings)


def _field_types(cls: type) -> dict[str, Any]:
    """The dataclass fields of ``cls`` by name, their types resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_of(hint: Any) -> type:
    """The dataclass in a field's type (``X`` or ``X | None``)."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    raise TypeError(f"{hint!r} is not a dataclass")


def _field_default(cls: type, path: str) -> Any:
    """The default of the field at the dotted ``path`` of dataclass ``cls``."""
    head, _, rest = path.partition(".")
    if rest:
        return _field_default(_dataclass_of(_field_types(cls)[head]), rest)
    for f in dataclasses.fields(cls):
        if f.name == head:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise TypeError(f"{cls.__name__}.{path} has no default")


def resolve_defaults(config: type, settings: Iterable[Setting]) -> tuple[Setting, ...]:
    """``settings`` with each :data:`FIELD` default replaced by its field's default in
    ``config`` (checked by the setting's ``kind``, so that ``3600`` reads ``3600.0``)."""
    resolved = []
    for s in settings:
        if s.default is FIELD:
            if s.field is None or s.convert is not None:
                raise TypeError(f"{s.key}: a FIELD default needs a field and no convert")
            default = _field_default(config, s.field)
            if isinstance(default, tuple):
                default = list(default)
            s = dataclasses.replace(s, default=None if default is None else s.kind(default))
        resolved.append(s)
    return tuple(resolved)


def build(cls: type, settings: Iterable[Setting], values: Mapping[str, Any],
          omit: Iterable[str] = ()) -> Any:
    """An instance of the dataclass ``cls`` from parsed ``values``: each setting with a
    ``field`` fills it (converted by its ``convert``); an unset (None) value leaves the
    field at its default (a mapping entry, ``name[]``, is set to None); the top-level
    fields in ``omit`` keep their defaults."""
    tree: dict[str, Any] = {}
    skip = frozenset(omit)
    for s in settings:
        if s.field is None or s.field.partition(".")[0].removesuffix("[]") in skip:
            continue
        value = values[s.key]
        *parents, leaf = s.field.split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        if leaf.endswith("[]"):
            node.setdefault(leaf[:-2], {})[s.key] = value
        elif value is not None:
            node[leaf] = value if s.convert is None else s.convert(value)
    return _instance(cls, tree)


def _instance(cls: type, tree: dict[str, Any]) -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in tree.items():
        if name not in types_:
            raise TypeError(f"{cls.__name__} has no field {name!r}")
        nested = _dataclass_or_none(types_[name])
        if isinstance(value, dict) and nested is not None:
            value = _instance(nested, value)
        kwargs[name] = value
    return cls(**kwargs)


def _dataclass_or_none(hint: Any) -> type | None:
    try:
        return _dataclass_of(hint)
    except TypeError:
        return None


# Settings every role has (they fill no config field: twistd_service reads them).
COMMON_SETTINGS: tuple[Setting, ...] = (
    *table("manhole", None,
           listen=Row(server_endpoints, "Manhole SSH listeners (loopback or UNIX socket only); "
                                        "empty disables it.", default=[]),
           authorized_keys=Row(STR, "authorized_keys file of the operators allowed into the "
                                    "manhole.", default=None),
           host_key=Row(STR, "Manhole SSH host key file; generated on first start if absent.",
                        default=None)),
    *table("metrics", None,
           listen=Row(server_endpoints, "Prometheus /metrics listeners; empty disables them.",
                      default=[]),
           allow_remote=Row(BOOL, "Allow metrics listeners that are not UNIX sockets or "
                                  "loopback TCP.", default=False)),
    *table("http", None,
           head_timeout=Row(non_negative(FLOAT), "Seconds a client has to send a complete "
                            "request head; 0 disables the limit.", default=10.0),
           idle_timeout=Row(non_negative(FLOAT), "Seconds a kept-alive connection may wait "
                            "for its next request; 0 disables.", default=60.0)),
)


def http_settings(listeners: str) -> tuple[Setting, ...]:
    """``listen`` and ``http.access_log`` of a role that serves HTTP, filling the config
    fields ``listen`` and ``access_log``; ``listeners`` says what its listeners serve."""
    return (
        *table("", "{leaf}", listen=Row(
            server_endpoints,
            f"{listeners} (endpoint descriptions: tcp:, ssl:, unix:, systemd:).")),
        *table("http", "{leaf}", access_log=Row(BOOL, "Log one line per HTTP request.")),
    )


def flatten(table: Mapping[str, Any], prefix: str = "",
            keep: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Flatten nested TOML tables into dotted keys (except the tables named in ``keep``)."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in keep:
            flat.update(flatten(value, dotted + ".", keep))
        else:
            flat[dotted] = value
    return flat


def load_file(path: str, settings: Iterable[Setting]) -> dict[str, Any]:
    """Read a TOML file and check its keys and values against ``settings``."""
    known = {s.key: s for s in settings}
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("file not found", source=path) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", source=path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", source=path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 (byte {e.start})", source=path) from None
    values: dict[str, Any] = {}
    tables = frozenset(s.key for s in known.values() if s.table)
    for key, value in flatten(raw, keep=tables).items():
        setting = known.get(key)
        if setting is None:
            raise ConfigError("unknown setting", key=key, source=path)
        try:
            values[key] = setting.kind(value)
        except ValueError as e:
            raise ConfigError(str(e), key=key, source=path) from None
    return values


class RoleOptions(usage.Options):
    """``usage.Options`` for a role, built from its settings table.

    Subclasses set ``settings`` (their own, added to :data:`COMMON_SETTINGS`),
    ``config`` (the dataclass the settings' fields belong to) and may override
    :meth:`checkSettings` for cross-setting rules. After parsing,
    ``options.values`` maps every dotted key to its value and :meth:`config_of`
    makes the config.
    """

    values: dict[str, Any]

    settings: tuple[Setting, ...] = ()
    config: type | None = None
    optParameters: list[list[Any]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.config is not None:
            cls.settings = resolve_defaults(cls.config, cls.settings)
        params = [["config", "c", None, "TOML configuration file (the command line overrides it)."]]
        for setting in cls.all_settings():
            default = setting.default
            shown = ", ".join(default) if isinstance(default, list) else default
            params.append([setting.flag, None, None, f"{setting.help} [default: {shown}]"])
        cls.optParameters = params

    @classmethod
    def all_settings(cls) -> tuple[Setting, ...]:
        return COMMON_SETTINGS + cls.settings

    @classmethod
    def config_of(cls, values: Mapping[str, Any], omit: Iterable[str] = ()) -> Any:
        """The ``config`` dataclass from parsed ``values`` (:func:`build`)."""
        assert cls.config is not None, f"{cls.__name__}.config is not set"
        return build(cls.config, cls.settings, values, omit)

    def postOptions(self) -> None:
        settings = self.all_settings()
        values: dict[str, Any] = {}
        for setting in settings:
            default = setting.default
            values[setting.key] = (list(default) if isinstance(default, list) else
                                   dict(default) if isinstance(default, dict) else default)
        if self["config"]:
            values.update(load_file(self["config"], settings))
        for setting in settings:
            given = self[setting.flag]
            if given is None:
                continue
            try:
                values[setting.key] = setting.kind(given)
            except ValueError as e:
                raise ConfigError(str(e), key=f"--{setting.flag}") from None
        source = self["config"] or "command line"
        for setting in settings:
            if setting.required and values[setting.key] in (None, "", []):
                raise ConfigError("required setting is missing", key=setting.key, source=source)
        self.values = values
        self.checkSettings(values, source)

    def checkSettings(self, values: dict[str, Any], source: str) -> None:
        """Check rules that involve more than one setting; raise ConfigError."""
        if values["manhole.listen"] and not values["manhole.authorized_keys"]:
            raise ConfigError(
                "manhole.listen is set but manhole.authorized_keys is not",
                key="manhole.authorized_keys", source=source)
        if values["manhole.listen"] and not values["manhole.host_key"]:
            raise ConfigError(
                "manhole.listen is set but manhole.host_key (a path) is not",
                key="manhole.host_key", source=source)
        for desc in values["manhole.listen"]:
            if not _is_local_endpoint(desc):
                raise ConfigError(
                    f"manhole listener {desc!r} must be a UNIX socket or bound to loopback",
                    key="manhole.listen", source=source)
        if not values.get("metrics.allow_remote"):
            for desc in values["metrics.listen"]:
                if not _is_local_endpoint(desc):
                    raise ConfigError(
                        f"metrics listener {desc!r} is not a UNIX socket or bound to "
                        "loopback: set metrics.allow_remote = true to serve metrics to "
                        "other hosts", key="metrics.listen", source=source)


def check_order(values: Mapping[str, Any], source: str, *pairs: tuple[str, str]) -> None:
    """For a role's ``checkSettings``: each ``(lower, upper)`` pair of numeric settings
    must have ``values[lower] <= values[upper]``; else a ConfigError on ``lower``."""
    for lower, upper in pairs:
        if values[lower] > values[upper]:
            raise ConfigError(f"{lower} ({values[lower]:g}) exceeds {upper} "
                              f"({values[upper]:g})", key=lower, source=source)


def _is_local_endpoint(desc: str) -> bool:
    """True for UNIX sockets and TCP listeners bound to a loopback interface."""
    kind, _, rest = desc.partition(":")
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6"):
        return False
    for part in re.split(r"(?<!\\):", rest):
        if part.startswith("interface="):
            iface = part[len("interface="):].replace("\\", "")
            return iface in ("127.0.0.1", "::1", "localhost") or iface.startswith("127.")
    return False
