"""Rendering API objects for people (tables, ``key: value`` lines) and scripts (JSON)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

_CONTROL = re.compile(r"([\x00-\x1f\x7f-\x9f])(\\*)")
"""A control character, and the backslashes that follow it (doubled when shown)."""
_FRACTION = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.\d+(Z|[+-]\d\d:\d\d)$")


def _escape_control(match: re.Match[str]) -> str:
    return f"\\x{ord(match[1]):02x}" + match[2] * 2


def clean(text: str) -> str:
    """Escape control characters (``\\xNN``) so server-supplied text cannot drive the
    terminal. Backslashes right after a control character are doubled: ESC and a literal
    ``\\x07`` (``\\x1b\\\\x07``) differ from ESC and BEL (``\\x1b\\x07``). Other backslashes
    (paths, regular expressions) stay as they are."""
    return _CONTROL.sub(_escape_control, text)


def fmt_time(value: str | None) -> str:
    """An RFC 3339 time without its fraction of a second, or ``-``."""
    if not value:
        return "-"
    m = _FRACTION.match(value)
    return f"{m.group(1)}{m.group(2)}" if m else value


def cell(value: Any) -> str:
    """One value as table text: ``-`` for null, ``yes``/``no``, lists joined by commas."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return clean(str(value))


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, without trailing blanks."""
    text_rows = [list(headers)] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in text_rows) for i in range(len(headers))]
    lines = []
    for row in text_rows:
        padded = [v.ljust(w) for v, w in zip(row, widths, strict=True)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines) + "\n"


def render_fields(fields: Sequence[tuple[str, Any]]) -> str:
    """``key: value`` lines with the values aligned."""
    if not fields:
        return ""
    width = max(len(k) for k, _ in fields) + 1
    return "".join(f"{(k + ':').ljust(width)} {cell(v)}".rstrip() + "\n" for k, v in fields)


def print_json(out: TextIO, value: Any) -> None:
    """Indented JSON, as returned by the API."""
    out.write(json.dumps(value, indent=2) + "\n")


def print_json_line(out: TextIO, value: Any) -> None:
    """One compact JSON document per line (for streams)."""
    out.write(json.dumps(value, separators=(",", ":")) + "\n")
    out.flush()


def render_object(obj: dict[str, Any], order: Sequence[str], skip: Sequence[str] = ()) -> str:
    """An API object as ``key: value`` lines: the known keys in order, then any others."""
    keys = [k for k in order if k in obj] + [k for k in obj if k not in order]
    return render_fields([(k, obj[k]) for k in keys if k not in skip])
