"""The tier rules of ``tests/conftest.py`` name files that exist (a renamed e2e file would
otherwise fall to a lower tier unnoticed)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from tests.conftest import E2E_FILES, LONGEST_FIRST, TIERS

ROOT = Path(__file__).resolve().parent.parent


def test_every_e2e_pattern_names_a_test_file() -> None:
    files = [p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")]
    unmatched = [pattern for pattern in E2E_FILES
                 if not any(fnmatch.fnmatch(f, pattern) for f in files)]
    assert not unmatched


def test_the_longest_files_named_first_exist() -> None:
    assert [path for path in LONGEST_FIRST if not (ROOT / path).is_file()] == []


def test_the_tiers_are_declared_markers() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert all(f'"{tier}: ' in text for tier in TIERS)
