"""docs/install.md's install, checked: the built wheel, installed alone into a clean
virtual environment (no checkout on the path), carries every role's twistd plugin,
the console scripts and the packaged data, and dry-runs the migrations."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.wheels import ROOT, run
from treadmill.switchboard.database import migrations

ROLES = ("switchboard", "imagestore", "logserver", "proxy", "supervisor")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory,
              built_wheel: Path) -> tuple[Path, Path]:
    """(the wheel, the virtual environment it is installed in), as /opt/treadmill."""
    base = tmp_path_factory.mktemp("install")
    wheel = built_wheel
    venv = base / "opt-treadmill"
    run(sys.executable, "-m", "venv", venv, cwd=base)
    run(venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check",
        f"{wheel}[server]", cwd=base)
    # The step install.md prescribes after every install or upgrade.
    run(venv / "bin" / "python", "-c",
        "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))", cwd=base)
    return wheel, venv


def test_wheel_holds_every_packaged_file(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = subprocess.run(["git", "ls-files", "treadmill", "twisted/plugins"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.split()
    else:
        tracked = [str(p.relative_to(ROOT)) for d in ("treadmill", "twisted/plugins")
                   for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    # Every source and data file (schemas, migrations, plugins) the roles read at run time.
    assert sorted(set(tracked) - names) == []
    assert not [n for n in names if n.endswith("dropin.cache") or n.startswith("tests/")]


def test_installed_roles_console_scripts_and_migrations(installed: tuple[Path, Path],
                                                        database: str, tmp_path: Path) -> None:
    _, venv = installed
    bin_ = venv / "bin"
    where = run(bin_ / "python", "-c", "import treadmill; print(treadmill.__file__)",
                cwd=tmp_path).stdout.strip()
    assert where.startswith(str(venv)), where
    plugins = next((venv / "lib").glob("python3*/site-packages/twisted/plugins"))
    assert (plugins / "dropin.cache").exists()
    listed = run(bin_ / "twistd", "--help", cwd=tmp_path).stdout
    for role in ROLES:
        assert f"treadmill-{role}" in listed
        help_text = run(bin_ / "twistd", f"treadmill-{role}", "--help", cwd=tmp_path).stdout
        assert "--config" in help_text, (role, help_text)
    assert "usage" in run(bin_ / "tml", "--help", cwd=tmp_path).stdout.lower()
    # The web console's files, xterm.js included, are served from the installed package.
    served = run(bin_ / "python", "-c", "from treadmill.switchboard.web import Assets; "
                 "a = Assets(); print(a.root); print(*(len(a.get(p)[0]) for p in ("
                 "'index.html', 'app.js', 'pages/job.js', 'vendor/xterm/xterm.mjs', "
                 "'vendor/xterm/xterm.css')))", cwd=tmp_path).stdout.splitlines()
    assert served[0].startswith(str(venv)) and all(int(n) > 0 for n in served[1].split())

    dry = run(bin_ / "treadmill-switchboard-migrate", "--database-dsn", database, "--dry-run",
              cwd=tmp_path)
    assert dry.stdout.splitlines() == [f"pending {name}" for _, name, _ in migrations()]
    applied = run(bin_ / "treadmill-switchboard-migrate", "--database-dsn", database,
                  cwd=tmp_path)
    assert len(applied.stdout.splitlines()) == len(migrations())
    again = run(bin_ / "python", "-m", "treadmill.switchboard.migrate", "--database-dsn",
                database, "--dry-run", "--check", cwd=tmp_path)
    assert again.stdout == "nothing pending\n"
