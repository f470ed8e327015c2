"""Every benchmark under ``tools/bench/`` still imports and parses its options: the
benches are run by hand, so nothing else notices when a module they use moves
(``qemu_boot.py`` imported ``blob_path`` from where it no longer was)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench"
HELPERS = {"floorrelay.py"}
"""Programs a bench starts with positional arguments, not benches of their own."""

SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in HELPERS)


def test_there_are_benches() -> None:
    assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bench_prints_its_help(script: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"],
                          capture_output=True, text=True, timeout=60, cwd=BENCH)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
