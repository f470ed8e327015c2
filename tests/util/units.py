"""systemd unit files read as systemd reads them (``parse``, ``values``) and the
``twistd`` path docs/install.md's units run (``TWISTD``)."""

from __future__ import annotations

from pathlib import Path

TWISTD = "/opt/treadmill/bin/twistd"  # docs/install.md's layout


def parse(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists, continuation lines joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    logical = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        if not logical and (not raw.strip() or raw.lstrip().startswith(("#", ";"))):
            continue
        logical += raw.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        line, logical = logical.strip(), ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, f"{path.name}:{number}: {line!r}"
        key, value = line.split("=", 1)
        assert key.strip() == key and key.isascii() and key[:1].isupper(), (path.name, key)
        current.append((key, value.strip()))
    assert not logical, f"{path.name}: ends inside a continued line"
    return sections


def values(unit: dict[str, list[tuple[str, str]]], key: str) -> list[str]:
    return [v for k, v in unit["Service"] if k == key]
