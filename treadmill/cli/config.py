"""Where ``tml`` finds the switchboard URL, the API token and the CA file.

Each setting is taken from the first of: a command-line flag, an environment
variable, the configuration file. The token is best given by ``--token-file``,
``$TREADMILL_TOKEN`` or the file: ``--token TOKEN`` shows it to every local user
(the process list) and is kept only for compatibility, with a warning. The
file is TOML with top-level keys ``url``, ``token`` and ``ca_file``; ``tml
login`` writes it.

A token read from the file is only sent to the URL stored next to it, so that
pointing ``tml`` at another switchboard with ``--url`` never leaks it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from treadmill.common.files import write_atomically

DEFAULT_URL = "http://127.0.0.1:8080"
FILE_KEYS = ("url", "token", "ca_file")


class ConfigError(Exception):
    """The configuration file or a setting is invalid."""


@dataclass(frozen=True)
class Settings:
    """The resolved connection settings."""

    url: str
    token: str | None
    ca_file: str | None
    config_path: Path
    retry_for: float = 30.0  # seconds an idempotent request is retried (docs/cli.md)


def config_path(env: Mapping[str, str], override: str | None = None) -> Path:
    """The configuration file: ``--config``, ``$TREADMILL_CONFIG``, or the XDG default."""
    if override:
        return Path(override).expanduser()
    if env.get("TREADMILL_CONFIG"):
        return Path(env["TREADMILL_CONFIG"]).expanduser()
    if env.get("XDG_CONFIG_HOME"):
        base = Path(env["XDG_CONFIG_HOME"])
    else:
        home = env.get("HOME") or str(Path.home())
        base = Path(home) / ".config"
    return base / "treadmill" / "tml.toml"


def load_file(path: Path) -> dict[str, Any]:
    """Read a configuration file; a missing file is an empty configuration."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    for key in FILE_KEYS:
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{path}: {key}: expected a string")
    return data


def normalize_url(url: str, source: str) -> str:
    """Check that ``url`` is an http(s) URL and drop any trailing slash."""
    utf8(url, source)
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{source}: expected an http:// or https:// URL, got {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{source}: the URL must not have a query or fragment")
    return url.strip().rstrip("/")


def utf8(value: str, source: str) -> str:
    """``value`` if it is UTF-8 text; not, when the shell or the environment gave bytes
    that are not (Python keeps them as lone surrogates): a :class:`ConfigError`."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{source}: not valid UTF-8") from None
    return value


def resolve(
    env: Mapping[str, str],
    *,
    url: str | None = None,
    token: str | None = None,
    ca_file: str | None = None,
    config: str | None = None,
    token_file: str | None = None,
) -> Settings:
    """Resolve the settings from flags (the keyword arguments), ``env`` and the file."""
    path = config_path(env, config)
    data = load_file(path)

    file_url = normalize_url(data["url"], f"{path}: url") if data.get("url") else None
    if url:
        final_url = normalize_url(url, "--url")
    elif env.get("TREADMILL_URL"):
        final_url = normalize_url(env["TREADMILL_URL"], "TREADMILL_URL")
    else:
        final_url = file_url or DEFAULT_URL

    if token:
        final_token: str | None = utf8(token, "--token").strip()
    elif token_file:
        final_token = read_token_file(token_file)
    elif env.get("TREADMILL_TOKEN"):
        final_token = utf8(env["TREADMILL_TOKEN"], "TREADMILL_TOKEN").strip()
    elif data.get("token") and (file_url is None or file_url == final_url):
        final_token = data["token"].strip()
    else:
        final_token = None

    final_ca = ca_file or env.get("TREADMILL_CA_FILE") or data.get("ca_file") or None
    retry_for = _retry_for(env.get("TREADMILL_RETRY_FOR"), "TREADMILL_RETRY_FOR")
    if retry_for is None:
        retry_for = _retry_for(data.get("retry_for"), f"{path}: retry_for")
    return Settings(final_url, final_token or None, final_ca, path,
                    30.0 if retry_for is None else retry_for)


def _retry_for(value: Any, source: str) -> float | None:
    """Seconds to retry for, from the environment or the file (None if unset)."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if isinstance(value, bool) or not 0 <= seconds <= 86400:
        raise ConfigError(f"{source}: expected seconds between 0 and 86400, got {value!r}")
    return seconds


def read_token_file(path: str) -> str:
    """The token in the file ``path`` (``--token-file``): its first line, trimmed."""
    try:
        with open(Path(path).expanduser(), encoding="utf-8") as f:
            text = f.read(4096)
    except OSError as e:
        raise ConfigError(f"--token-file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--token-file {path}: not UTF-8 text") from None
    token = text.strip().split("\n", 1)[0].strip() if text.strip() else ""
    if not token:
        raise ConfigError(f"--token-file {path}: the file is empty")
    return token


def _toml_string(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    raise ConfigError(f"cannot write a {type(value).__name__} to the configuration file")


def _toml_key(key: str) -> str:
    if key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key):
        return key
    return _toml_string(key)


def dump_toml(data: Mapping[str, Any]) -> str:
    """Serialise a flat-ish mapping as TOML (top-level keys, inline tables)."""
    return "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in data.items())


def save_file(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = "# Written by `tml login`.\n" + dump_toml(data)
    write_atomically(path, text.encode("utf-8"))
