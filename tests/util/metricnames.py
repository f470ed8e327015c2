"""The metric tables of docs/operations.md (``documented``) and the families of a
Prometheus scrape (``scraped``), for the tests that compare the two."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
_ROW = re.compile(r"^\| `([a-z_:][a-z0-9_:]*)(?:\{([a-z_,]*)\})?` \| (counter|gauge|histogram) \|")
# The process and platform collectors every role adds: not Treadmill's to document.
_FOREIGN = ("process_", "python_")


def documented() -> dict[str, dict[str, tuple[str, frozenset[str]]]]:
    """Per role (a ``###`` heading of the Metrics section): name -> (type, labels)."""
    text = DOC.read_text()
    section = text[text.index("\n## Metrics\n"):]
    section = section[:section.index("\n## ", 1)]
    tables: dict[str, dict[str, tuple[str, frozenset[str]]]] = {}
    role = None
    for line in section.splitlines():
        if line.startswith("### "):
            role = line[4:].strip()
            tables[role] = {}
        elif (found := _ROW.match(line)) and role is not None:
            name, labels, kind = found.groups()
            tables[role][name] = (kind, frozenset(labels.split(",")) if labels else frozenset())
    return tables


def scraped(text: str) -> dict[str, tuple[str, frozenset[str] | None]]:
    """Treadmill's families of a text-format scrape: name -> (type, label names), the
    labels None when the family has no sample now (a gauge per log server, none)."""
    families: dict[str, tuple[str, set[str] | None]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            base = name.removesuffix("_created")
            if name.startswith(_FOREIGN) or (name != base and (
                    f"{base}_total" in families or base in families)):
                continue  # prometheus_client's creation times of counters and histograms
            families[name] = (kind, None)
        elif line and not line.startswith("#"):
            found = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
            assert found is not None, line
            labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', line.split("} ")[0]))
            for family, (kind, seen) in list(families.items()):
                if found.group(0) == family or (kind == "histogram" and found.group(0) in (
                        f"{family}_bucket", f"{family}_sum", f"{family}_count")):
                    families[family] = (kind, (seen or set()) | (labels - {"le"}))
    return {name: (kind, None if labels is None else frozenset(labels))
            for name, (kind, labels) in families.items()}
