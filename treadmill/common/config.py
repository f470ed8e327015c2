"""Role configuration: a TOML file supplies defaults, the command line overrides.

Each role declares its settings once, as a tuple of :class:`Setting`. A
setting has a dotted key (``database.dsn``) that names a table and key in the
TOML file, and a command-line flag derived from it (``--database-dsn``).
:class:`RoleOptions` turns the table into ``usage.Options`` parameters, loads
the file named by ``--config``, checks every key and value, and leaves the
merged result in ``options.settings``: a flat mapping of dotted key to value.

Errors name the file, the key and the problem, and are ``UsageError`` so that
``twistd`` prints them and exits non-zero.
"""

from __future__ import annotations

import math
import re
import tomllib
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


def server_endpoint(value: Any) -> str:
    """Check a listening endpoint description (``tcp:8080:interface=::1``)."""
    desc = _str(value)
    try:
        serverFromString(MemoryReactor(), desc)
    except Exception as e:
        raise ValueError(f"invalid listening endpoint {desc!r}: {e}") from None
    return desc


def client_endpoint(value: Any) -> str:
    """Check a connecting endpoint description (``tcp:host=example.org:port=80``)."""
    desc = _str(value)
    try:
        clientFromString(MemoryReactor(), desc)
    except Exception as e:
        raise ValueError(f"invalid client endpoint {desc!r}: {e}") from None
    return desc


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


def non_negative(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A number that must be zero or more (not NaN)."""

    def check(value: Any) -> Any:
        value = kind(value)
        if value < 0 or value != value:
            raise ValueError(f"expected zero or more, got {value}")
        return value

    return check


STR = _str
INT = _int
FLOAT = _float
BOOL = _bool
STRLIST = _strlist


@dataclass(frozen=True)
class Setting:
    """One configuration setting of a role.

    ``key`` is dotted (``table.key``); ``kind`` converts and checks a value
    from the file or the command line and raises ``ValueError`` with a
    readable message; ``default`` of ``None`` means "unset"; ``required``
    settings must come from the file or the command line.
    """

    key: str
    kind: Callable[[Any], Any]
    default: Any
    help: str
    required: bool = False
    table: bool = False
    """The value is a whole TOML table with free-form keys (not flattened)."""

    @property
    def flag(self) -> str:
        return self.key.replace(".", "-").replace("_", "-")


# Settings every role has.
COMMON_SETTINGS: tuple[Setting, ...] = (
    Setting("manhole.listen", server_endpoints, [],
            "Manhole SSH listeners (loopback or UNIX socket only); empty disables it."),
    Setting("manhole.authorized_keys", STR, None,
            "authorized_keys file of the operators allowed into the manhole."),
    Setting("manhole.host_key", STR, None,
            "Manhole SSH host key file; generated on first start if absent."),
    Setting("metrics.listen", server_endpoints, [],
            "Prometheus /metrics listeners; empty disables them."),
    Setting("metrics.allow_remote", BOOL, False,
            "Allow metrics listeners that are not UNIX sockets or loopback TCP."),
    Setting("http.head_timeout", non_negative(FLOAT), 10.0,
            "Seconds a client has to send a complete request head; 0 disables the limit."),
    Setting("http.idle_timeout", non_negative(FLOAT), 60.0,
            "Seconds a kept-alive connection may wait for its next request; 0 disables."),
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

    Subclasses set ``settings`` (their own, added to :data:`COMMON_SETTINGS`)
    and may override :meth:`checkSettings` for cross-setting rules. After
    parsing, ``options.values`` maps every dotted key to its value.
    """

    values: dict[str, Any]

    settings: tuple[Setting, ...] = ()
    optParameters: list[list[Any]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        params = [["config", "c", None, "TOML configuration file (the command line overrides it)."]]
        for setting in cls.all_settings():
            default = setting.default
            shown = ", ".join(default) if isinstance(default, list) else default
            params.append([setting.flag, None, None, f"{setting.help} [default: {shown}]"])
        cls.optParameters = params

    @classmethod
    def all_settings(cls) -> tuple[Setting, ...]:
        return COMMON_SETTINGS + cls.settings

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
