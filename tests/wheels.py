"""The project's wheel, built once per test session, commands run outside the checkout, and
new virtual environments to install it in.

Used by the install tests (``test_install_wheel``: the server install of
``docs/install.md``) and the light client's (``test_light_client``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a command with no PYTHONPATH or VIRTUAL_ENV, so that only what is installed
    where it runs is importable; fail with its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{argv}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def build_wheel(base: Path) -> Path:
    """Build the checkout's wheel (no dependencies) into ``base/dist``; its path."""
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", base / "dist",
        ROOT, cwd=base)
    (wheel,) = (base / "dist").glob("treadmill-*.whl")
    return wheel


def new_venv(directory: Path, *, pip: bool = True) -> Path:
    """A new virtual environment in ``directory``; without ``pip``, it has no pip of its
    own (seconds saved: this environment's pip installs into it)."""
    run(sys.executable, "-m", "venv", *(() if pip else ("--without-pip",)), directory,
        cwd=directory.parent)
    return directory
