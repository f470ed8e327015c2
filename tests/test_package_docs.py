"""Every package ``__init__.py`` under ``treadmill/`` names each of its modules and
subpackages in its docstring (read from the source, nothing is imported).

A name counts when the docstring writes it as code: ````name````, ````name.py````,
``:mod:`.name```` or ``:mod:`~pkg.name````, ````name/````, or as a file name in a
tree (``name.py``, ``name/``). A word in prose (``the proxy``) does not count.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "treadmill"
PACKAGES = sorted(init.parent for init in ROOT.rglob("__init__.py"))


def members(package: Path) -> list[str]:
    """The modules (``*.py`` but ``__init__``) and subpackages of ``package``."""
    modules = {p.stem for p in package.glob("*.py") if p.name != "__init__.py"}
    subpackages = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    return sorted(modules | subpackages)


def names(doc: str, name: str) -> bool:
    """Whether ``doc`` names the module or subpackage ``name`` as code or a file."""
    escaped = re.escape(name)
    as_code = rf"(?:`|\.){escaped}(?:\.py)?/?`"
    as_file = rf"(?<![\w.]){escaped}(?:\.py|/)(?!\w)"
    return re.search(f"{as_code}|{as_file}", doc) is not None


def unnamed(package: Path) -> list[str]:
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text("utf-8"))) or ""
    return [name for name in members(package) if not names(doc, name)]


@pytest.mark.parametrize("package", PACKAGES,
                         ids=[str(p.relative_to(ROOT.parent)) for p in PACKAGES])
def test_package_docstring_names_its_modules(package: Path) -> None:
    assert unnamed(package) == [], (
        f"{package.relative_to(ROOT.parent)}/__init__.py: name these in the docstring")


def test_every_package_is_checked() -> None:
    found = {p.relative_to(ROOT).as_posix() for p in PACKAGES}
    assert {".", "common", "switchboard/api", "supervisor/drivers/qemu"} <= found


@pytest.mark.parametrize("doc", [
    "``tap``: options", "- ``tap`` (options)", "    tap.py    options",
    ":mod:`~treadmill.x.tap`: options", ":mod:`.tap`", "``tap.py``", "``tap/``",
    "in tap/ there", "the tap.py file",
])
def test_a_name_as_code_or_file_counts(doc: str) -> None:
    assert names(doc, "tap")


@pytest.mark.parametrize("doc", [
    "", "the tap", "twistd taps", "``tapname``", "``mytap``", "``tap_x``", "mytap.py",
    "tapx/", "``untap.py``", ":mod:`.taps`", "x.tap.py", "the tap.pyc file",
])
def test_a_word_in_prose_or_a_longer_name_does_not_count(doc: str) -> None:
    assert not names(doc, "tap")
